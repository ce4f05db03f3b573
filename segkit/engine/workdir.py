"""Guarding a run's ``work_dir``: one training run at a time, and a clean stop on Ctrl+C.

:func:`lock_work_dir` takes an exclusive ``flock`` on ``work_dir/.segkit.lock`` for the life of the
process. A second run pointed at the same folder is refused with a message naming the running one,
so two runs never interleave their checkpoints, logs and ``metrics.json``. The operating system
releases the lock when the process ends in any way (even ``kill -9``), so a crashed run never
leaves a stale lock. Forked children (DataLoader workers) close their copy of the descriptor at
once: a ``flock`` belongs to the open file, so a worker still winding down after its parent was
killed would otherwise keep the folder locked for seconds. Only the launching process (local rank
0 of node 0) takes it: the other DDP processes Lightning starts share the folder by design.

:class:`SaveOnInterrupt` writes ``checkpoints/interrupted.ckpt`` when training is stopped with
Ctrl+C (SIGINT) or SIGTERM (what cluster schedulers such as SLURM and Kubernetes send before they
kill a job; Lightning stops at the end of the current batch), and says how to continue.
``last.ckpt`` (the end of the last complete epoch) is left as it is, so ``--resume auto`` still
replays the run exactly from an epoch boundary. The command then exits with a non-zero status
(1 after Ctrl+C, 143 after SIGTERM, as a shell reports a process ended by that signal).
"""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.utilities.exceptions import SIGTERMException

from segkit.errors import UserError
from segkit.fileio import WRITE_ERRNOS, FileWriteError, atomic_open, why_not_writable, write_error

__all__ = ["WorkDirBusy", "lock_work_dir", "prepare_work_dir", "SaveOnInterrupt", "is_termination", "is_worker_death",
           "worker_death", "ended_by_sigterm", "RunCSVLogger",
           "writes_reported_once", "LOCK_NAME", "INTERRUPTED_NAME"]

LOCK_NAME = ".segkit.lock"
INTERRUPTED_NAME = "interrupted.ckpt"


_held: weakref.WeakSet[Any] = weakref.WeakSet()  # lock files this process holds


def _close_in_child() -> None:
    for handle in list(_held):
        try:
            handle.close()
        except OSError:
            pass
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class WorkDirBusy(UserError):
    """Another segkit run holds the work_dir."""


def _is_launcher_process() -> bool:
    return int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0


_WORK_DIR_FIX = "set work_dir (in the config, or work_dir=... on the command line) to a folder you can write to"


def prepare_work_dir(work_dir: str) -> str:
    """Create ``work_dir`` (and its parents) unless it exists; returns it.

    Raises:
        FileWriteError: it cannot be a run's folder: it is a file, a file is in the way, or the file
            system refuses (read-only, no permission, full); naming the folder, the reason and the fix.
    """
    try:
        os.makedirs(work_dir, exist_ok=True)
    except OSError as exc:
        raise _unusable(work_dir, exc) from exc
    return work_dir


def _unusable(work_dir: str, exc: OSError) -> FileWriteError:
    reason, _ = why_not_writable(exc, work_dir)
    return FileWriteError(f"work_dir '{work_dir}' cannot hold the run: {reason}. To fix it, {_WORK_DIR_FIX}.",
                          path=work_dir, errno=exc.errno)


def lock_work_dir(work_dir: str) -> Any | None:
    """Hold ``work_dir`` for this process; returns the open lock file (keep it referenced).

    Returns ``None`` (no lock) in DDP worker processes and where ``fcntl`` does not exist.

    Raises:
        WorkDirBusy: another live process holds it; the message names its pid, host and start time.
        FileWriteError: the folder cannot be created or written (see :func:`prepare_work_dir`).
    """
    if not _is_launcher_process():
        return None
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks
        return None
    path = os.path.join(prepare_work_dir(work_dir), LOCK_NAME)
    try:
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the process's life
    except OSError as exc:  # the first file a run writes: a read-only or foreign folder shows here
        raise _unusable(work_dir, exc) from exc
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise WorkDirBusy(
            f"work_dir '{work_dir}' is in use by another segkit run ({holder}). Two runs in one folder would "
            f"overwrite each other's checkpoints and logs: wait for that run to finish, or give this one "
            f"its own folder (work_dir=...)."
        ) from None
    note = f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
    try:  # unbuffered, so that a failed write leaves nothing pending in the file object
        os.ftruncate(handle.fileno(), 0)
        os.pwrite(handle.fileno(), note.encode("utf-8"), 0)
    except OSError:
        # A full disk: the lock holds without its note (which only names the holder), and the run's
        # first real file (config.yaml) reports the disk with its name.
        with contextlib.suppress(OSError):
            os.ftruncate(handle.fileno(), 0)
    _held.add(handle)
    return handle


@contextlib.contextmanager
def _workers_may_end() -> Iterator[None]:
    """Run a block without PyTorch's SIGCHLD handler, which raises in the main process when a data-loading
    worker dies: once training stops, the workers' end (from the same signal) must not cut the save short."""
    if not hasattr(signal, "SIGCHLD") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        yield
    finally:
        if previous is not None:  # None: a handler set outside Python, which SIG_DFL replaced for good
            signal.signal(signal.SIGCHLD, previous)


