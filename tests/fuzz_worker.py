"""A long-lived process that runs ``segkit.cli.main(argv)`` once per request, for the command-line fuzz tests.

Started by :class:`fuzz_harness.CliWorker` as ``python fuzz_worker.py MEMORY_BYTES``. Importing torch and
Lightning takes seconds, so one process serves many cases. It reads one JSON request per line on stdin::

    {"argv": [...], "cwd": DIR, "env": {"HOME": ..., "TMPDIR": ..., "SEGKIT_DATA": ...},
     "stdout": FILE, "stderr": FILE, "sandbox": DIR}

runs the command with its file descriptors 1 and 2 sent to the two files (so that output written by native code
is caught as well), and answers one JSON line on the pipe it was started with as its stdout::

    {"code": EXIT_STATUS, "seconds": WALL_TIME, "writes": [[EVENT, PATH], ...]}

``code`` is what the interpreter would exit with: ``main``'s return value, a ``SystemExit`` code, or 1 with the
traceback printed to the stderr file for an exception that escapes ``main``. ``writes`` lists every file-system
change made from Python (an audit hook: opening for writing, renaming, deleting, creating folders...) to a path
outside ``sandbox``; writes by native code are not seen here and are found by the harness comparing folders.

An address-space limit (``RLIMIT_AS``) makes an attempt to allocate a huge amount of memory fail at once
instead of swapping the machine; a crash (a signal) ends this process, which the harness reports.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
import traceback
from typing import Any

# audit events that change the file system, and the argument that holds the path
_WRITE_EVENTS = {"os.rename": (0, 1), "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.symlink": (1,),
                 "os.link": (1,), "os.truncate": (0,), "os.chmod": (0,), "os.chown": (0,), "os.utime": (0,),
                 "shutil.rmtree": (0,), "shutil.move": (1,), "shutil.copyfile": (1,), "shutil.copytree": (1,)}
# places a process legitimately writes to that are not files (terminals, shared memory, /proc settings)
_SPECIAL_ROOTS = ("/dev/", "/proc/", "/sys/")


class _WriteAudit:
    """Records the file-system changes a command makes outside its sandbox (from Python code)."""

    def __init__(self) -> None:
        self.sandbox: str | None = None
        self.outside: list[list[str]] = []

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if self.sandbox is None:
            return
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing:
                self._check(event, path)
        elif event in _WRITE_EVENTS:
            for index in _WRITE_EVENTS[event]:
                if index < len(args):
                    self._check(event, args[index])

    def _check(self, event: str, path: Any) -> None:
        if isinstance(path, int) or path is None:
            return  # a file descriptor: its opening was seen
        try:
            text = os.fsdecode(path)
            full = os.path.abspath(text) if "\0" not in text else text
        except (TypeError, ValueError):
            return
        if full.startswith(_SPECIAL_ROOTS) or full == self.sandbox or full.startswith(self.sandbox + os.sep):
            return
        if len(self.outside) < 20:
            self.outside.append([event, full])


def _exit_code(exc: SystemExit) -> int:
    """The status the interpreter exits with for ``exc``, printing a non-integer code as it would."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def _run(request: dict[str, Any], audit: _WriteAudit) -> dict[str, Any]:
    from segkit.cli import main

    os.environ.update(request["env"])
    tempfile.tempdir = None  # tempfile caches the folder: make it read TMPDIR again
    os.chdir(request["cwd"])
    saved = os.dup(1), os.dup(2)
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1), os.dup2(err, 2)
    os.close(out), os.close(err)
    audit.sandbox, audit.outside = os.path.abspath(request["sandbox"]), []
    start = time.perf_counter()
    try:
        code = main(list(request["argv"]))
        code = 0 if code is None else code
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:  # noqa: BLE001 - what escapes main is what the interpreter would print
        traceback.print_exc()
        code = 1
    finally:
        seconds = time.perf_counter() - start
        audit.sandbox = None
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        os.close(saved[0]), os.close(saved[1])
        os.chdir("/")
    return {"code": code if isinstance(code, int) else 1, "seconds": seconds, "writes": audit.outside}


def serve(memory_bytes: int) -> None:
    """Answer requests from stdin until it closes."""
    if memory_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    # requests and answers use copies of the pipes that were stdin and stdout: a command that reads its stdin
    # finds it empty, and its output goes to its own files
    requests = os.fdopen(os.dup(0), "r")
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    audit = _WriteAudit()
    sys.addaudithook(audit)
    # import the command and what its sub-commands load (torch, Lightning) once, before the first request
    import segkit.cli  # noqa: F401
    import segkit.engine.runner  # noqa: F401
    import segkit.evaluation.score  # noqa: F401

    answers.write(json.dumps({"ready": os.getpid()}) + "\n")
    for line in requests:
        if line.strip():
            answers.write(json.dumps(_run(json.loads(line), audit)) + "\n")


if __name__ == "__main__":
    serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
