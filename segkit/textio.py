"""Reading the text and JSON files users give segkit: encodings detected, nesting bounded, errors named.

Files come from many tools. :func:`read_text` accepts UTF-8 (with or without a byte-order mark, as
Windows editors write it) and UTF-16 / UTF-32 with a byte-order mark (Windows "Unicode" text, and
PowerShell's default output); anything else that is not valid UTF-8 (a Latin-1 or Windows-1252
file, a binary file) is refused with the line and byte offset of the first bad byte, rather than
guessed, so that file names and class names never come out garbled.

:func:`load_json` reads a JSON file through :func:`read_text` and bounds how deeply its arrays and
objects nest (:data:`MAX_JSON_DEPTH`): a few kilobytes of ``[[[[...`` would otherwise exhaust
Python's recursion limit in the parser or in any code that walks the result.

Example:
    >>> from segkit.data.coco import DatasetError
    >>> data = load_json("instances_val2017.json", error=DatasetError)
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from segkit.errors import UserError

__all__ = ["MAX_JSON_DEPTH", "json_depth", "load_json", "read_names", "read_text"]

#: Deepest nesting of arrays and objects :func:`load_json` accepts by default. COCO files nest 4
#: deep (``{"annotations": [{"segmentation": [[x, y, ...]]}]}``); 100 leaves room for any real
#: format while keeping every recursive walk of the result far from Python's recursion limit.
MAX_JSON_DEPTH = 100

# Byte-order marks, longest first: the UTF-32 LE mark begins with the UTF-16 LE one.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32"),
    (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16"),
)
# Counting nesting: escape sequences are dropped, then every byte but brackets and quotes.
_JSON_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'[]{}"')
_BRACKET_STEP = np.zeros(256, dtype=np.int8)
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1


def read_text(path: str | os.PathLike[str], *, error: Callable[[str], Exception] = UserError,
              what: str = "file") -> str:
    """The text of a file, decoded as its byte-order mark says, or as UTF-8 when it has none.

    A UTF-8 mark is dropped; UTF-16 and UTF-32 need their mark (a file without one, which begins
    with NUL bytes, is refused). Line ends become ``"\\n"``, as :func:`open` gives them.

    Args:
        path: the file.
        error: the exception raised: a :class:`~segkit.errors.UserError` subclass such as
            ``DatasetError``, or any callable making one from the message alone
            (``functools.partial(ConfigError, key="classes")``).
        what: what the file is, for messages (``"annotation file"``).

    Raises:
        error: the file cannot be read, or is not valid text in its encoding; the message names the
            file, the line and the byte offset of the first bad byte, and says to save it as UTF-8.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise error(f"{what} '{path}' does not exist.") from None
    except IsADirectoryError:
        raise error(f"{what} '{path}' is a folder, not a file.") from None
    except OSError as exc:
        raise error(f"cannot read {what} '{path}': {exc.strerror or exc}.") from None
    codec, name, start = _encoding(data)
    if start == 0 and 0 in data[:2]:  # valid UTF-8, but text never starts so: UTF-16/32 without a mark
        raise error(f"{what} '{path}' is not readable text: it begins with NUL bytes, as UTF-16 or UTF-32 text without "
                    f"a byte-order mark does (or it is a binary file). Save the file as UTF-8.")
    try:
        text = data[start:].decode(codec)
    except UnicodeDecodeError as exc:
        raise error(f"{what} " + _decode_message(path, data, codec, name, start, exc)) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_names(path: str | os.PathLike[str], *, error: Callable[[str], Exception] = UserError,
               what: str = "file") -> list[str]:
    """The non-empty, stripped lines of a file listing names (images of a split, classes), one per line.

    Read by :func:`read_text`. A line holding a NUL character, which no file name can hold, is
    refused with its number (a binary file read as text usually has some).

    Raises:
        error: the file cannot be read or decoded, or a line holds a NUL character.
    """
    path = os.fspath(path)
    lines = read_text(path, error=error, what=what).split("\n")
    for number, line in enumerate(lines, start=1):
        if "\0" in line:
            raise error(f"{what} '{path}', line {number}, holds a NUL character, which no name can hold; the file "
                        f"is corrupt, or not a list of names (one per line).")
    return [line.strip() for line in lines if line.strip()]


def _encoding(data: bytes) -> tuple[str, str, int]:
    """``(codec, name for messages, length of the byte-order mark)`` of a file's bytes."""
    for bom, codec, name in _BOMS:
        if data.startswith(bom):
            return codec, name, len(bom)
    return "utf-8", "UTF-8", 0


def _decode_message(path: str, data: bytes, codec: str, name: str, start: int, exc: UnicodeDecodeError) -> str:
    offset = start + exc.start
    before = data[start:offset].decode(codec).replace("\r\n", "\n").replace("\r", "\n")  # valid up to there
    line = before.count("\n") + 1
    context = before[before.rfind("\n") + 1:][-20:]
    after = f" after {context!r}" if context.strip() else ""
    if start == 0:
        kind = "it is not valid UTF-8 (perhaps Latin-1 or Windows-1252)"
    else:
        kind = f"its byte-order mark says {name}, but the text is not valid {name}"
    return (f"'{path}' is not readable text: {kind}. The first bad byte (0x{data[offset]:02x}) is on line {line}"
            f"{after}, at byte offset {offset} of the file. Save the file as UTF-8.")


def load_json(path: str | os.PathLike[str], *, error: Callable[[str], Exception] = UserError,
              max_depth: int = MAX_JSON_DEPTH, what: str = "file") -> Any:
    """Parse a JSON file read by :func:`read_text`, refusing nesting deeper than ``max_depth``.

    ``NaN``, ``Infinity`` and ``-Infinity`` are read as Python's json module reads them (as
    floats); callers check the values they use.

    Args:
        path: the file.
        error: the exception type raised, as for :func:`read_text`.
        max_depth: the deepest nesting of arrays and objects accepted (``[[1]]`` is 2 deep).
        what: what the file is, for messages (``"results file"``).

    Raises:
        error: the file is unreadable or not text (see :func:`read_text`), not JSON (the message
            names the line and column), or nested deeper than ``max_depth``.
    """
    path = os.fspath(path)
    text = read_text(path, error=error, what=what)
    where = f"{what} '{path}'"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}.") from None
    except RecursionError:  # the parser's own guard (Python's recursion limit), met before max_depth's check
        raise error(_too_deep(where, max_depth)) from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise error(f"{where} is not valid JSON: {exc}.") from None
    if json_depth(text) > max_depth:
        raise error(_too_deep(where, max_depth))
    return data


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in a valid JSON text (``0`` for a scalar).

    Linear and vectorised (a few percent of the time ``json.loads`` takes): brackets inside strings
    are told apart by the parity of the quotes before them, once escapes are removed.
    """
    data = text.encode("utf-8")
    if b"\\" in data:
        data = _JSON_ESCAPE.sub(b"", data)
    skeleton = np.frombuffer(data.translate(None, _NOT_STRUCTURE), dtype=np.uint8)
    inside_string = np.cumsum(skeleton == ord('"'), dtype=np.int64) % 2 == 1
    steps = _BRACKET_STEP[skeleton][~inside_string]
    return int(np.cumsum(steps, dtype=np.int64).max()) if len(steps) else 0


def _too_deep(where: str, max_depth: int) -> str:
    return (f"{where} nests arrays or objects more than {max_depth} levels deep; no segkit file format "
            f"nests that deep, so the file is not the one expected here (or was written wrongly).")
