"""Crash-safe file writing: write to a temporary sibling, flush, then rename into place.

Every file segkit writes goes through :func:`atomic_open`. A write that cannot be done (a full
disk, a used-up quota, a read-only file system, no permission, a folder where the file should go,
a file where a folder should be) raises :class:`FileWriteError`, which names the file, the reason
and the fix; the previous content of the file is left as it was and no temporary file remains.
:func:`make_folder` gives the same errors for output folders.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from typing import IO, Any

from segkit.errors import UserError

__all__ = ["FileWriteError", "atomic_open", "atomic_write_text", "atomic_write_json", "make_folder", "write_error",
           "why_not_writable", "WRITE_ERRNOS"]

# errno values that say the file system refused a write (as opposed to a bug in the caller).
_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_ALLOWED = {errno.EROFS, errno.EACCES, errno.EPERM}
_IN_THE_WAY = {errno.ENOTDIR, errno.EEXIST, errno.EISDIR}
WRITE_ERRNOS = frozenset(_SPACE | _NOT_ALLOWED | _IN_THE_WAY | {errno.ENAMETOOLONG, errno.EIO})


class FileWriteError(UserError):
    """A file or folder could not be written; whatever was there before is intact.

    Attributes:
        path: the file (or folder) that could not be written.
        errno: the operating system's error number.
    """

    def __init__(self, message: str, *, path: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno


def why_not_writable(exc: OSError, path: str) -> tuple[str, str]:
    """``(reason, fix)`` in words for an ``OSError`` that stopped writing ``path``.

    Example:
        >>> why_not_writable(OSError(errno.ENOSPC, "No space left on device"), "a.json")[0]
        'there is no space left on the device'
    """
    code = exc.errno
    if code == errno.ENOSPC:
        return "there is no space left on the device", "free some space or write to another disk"
    if code == errno.EDQUOT:
        return "the disk quota is used up", "free some space or write to another disk"
    if code == errno.EFBIG:
        return "the file is larger than the file system allows", "write to another file system"
    if code == errno.EROFS:
        return "the file system is read-only", "choose a folder on a file system you can write to"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied", "choose a folder you can write to"
    if code in (errno.ENOTDIR, errno.EEXIST):
        blocker = _file_in_the_way(path)
        if blocker is not None:
            return f"'{blocker}' is a file, not a folder", "move that file away or choose another path"
    if code == errno.EISDIR or os.path.isdir(path):
        return f"'{path}' is a folder", "give the path of a file, not of a folder"
    if code == errno.ENAMETOOLONG:
        return "the name is too long for the file system", "choose a shorter path"
    if code == errno.EIO:
        return ("input/output error (a failing disk, or a network file system that went away)",
                "check the disk or write elsewhere")
    return (exc.strerror or str(exc)), "choose another path"


def _file_in_the_way(path: str) -> str | None:
    """The first existing ancestor of ``path`` (or ``path`` itself) that is not a folder."""
    current = os.path.abspath(path)
    while True:
        if os.path.lexists(current):
            return None if os.path.isdir(current) else current
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


def _os_error_in(exc: BaseException) -> OSError | None:
    """``exc`` or the ``OSError`` that caused it (``torch.save`` reports a failed write as a ``RuntimeError``
    raised while handling the ``OSError``)."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 16:
        if isinstance(current, OSError):
            return current
        current = current.__cause__ or current.__context__
        seen += 1
    return None


def write_error(path: str | os.PathLike[str], exc: BaseException, *, what: str = "",
                hint: str = "") -> FileWriteError | None:
    """The :class:`FileWriteError` that explains why writing ``path`` failed with ``exc``, or ``None``
    when ``exc`` is not the file system refusing a write (then it is a bug to report as it is).

    Args:
        path: the file being written.
        exc: the exception raised while writing (an ``OSError``, or an error caused by one).
        what: what the file is, for the message (``"the checkpoint"``).
        hint: a sentence appended to the message (how to continue afterwards).
    """
    os_error = _os_error_in(exc)
    if os_error is None or os_error.errno not in WRITE_ERRNOS:
        return None
    path = os.fspath(path)
    reason, fix = why_not_writable(os_error, path)
    subject = f"{what} '{path}'" if what else f"'{path}'"
    kept = " The previous file is intact." if os.path.isfile(path) else ""
    message = f"cannot write {subject}: {reason}.{kept} To fix it, {fix}." + (f" {hint}" if hint else "")
    return FileWriteError(message, path=path, errno=os_error.errno)


def make_folder(path: str | os.PathLike[str], *, what: str = "the folder", hint: str = "") -> str:
    """Create the folder ``path`` and its parents unless it exists; returns ``path``.

    Raises:
        FileWriteError: it cannot be created (a file in the way, a read-only file system, no permission),
            naming the folder, the reason and the fix.
    """
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise _folder_error(path, exc, what=what, hint=hint) from exc
    return path


def _folder_error(path: str, exc: OSError, *, what: str, hint: str) -> FileWriteError:
    reason, fix = why_not_writable(exc, path)
    return FileWriteError(f"cannot create {what} '{path}': {reason}. To fix it, {fix}." + (f" {hint}" if hint else ""),
                          path=path, errno=exc.errno)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", *, what: str = "", hint: str = "",
                temporary: str | None = None, **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success it replaces ``path`` atomically.

    If the block raises, ``path`` keeps its previous content and the temporary file is removed.
    The file gets the permissions a plain ``open`` would give it (``0o666`` less the umask), not
    the owner-only mode of a temporary file.

    Args:
        path: the file to write.
        mode: a writing mode of :func:`open` (``"w"``, ``"wb"``).
        what, hint: how a :class:`FileWriteError` names the file and what it adds (see :func:`write_error`).
        temporary: the temporary file's path (default: a unique hidden name in ``path``'s folder).

    Raises:
        FileWriteError: the file system refused the write (full disk, read-only, no permission, a folder
            at ``path`` or a file where a parent folder should be).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp: str | None = None
    try:
        os.makedirs(directory, exist_ok=True)
        if temporary is None:
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
            os.close(fd)
        else:
            tmp = temporary
        f = open(tmp, mode, **kwargs)  # noqa: SIM115 - closed below; by name, so that f.name says where it writes
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise (write_error(path, exc, what=what, hint=hint) or exc) from exc
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        error = write_error(path, exc, what=what, hint=hint) if isinstance(exc, Exception) else None
        if error is None:
            raise
        raise error from exc


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask alone sets it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike[str], text: str, **kwargs: Any) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; keyword arguments as :func:`atomic_open`."""
    with atomic_open(path, "w", encoding="utf-8", **kwargs) as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike[str], data: Any, **kwargs: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically; keyword arguments as :func:`atomic_open`."""
    with atomic_open(path, "w", encoding="utf-8", **kwargs) as f:
        json.dump(data, f, indent=2, sort_keys=False, allow_nan=True)
        f.write("\n")
