"""Hostile inputs for the command-line fuzz tests: values, YAML and JSON text oddities, broken images.

The strategies draw *edits* of a valid input (a config mapping, a COCO document, a folder of label maps), so
that most cases get past the first check and reach the code behind it. Text that no Python value dumps to
(YAML tags and aliases, a float written ``1e-4``, JSON nested a million levels deep, a 5000-digit number) is
put in place through :class:`Raw`: the value is dumped as a placeholder, which is then replaced by the text.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import yaml
from hypothesis import strategies as st


@dataclass(frozen=True)
class Raw:
    """Text put verbatim into a YAML or JSON document where this value stands."""

    text: str


# ---------------------------------------------------------------------------------------------- values
SPECIAL_NUMBERS = [0, 1, -1, -5, 2, 3, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -2**63 - 1, 10**30,
                   0.5, -0.5, 1.5, 1e-12, 1e308, -1e308, 5e-324, -0.0, float("nan"), float("inf"), float("-inf"),
                   True, False]
SPECIAL_STRINGS = ["", " ", "null", "None", "nan", "inf", "1e-4", "0x10", "true", "abc", "auto", "gpu", "cuda",
                   "SGD", "ResNet", "/", ".", "..", "../..", "~", "-1", "\x00", "a\x00b", "\t", "\n", "é",
                   "\u202eabc", "日本語", "a" * 5000, "${seed}", "${env:HOME}", "${nope}", "%s%n", "{}", "[]",
                   "type", "bbox/AP", "mIoU", "__class__"]
printable_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
special_numbers = st.sampled_from(SPECIAL_NUMBERS)
leaf_values = st.one_of(special_numbers, st.sampled_from(SPECIAL_STRINGS), st.none(), st.integers(-10, 10), st.floats(),
                        printable_text, special_numbers)
structures = st.recursive(
    leaf_values,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["type", "lr", "a", "", "0", "_base_", "_delete_"]) | printable_text,
                      children, max_size=3),
    max_leaves=10)

# YAML that no dumped Python value reads as: YAML 1.1 quirks, tags, aliases, interpolations, sizes
RAW_YAML = [
    "1e-4", "1.0e-4", "-1e-4", "1E5", "1e400", "-.inf", ".NaN", "0x10", "0o17", "017", "1_000", "+12", "yes", "No",
    "off", "~", "Null", "2001-12-14", "12:30:45",
    "!!python/object/apply:os.system ['true']", "!!python/name:os.system", "!!python/tuple [1, 2]",
    "!!binary aGVsbG8=", "!!set {a, b}", "!!timestamp 2001-12-14", "!custom 3", "!!float abc", "!!int 1.5",
    "!!str", "!!map []", "!!omap [a: 1]",
    "*undefined", "&a [*a]", "&b {x: *b}", "&c {<<: *c}", "{<<: {type: SGD}, lr: 0.1}", "{<<: 5}",
    "${env:HOME}", "${env:SEGKIT_FUZZ_UNSET}", "${env:SEGKIT_FUZZ_UNSET,1e-3}", "${oc.env:HOME}", "${seed}",
    "${nope.key}", "${optimizer}", "'${data}'", "'x${seed}y'", "${${seed}}", "'${'", "$", "'${model.backbone}'",
    "[" * 5000 + "]" * 5000, "{a: " * 2000 + "1" + "}" * 2000, "'" + "x" * 200_000 + "'",
    "[" + ", ".join(["0"] * 200_000) + "]", "1" * 5000, "-" + "9" * 4400, '"\\x00"', '"\\ud800"', '"\\uffff"',
    "'a\tb'", "|", ">", "? [a, b]", "[a, b]: 1", "{[a]: 1}", "&x 1", "{a: 1, a: 2}",
]


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """A one-line YAML list whose aliases expand to ``width ** levels`` strings ("billion laughs")."""
    names = [f"l{i}" for i in range(levels)]
    parts = [f"&{names[0]} [" + ", ".join(["lol"] * width) + "]"]
    for prev, name in zip(names, names[1:]):
        parts.append(f"&{name} [" + ", ".join([f"*{prev}"] * width) + "]")
    return "[" + ", ".join(parts) + "]"


# one value in a config: mostly a single scalar, so that the case gets past the type checks of its neighbours
# how many things one case breaks: mostly one, so that the others let it reach the code behind the first check
# (hypothesis draws the first and the last entry of a list more often than the others: both are the common choice)
FEW = st.sampled_from([1, 1, 1, 2, 2, 3, 1, 1])
yaml_values = st.one_of(leaf_values, st.sampled_from([Raw(t) for t in RAW_YAML] + [Raw(alias_bomb())]), structures,
                        leaf_values)


def short(value: Any) -> str:
    """``repr(value)`` cut to a length that fits in a note."""
    text = repr(value.text if isinstance(value, Raw) else value)
    return text if len(text) < 60 else text[:40] + f"...({len(text)} chars)"


def _with_placeholders(tree: Any, raws: list[str]) -> Any:
    """``tree`` with every :class:`Raw` replaced by a placeholder string naming its index in ``raws``."""
    if isinstance(tree, Raw):
        raws.append(tree.text)
        return f"RAWVALUE{len(raws) - 1}END"
    if isinstance(tree, dict):
        return {k: _with_placeholders(v, raws) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_with_placeholders(v, raws) for v in tree]
    return tree


def dump_yaml(tree: Any) -> str:
    """YAML text of ``tree``, :class:`Raw` values written verbatim (in flow style, so one line each)."""
    raws: list[str] = []
    text = yaml.safe_dump(_with_placeholders(tree, raws), sort_keys=False, allow_unicode=True, width=10**9)
    for index, raw in enumerate(raws):
        text = text.replace(f"RAWVALUE{index}END", raw)
    return text


def dump_json(tree: Any) -> str:
    """JSON text of ``tree`` (NaN and Infinity as Python writes them), :class:`Raw` values verbatim."""
    raws: list[str] = []
    text = json.dumps(_with_placeholders(tree, raws))
    for index, raw in enumerate(raws):
        text = text.replace(f'"RAWVALUE{index}END"', raw)
    return text


# ---------------------------------------------------------------------------------------------- tree edits
def get_path(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: Any, path: tuple, value: Any) -> None:
    """Set ``value`` at ``path``, creating mappings on the way (replacing a scalar in the way)."""
    node = tree
    for key in path[:-1]:
        if isinstance(node, dict):
            if not isinstance(node.get(key), (dict, list)):
                node[key] = {}
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return
    if isinstance(node, dict) or (isinstance(node, list) and isinstance(path[-1], int) and path[-1] < len(node)):
        node[path[-1]] = value


def delete_path(tree: Any, path: tuple) -> None:
    try:
        parent = get_path(tree, path[:-1])
        del parent[path[-1]]
    except (KeyError, IndexError, TypeError):
        pass


def all_paths(tree: Any, prefix: tuple = (), limit: int = 5000) -> list[tuple]:
    """Every path to a value in ``tree`` (mappings and lists), breadth first, at most ``limit``."""
    out, queue = [], [(prefix, tree)]
    while queue and len(out) < limit:
        path, node = queue.pop(0)
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            out.append(path + (key,))
            queue.append((path + (key,), value))
    return out


# ---------------------------------------------------------------------------------------------- whole files
def encodings(text: str) -> dict[str, Callable[[], bytes]]:
    """Ways to write ``text`` as bytes that a reader must either accept or refuse with a message."""
    body = text.encode("utf-8")
    return {
        "utf-8": lambda: body,
        "utf-8 with BOM": lambda: b"\xef\xbb\xbf" + body,
        "utf-16 with BOM": lambda: text.encode("utf-16"),
        "utf-16-le without BOM": lambda: text.encode("utf-16-le"),
        "utf-32 with BOM": lambda: text.encode("utf-32"),
        "a latin-1 byte in a comment": lambda: body + b"\n# caf\xe9\n",
        "latin-1 text": lambda: text.encode("latin-1", errors="replace") + "\n# café\n".encode("latin-1"),
        "a NUL byte": lambda: body[: len(body) // 2] + b"\x00" + body[len(body) // 2:],
        "invalid UTF-8 in the middle": lambda: body[: len(body) // 3] + b"\xff\xfe\xc3(" + body[len(body) // 3:],
        "CRLF line ends": lambda: body.replace(b"\n", b"\r\n"),
        "CR line ends": lambda: body.replace(b"\n", b"\r"),
        # cut after a whole line: cut inside a line, a data path could become a prefix of itself, a folder
        # outside the sandbox that the (valid) config then rightly writes to
        "truncated": lambda: body[: body.rfind(b"\n", 0, len(body) * 2 // 3) + 1],
        "empty": lambda: b"",
        "only whitespace": lambda: b"  \n\n",
    }


ENCODING_NAMES = list(encodings("").keys())
# most cases keep plain UTF-8, so that the other edits reach the reader
mostly_utf8 = st.sampled_from(["utf-8"] * len(ENCODING_NAMES) + ENCODING_NAMES + ["utf-8"] * len(ENCODING_NAMES))


def encode(text: str, how: str) -> bytes:
    return encodings(text)[how]()


# ---------------------------------------------------------------------------------------------- images
def png_bytes(array: Any, mode: str | None = None) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int, *, rows: int = 1) -> bytes:
    """A grey PNG whose header declares ``width`` x ``height`` but whose data holds ``rows`` rows of zeros
    (at most 64 kB of them)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = zlib.compress(b"\x00" * min((width + 1) * rows, 1 << 16))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


@lru_cache(maxsize=None)
def png_bomb(side: int = 20_000) -> bytes:
    """A valid grey PNG of ``side`` x ``side`` zeros: a few hundred kB that decode to ``side**2`` bytes."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    compressor = zlib.compressobj(1)
    row = b"\x00" * (side + 1)
    parts = [compressor.compress(row * 500) for _ in range(side // 500)]
    parts.append(compressor.compress(row * (side % 500)))
    parts.append(compressor.flush())
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")
