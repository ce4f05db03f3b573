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
Ctrl+C (SIGINT), and says how to continue. ``last.ckpt`` (the end of the last complete epoch) is
left as it is, so ``--resume auto`` still replays the run exactly from an epoch boundary.
"""

from __future__ import annotations

import os
import socket
import time
import weakref
from typing import Any

import pytorch_lightning as pl

from segkit.errors import UserError

__all__ = ["WorkDirBusy", "lock_work_dir", "SaveOnInterrupt", "LOCK_NAME", "INTERRUPTED_NAME"]

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


def lock_work_dir(work_dir: str) -> Any | None:
    """Hold ``work_dir`` for this process; returns the open lock file (keep it referenced).

    Returns ``None`` (no lock) in DDP worker processes and where ``fcntl`` does not exist.

    Raises:
        WorkDirBusy: another live process holds it; the message names its pid, host and start time.
    """
    if not _is_launcher_process():
        return None
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks
        return None
    os.makedirs(work_dir, exist_ok=True)
    path = os.path.join(work_dir, LOCK_NAME)
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the process's life
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
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    _held.add(handle)
    return handle


class SaveOnInterrupt(pl.Callback):
    """On Ctrl+C during training, save ``checkpoints/interrupted.ckpt`` and say how to continue."""

    def __init__(self, ckpt_dir: str) -> None:
        self.ckpt_dir = ckpt_dir

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt) or trainer.state.fn != "fit":
            return
        if not trainer.is_global_zero:
            return
        path = os.path.join(self.ckpt_dir, INTERRUPTED_NAME)
        try:
            # Trainer.save_checkpoint ends with a barrier that interrupted DDP peers may never reach:
            # write this process's state (the DDP weights are the same on every rank) directly.
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
        except Exception as exc:  # noqa: BLE001 - the interrupt is what the user must see
            saved = f"the interrupted state could not be saved ({type(exc).__name__}: {exc})"
        else:
            saved = f"the state at step {trainer.global_step} is in {path}"
        last = os.path.join(self.ckpt_dir, "last.ckpt")
        resume = (f"`--resume auto` continues from {last} (the end of the last complete epoch) and replays "
                  f"the run exactly" if os.path.isfile(last) else "no epoch was completed")
        print(f"\nsegkit: training interrupted; {saved}. {resume}; `--resume {path}` continues from the "
              f"interrupted step instead.", flush=True)
