"""Runs fuzz cases through the real ``segkit`` command and checks what every run must honour.

A case is a command line and the files it reads. Each runs in a fresh sandbox folder, the command's working
folder, which also holds its ``HOME``, ``TMPDIR`` and ``SEGKIT_DATA``::

    <cases>/<n>/            the sandbox (cwd)
        in/                 the case's files (configs, annotations, results, label maps), written here
        work/               the config's work_dir (the command writes here)
        out/                --out files and folders (the command writes here)
        home/ tmp/ data/    HOME, TMPDIR, SEGKIT_DATA

The command runs in one long-lived worker process (``fuzz_worker.py``, torch imported once). What every case
must show (checked by :meth:`FuzzRunner.run`):

- exit status 0, or 1 where the command documents it (``segkit data check`` finding errors), or 2 with stderr
  ending in one paragraph that starts ``segkit: error:``; nowhere a ``Traceback``;
- the interpreter alive (no signal: segmentation fault, abort, killed for memory) and an answer within the
  per-case limit (else a hang: the worker is killed and started again);
- nothing written outside the sandbox (its parent folder, the shared read-only inputs, the repository checkout,
  and every path Python code opened for writing), and inside it only under the folders the case allows
  (``work/``, ``out/``, ``data/``); no temporary file left in ``TMPDIR``, nothing in ``HOME``.

Each violation is recorded with a reproducer (the sandbox is kept: its ``in/`` files and the command line).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WORKER = Path(__file__).with_name("fuzz_worker.py")
REPO = Path(__file__).resolve().parent.parent
MEMORY_LIMIT = 6 * 1024**3  # address space of the worker: a huge allocation fails fast instead of swapping
CASE_TIMEOUT = 60.0  # seconds; a case that runs longer is a hang
START_TIMEOUT = 180.0  # importing torch on a busy machine
MAX_CASE_BYTES = 64 * 1024**2  # the files of one case
# files people create while the tests run (sources, editors' temporary files), never written by segkit
_NOT_FROM_SEGKIT = re.compile(r"(^|/)(\.[^/]+\.tmp|\.#[^/]*|[^/]*~|\.[^/]*\.sw[po]|[^/]+\.py|[^/]+\.md)$")
_ERROR_END = "(run with --debug to see the traceback)"


@dataclass
class Case:
    """One run of the command.

    Attributes:
        target: what is fuzzed (``config``, ``coco``, ``results``, ``semseg``...), for the counts.
        argv: the arguments after ``segkit``; ``{sandbox}`` in an argument is replaced by the sandbox path.
        files: ``{path relative to the sandbox: content}`` written before the run.
        writable: folders (relative to the sandbox) the command may write in.
        exit_one_allowed: whether exit status 1 is documented for this command (``segkit data check``).
        note: what was changed, shown with a failure.
        keep: keep the sandbox even when the case passes (its files are used afterwards).
    """

    target: str
    argv: list[str]
    files: dict[str, bytes] = field(default_factory=dict)
    writable: tuple[str, ...] = ("work", "out", "data")
    exit_one_allowed: bool = False
    note: str = ""
    keep: bool = False


@dataclass
class Outcome:
    """What a case did, and what it broke (``problems`` empty when it honoured every rule)."""

    code: int | None
    stdout: str
    stderr: str
    seconds: float
    problems: list[str]
    sandbox: Path
    kind: str = "ok"  # ok | crash | hang | traceback | bad-exit | bad-message | wrote-outside


class WorkerDied(Exception):
    """The worker process ended while running a case (a signal, or an exit from native code)."""


class WorkerHung(Exception):
    """The worker gave no answer within the per-case limit."""


class CliWorker:
    """The ``fuzz_worker.py`` process: started once, restarted after a crash or a hang."""

    def __init__(self, log: Path, *, memory_limit: int = MEMORY_LIMIT) -> None:
        self.log = log  # the worker's own stderr (what it prints outside the cases: a failure to start)
        self.memory_limit = memory_limit
        self.process: subprocess.Popen[str] | None = None
        self.ready = False
        self.restarts = 0

    def spawn(self) -> None:
        """Start the process; it imports torch while the caller prepares (see :meth:`run`)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
        env.pop("PYTEST_CURRENT_TEST", None)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(WORKER), str(self.memory_limit)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=log, text=True, env=env, cwd="/", start_new_session=True)
        self.ready = False

    def run(self, request: dict[str, Any], timeout: float = CASE_TIMEOUT) -> dict[str, Any]:
        """Run one request and return the answer; raises :class:`WorkerDied` or :class:`WorkerHung`."""
        if self.process is None or self.process.poll() is not None:
            self.spawn()
        if not self.ready:
            try:
                answer = self._answer(START_TIMEOUT)
            except (WorkerDied, WorkerHung) as exc:
                raise RuntimeError(f"the fuzz worker did not start ({exc}): {_tail(self.log, 3000)}") from None
            if "ready" not in answer:
                raise RuntimeError(f"the fuzz worker did not start: {answer}")
            self.ready = True
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._answer(timeout)

    def _answer(self, timeout: float) -> dict[str, Any]:
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self.process.stdout], [], [], 0.5)
            if ready:
                line = self.process.stdout.readline()
                if line:
                    return json.loads(line)
            # a dead worker's pipe can stay open in a data-loading process it forked: ask the process itself
            status = self.process.poll()
            if status is not None or ready:
                status = self.process.wait()
                self.kill()
                self.restarts += 1
                raise WorkerDied(_describe_status(status))
            if time.monotonic() > deadline:
                self.kill()
                self.restarts += 1
                raise WorkerHung(f"no answer within {timeout:.0f} s")

    def kill(self) -> None:
        """End the worker and everything it started (data-loading workers, DDP ranks)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self.process = None

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None and self.process.stdin is not None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


@contextlib.contextmanager
def memory_guard(extra: int = 8 * 1024**3) -> Iterator[None]:
    """Limit this process's address space to its present size plus ``extra`` bytes while the block runs.

    Generating cases happens in the test process: a generator that grows out of bounds then fails with a
    MemoryError instead of having the machine's out-of-memory killer end it (or another process).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * resource.getpagesize()
    limit = size + extra if hard == resource.RLIM_INFINITY else min(size + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _describe_status(status: int) -> str:
    if status < 0:
        name = signal.Signals(-status).name if -status in signal.Signals._value2member_map_ else str(-status)
        return f"killed by signal {name}"
    return f"the interpreter exited with status {status} in the middle of the command"


@dataclass
class Tally:
    """How the cases of one target ended."""

    cases: int = 0
    exits: Counter = field(default_factory=Counter)
    failures: int = 0
    seconds: float = 0.0  # in the command
    first: float = 0.0
    last: float = 0.0

    def line(self, target: str) -> str:
        exits = ", ".join(f"exit {code}: {n}" for code, n in sorted(self.exits.items(), key=lambda kv: str(kv[0])))
        return (f"{target}: {self.cases} cases ({exits}); {self.failures} broke a rule; "
                f"{self.last - self.first:.0f} s ({self.seconds:.0f} s in the command)")


class FuzzRunner:
    """Runs cases in sandboxes under ``root`` and checks each one.

    Args:
        root: folder of the sandboxes (each case gets ``root/cases/<n>``).
        protected: folders no case may change (the shared, read-only inputs).
        caches: folders inside ``protected`` where a command may add new entries but not change existing ones
            (a data cache the configs name, which other generation arguments add to).
        keep_passing: keep the sandboxes of cases that passed (default: delete them).
    """

    def __init__(self, root: Path, *, protected: list[Path] = (), caches: list[Path] = (),
                 keep_passing: bool = False) -> None:
        self.root = Path(root)
        self.cases_dir = self.root / "cases"
        self.cases_dir.mkdir(parents=True, exist_ok=True)
        self.protected = [Path(p) for p in protected]
        self.caches = [Path(p) for p in caches]
        self.keep_passing = keep_passing
        self.worker = CliWorker(self.root / "worker.log")
        self.tallies: dict[str, Tally] = {}
        self.failures: list[tuple[Case, Outcome]] = []
        self.counter = 0
        self.log = self.root / "fuzz_log.jsonl"

    # ------------------------------------------------------------------ running
    def run(self, case: Case) -> Outcome:
        """Run ``case`` in a new sandbox, check it, record the result and return it."""
        size = sum(len(content) for content in case.files.values())
        if size > MAX_CASE_BYTES:  # a generator out of bounds: stop before it fills the disk or memory
            raise ValueError(f"a {case.target} case of {size} bytes ({case.note[:200]})")
        self.counter += 1
        sandbox = self.cases_dir / f"{self.counter:05d}"
        for sub in ("in", "work", "out", "home", "tmp", "data"):
            (sandbox / sub).mkdir(parents=True)
        for rel, content in case.files.items():
            path = sandbox / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        argv = [a.replace("{sandbox}", str(sandbox)) for a in case.argv]
        for stream in ("stdout", "stderr"):  # never show the previous case's output with this one
            (self.root / f"{stream}.txt").unlink(missing_ok=True)
        before = self._state(sandbox)
        request = {"argv": argv, "cwd": str(sandbox), "sandbox": str(sandbox),
                   "stdout": str(self.root / "stdout.txt"), "stderr": str(self.root / "stderr.txt"),
                   "env": {"HOME": str(sandbox / "home"), "TMPDIR": str(sandbox / "tmp"),
                           "SEGKIT_DATA": str(sandbox / "data")}}
        start = time.monotonic()
        try:
            answer = self.worker.run(request)
            code, writes, kind = answer["code"], answer["writes"], None
        except WorkerDied as exc:
            code, writes, kind = None, [], ("crash", f"crashed the interpreter: {exc}")
        except WorkerHung as exc:
            code, writes, kind = None, [], ("hang", f"hung: {exc}")
        seconds = time.monotonic() - start
        stdout, stderr = _tail(self.root / "stdout.txt"), _tail(self.root / "stderr.txt")
        outcome = Outcome(code, stdout, stderr, seconds, [], sandbox)
        if kind is not None:
            outcome.kind, outcome.problems = kind[0], [kind[1]]
        else:
            self._check_exit(case, outcome)
        self._check_writes(case, sandbox, before, writes, outcome)
        self._record(case, argv, outcome)
        return outcome

    def close(self) -> None:
        self.worker.close()

    # ------------------------------------------------------------------ checks
    def _check_exit(self, case: Case, outcome: Outcome) -> None:
        code, err = outcome.code, outcome.stderr
        if "Traceback (most recent call last)" in err:
            outcome.kind = "traceback"
            outcome.problems.append(f"exit {code} with a traceback: {last_lines(err, 3)}")
        if code == 2:
            problem = error_paragraph_problem(err)
            if problem:
                outcome.kind = "traceback" if outcome.kind == "traceback" else "bad-message"
                outcome.problems.append(problem)
        elif code == 1 and case.exit_one_allowed:
            pass
        elif code != 0:
            if outcome.kind == "ok":
                outcome.kind = "bad-exit"
            outcome.problems.append(f"exit status {code} (allowed: 0, 2{', 1' if case.exit_one_allowed else ''})")

    def _state(self, sandbox: Path) -> dict[str, Any]:
        return {"sandbox": _listing(sandbox), "parent": sorted(os.listdir(self.cases_dir)),
                "root": sorted(os.listdir(self.root)), "protected": [_listing(p) for p in self.protected],
                "repo": _repo_status()}

    def _check_writes(self, case: Case, sandbox: Path, before: dict[str, Any], writes: list,
                      outcome: Outcome) -> None:
        after = self._state(sandbox)
        problems = []
        allowed = tuple(f"{w}/" for w in case.writable)
        for rel, stat in sorted(after["sandbox"].items()):
            if before["sandbox"].get(rel) != stat and not (rel + "/").startswith(allowed):
                problems.append(f"changed {rel} in the sandbox (allowed: {', '.join(case.writable)})")
        for rel in sorted(set(before["sandbox"]) - set(after["sandbox"])):
            if not (rel + "/").startswith(allowed):
                problems.append(f"removed {rel} from the sandbox")
        if set(after["parent"]) != set(before["parent"]):
            changed = sorted(set(after["parent"]) ^ set(before["parent"]))
            problems.append(f"changed the folder above the sandbox: {changed}")
        extra_root = set(after["root"]) - set(before["root"]) - {"stdout.txt", "stderr.txt", "fuzz_log.jsonl",
                                                                 "worker.log"}
        if extra_root:
            problems.append(f"wrote {sorted(extra_root)} next to the sandboxes")
        for folder, old, new in zip(self.protected, before["protected"], after["protected"]):
            changed = sorted(rel for rel in set(old) | set(new) if old.get(rel) != new.get(rel)
                             and not (rel not in old and self._in_cache(folder / rel)))
            if changed:
                problems.append(f"changed the shared read-only inputs in {folder}: {changed[:5]}")
        new_repo = after["repo"] - before["repo"]
        if new_repo:
            problems.append(f"wrote into the repository checkout: {sorted(new_repo)}")
        for event, path in writes:
            if not self._in_cache(Path(path)):
                problems.append(f"{event} outside the sandbox: {path}")
        if problems:
            outcome.problems.extend(problems[:10])
            if outcome.kind == "ok":
                outcome.kind = "wrote-outside"

    def _in_cache(self, path: Path) -> bool:
        return any(path.is_relative_to(cache) for cache in self.caches)

    # ------------------------------------------------------------------ bookkeeping
    def _record(self, case: Case, argv: list[str], outcome: Outcome) -> None:
        tally = self.tallies.setdefault(case.target, Tally(first=time.monotonic() - outcome.seconds))
        tally.last = time.monotonic()
        tally.cases += 1
        tally.seconds += outcome.seconds
        tally.exits[outcome.code if outcome.code is not None else outcome.kind] += 1
        entry = {"target": case.target, "argv": argv, "code": outcome.code, "kind": outcome.kind,
                 "seconds": round(outcome.seconds, 2), "note": case.note, "sandbox": str(outcome.sandbox),
                 "problems": outcome.problems}
        if outcome.problems:
            for stream in ("stdout", "stderr"):  # kept with the case, beside its folders
                if (self.root / f"{stream}.txt").exists():
                    shutil.copyfile(self.root / f"{stream}.txt", outcome.sandbox / f"{stream}.txt")
            tally.failures += 1
            self.failures.append((case, outcome))
            entry["stderr_tail"] = last_lines(outcome.stderr, 12)
            entry["signature"] = signature(case, outcome)
        elif not (self.keep_passing or case.keep):
            shutil.rmtree(outcome.sandbox, ignore_errors=True)
        with open(self.log, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def report(self, target: str, limit: int = 8) -> str:
        """The distinct failures of ``target`` (one example each), for an assertion message."""
        groups: dict[str, list[tuple[Case, Outcome]]] = {}
        for case, outcome in self.failures:
            if case.target == target:
                groups.setdefault(signature(case, outcome), []).append((case, outcome))
        lines = [f"{self.tallies[target].line(target)}; {len(groups)} distinct failures:"]
        for sig, members in list(groups.items())[:limit]:
            case, outcome = members[0]
            lines.append(f"\n* {sig} ({len(members)} cases)\n  {reproducer(case, outcome)}\n"
                         f"  problems: {'; '.join(outcome.problems)[:800]}\n"
                         f"  stderr: {last_lines(outcome.stderr, 6)[:1200]}")
        return "\n".join(lines)


def reproducer(case: Case, outcome: Outcome) -> str:
    """A shell line that reruns the case in its kept sandbox."""
    argv = [a.replace("{sandbox}", str(outcome.sandbox)) for a in case.argv]
    env = " ".join(f"{k}={outcome.sandbox / v}" for k, v in (("HOME", "home"), ("TMPDIR", "tmp"),
                                                              ("SEGKIT_DATA", "data")))
    note = f"   # {case.note}" if case.note else ""
    return f"cd {outcome.sandbox} && {env} segkit --debug {shlex.join(argv)}{note}"


def error_paragraph_problem(stderr: str) -> str | None:
    """What is wrong with the error report at the end of ``stderr`` (None: one paragraph as promised)."""
    lines = stderr.rstrip("\n").split("\n")
    starts = [i for i, line in enumerate(lines) if line.startswith("segkit: error:")]
    if not starts:
        return f"exit 2 without a 'segkit: error:' paragraph: {last_lines(stderr, 3)}"
    if len(starts) > 1:
        return "more than one 'segkit: error:' paragraph"
    paragraph = lines[starts[0]:]
    if paragraph[-1] != _ERROR_END:
        return f"the error paragraph is not the end of stderr: {last_lines(stderr, 3)}"
    if any(not line.strip() for line in paragraph):
        return "the error message is more than one paragraph (blank line inside)"
    return None


def signature(case: Case, outcome: Outcome) -> str:
    """A key that groups failures with one cause: the kind, the command and where the traceback ends."""
    command = " ".join(a for a in case.argv[:3] if not a.startswith(("{", "/")) and "=" not in a)[:40]
    if outcome.kind in ("crash", "hang"):
        return f"{outcome.kind}: {command}: {outcome.problems[0][:80]}"
    frames = re.findall(r'File "([^"]+)", line \d+, in (\S+)', outcome.stderr)
    segkit_frames = [f"{Path(f).name}:{fn}" for f, fn in frames if "/segkit/" in f or "/plugins/" in f]
    last = last_lines(outcome.stderr, 1)
    error = re.match(r"(\w+(?:\.\w+)*(?:Error|Exception|Warning|Interrupt))", last)
    where = segkit_frames[-1] if segkit_frames else (f"{Path(frames[-1][0]).name}:{frames[-1][1]}" if frames else "")
    return f"{outcome.kind}: {command}: {error.group(1) if error else ''} {where}".strip()


def last_lines(text: str, n: int) -> str:
    lines = [line for line in text.rstrip().split("\n") if line.strip()]
    return " | ".join(lines[-n:])


def _tail(path: Path, limit: int = 200_000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of everything under ``folder`` (folders with size -1)."""
    out: dict[str, tuple[int, int]] = {}
    if not folder.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(folder):
        rel_dir = os.path.relpath(dirpath, folder)
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            try:
                st = os.lstat(path)
            except OSError:
                continue
            is_dir = name in dirnames
            out[rel] = (-1, 0) if is_dir else (st.st_size, st.st_mtime_ns)
    return out


def _repo_status() -> set[str]:
    """Untracked and ignored entries of the checkout (``git status``): where a stray write would appear.

    Changes to tracked files, new sources and editors' temporary files are left out: the commands never write
    those, and people editing the checkout while the tests run would be blamed on the case. (Every write from
    Python code to the checkout is seen by the worker's audit hook anyway.)
    """
    try:
        result = subprocess.run(["git", "status", "--porcelain", "-z", "--untracked-files=normal",
                                 "--ignored=matching"], cwd=REPO, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    items = result.stdout.decode("utf-8", errors="replace").split("\0")
    return {item[3:] for item in items if item[:2] in ("??", "!!") and not _NOT_FROM_SEGKIT.search(item[3:])}