@contextlib.contextmanager
def writes_reported_once() -> Iterator[None]:
    """Run a block in which a helper thread that dies of a refused write (TensorBoard writes its event
    files in one) prints nothing: the writer hands the error to the main thread, which reports it as one
    message naming the file, instead of a thread's traceback beside it."""
    original = threading.excepthook

    def hook(args: Any) -> None:
        if isinstance(args.exc_value, OSError) and args.exc_value.errno in WRITE_ERRNOS:
            return
        original(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = original


def is_termination(exception: BaseException) -> bool:
    """Whether ``exception`` is Lightning's way of ending training after a SIGTERM."""
    return isinstance(exception, SIGTERMException)


def worker_death(exception: BaseException | None) -> RuntimeError | None:
    """PyTorch's report of a DataLoader worker that ended, where ``exception`` is it or was caused by it.

    The report is raised wherever the main process happens to be when the worker's end is noticed, so it
    may arrive wrapped: a logger that was writing a scalar re-raises it as a ``ValueError``, for one.
    """
    while exception is not None:
        text = str(exception)
        if isinstance(exception, RuntimeError) and "DataLoader worker" in text and (
                "exited unexpectedly" in text or "killed by signal" in text):
            return exception
        exception = exception.__cause__ or exception.__context__
    return None


def is_worker_death(exception: BaseException | None) -> bool:
    """Whether ``exception`` (or what caused it) is PyTorch's report of a DataLoader worker that ended."""
    return worker_death(exception) is not None


def ended_by_sigterm(trainer: pl.Trainer, exception: BaseException, *, wait: float = 1.0) -> bool:
    """Whether training ended because this process or its job received SIGTERM.

    A SIGTERM sent to the whole job (SLURM's scancel) also ends the data-loading workers, and the main
    process may see a worker's end before its own signal handler has run: for a worker's death, the
    signal is waited for up to ``wait`` seconds (sleeping lets Python run the pending handler).
    """
    if is_termination(exception) or trainer.received_sigterm:
        return True
    if not is_worker_death(exception):
        return False
    if "killed by signal: Terminated" in str(exception):
        return True
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        time.sleep(0.02)
        if trainer.received_sigterm:
            return True
    return False


class SaveOnInterrupt(pl.Callback):
    """On Ctrl+C or SIGTERM during training, save ``checkpoints/interrupted.ckpt`` and say how to continue."""

    def __init__(self, ckpt_dir: str) -> None:
        self.ckpt_dir = ckpt_dir

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning's SIGTERM handler is in place now. A job's SIGTERM also ends the data-loading workers,
        # and PyTorch's SIGCHLD handler would raise their death at whatever line runs next (inside a
        # logging call, a finally block): put it aside first, then let Lightning stop training. Lightning
        # restores the handlers it found when training ends.
        if not hasattr(signal, "SIGCHLD") or threading.current_thread() is not threading.main_thread():
            return
        lightning = signal.getsignal(signal.SIGTERM)

        def quiet_workers_then_stop(signum: int, frame: Any) -> None:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            if callable(lightning):
                lightning(signum, frame)

        signal.signal(signal.SIGTERM, quiet_workers_then_stop)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # A SIGTERM sent to the whole process group (SLURM's scancel) also ends the data-loading workers;
        # their death may reach training before Lightning's own stop does.
        terminated = ended_by_sigterm(trainer, exception)
        if not (terminated or isinstance(exception, KeyboardInterrupt)) or trainer.state.fn != "fit":
            return
        if not trainer.is_global_zero:
            return
        path = os.path.join(self.ckpt_dir, INTERRUPTED_NAME)
        try:
            # Trainer.save_checkpoint ends with a barrier that interrupted DDP peers may never reach:
            # write this process's state (the DDP weights are the same on every rank) directly.
            with _workers_may_end():
                checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
                trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
        except Exception as exc:  # noqa: BLE001 - the interrupt is what the user must see
            saved = f"the interrupted state could not be saved ({type(exc).__name__}: {exc})"
        else:
            saved = f"the state at step {trainer.global_step} is in {path}"
        last = os.path.join(self.ckpt_dir, "last.ckpt")
        resume = (f"`--resume auto` continues from {last} (the end of the last complete epoch) and replays "
                  f"the run exactly" if os.path.isfile(last) else "no epoch was completed")
        how = "stopped by SIGTERM" if terminated else "interrupted"
        print(f"\nsegkit: training {how}; {saved}. {resume}; `--resume {path}` continues from the "
              f"interrupted step instead.", flush=True)


# ---------------------------------------------------------------------------- the run's CSV log
class _CSVWriter(ExperimentWriter):
    """Lightning's writer of ``metrics.csv``, changed so that a write that fails (a full disk) leaves the
    file as it was: a new header rewrites the file atomically, and rows appended in part are cut off
    again. The failure is a :class:`FileWriteError` naming the file."""

    def save(self) -> None:
        if not self.metrics:
            return
        path = self.metrics_file_path
        try:
            new_keys = self._record_new_keys()
            exists = os.path.isfile(path)
            if new_keys and exists:
                self._rewrite_with_new_header(self.metrics_keys)
            size = os.path.getsize(path) if exists else 0
            try:
                with open(path, "a" if exists else "w", newline="", encoding="utf-8") as file:
                    writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                    if not exists:
                        writer.writeheader()
                    writer.writerows(self.metrics)
            except OSError:
                with contextlib.suppress(OSError):  # drop the rows written in part
                    os.truncate(path, size) if exists else os.unlink(path)
                raise
        except OSError as exc:
            raise (write_error(path, exc, what="the training log") or exc) from exc
        self.metrics = []

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="", encoding="utf-8") as file:
            rows = list(csv.DictReader(file))
        with atomic_open(self.metrics_file_path, "w", newline="", encoding="utf-8", what="the training log") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)


class RunCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` whose ``metrics.csv`` is never left cut short by a failed write."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _CSVWriter(log_dir=self.log_dir)
        return self._experiment
