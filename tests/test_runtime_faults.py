"""Runtime faults: Ctrl+C during training, a data-loading worker that dies, two runs in one work_dir.
Each ends with one clear message and leaves every written file intact. (A full disk, read-only file
systems and SIGTERM are in test_faults_runtime.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_CONFIG


def _config(tmp_path: Path, extra: str = "", epochs: int = 1000) -> Path:
    cfg = tmp_path / "tiny.yaml"
    text = textwrap.dedent(TINY_CONFIG.format(root=tmp_path / "data", work_dir=tmp_path / "work"))
    text = text.replace("max_epochs: 8", f"max_epochs: {epochs}") + extra
    cfg.write_text(text)
    return cfg


def _default_sigint() -> None:
    # A test run started in the background of a non-interactive shell ignores SIGINT, and a child
    # would inherit that (Python then installs no KeyboardInterrupt handler): the run under test
    # gets Ctrl+C's default behaviour whatever started the tests.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(cfg: Path, cwd: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "segkit.cli", "train", str(cfg), *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.2)


def test_ctrl_c_saves_the_state_keeps_last_and_exits_without_traceback(tmp_path: Path):
    cfg = _config(tmp_path)
    proc = _start(cfg, tmp_path)
    last = tmp_path / "work" / "checkpoints" / "last.ckpt"
    _wait_for(last, proc)
    time.sleep(1.0)  # into a later epoch
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    report = f"exit status {proc.returncode}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
    assert proc.returncode != 0, report
    assert "training interrupted" in out and "--resume auto" in out, report
    assert "Traceback" not in err, report
    interrupted = tmp_path / "work" / "checkpoints" / "interrupted.ckpt"
    state = torch.load(interrupted, map_location="cpu", weights_only=True)
    assert state["global_step"] > 0 and "state_dict" in state
    torch.load(last, map_location="cpu", weights_only=True)  # the epoch checkpoint is intact
    assert not [p.name for p in last.parent.iterdir() if ".tmp" in p.name]


def test_second_run_in_the_same_work_dir_is_refused_until_the_first_ends(tmp_path: Path):
    cfg = _config(tmp_path)
    first = _start(cfg, tmp_path)
    lock = tmp_path / "work" / ".segkit.lock"
    _wait_for(tmp_path / "work" / "checkpoints" / "last.ckpt", first)
    second = subprocess.run([sys.executable, "-m", "segkit.cli", "train", str(cfg)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 2
    message = " ".join(second.stderr.split())
    assert "is in use by another segkit run" in message and f"pid {first.pid}" in message
    assert "Traceback" not in second.stderr
    first.kill()  # the lock dies with its process, even on SIGKILL
    first.communicate(timeout=60)
    assert lock.exists()
    from segkit.engine import workdir

    handle = workdir.lock_work_dir(str(tmp_path / "work"))  # what the next run takes first: free again
    assert handle is not None
    workdir._held.discard(handle)
    handle.close()


LOCK_THEN_FORK_THEN_DIE = """
import os, signal, sys, time
from segkit.engine.workdir import lock_work_dir
lock = lock_work_dir(sys.argv[1])
child = os.fork()
if child == 0:  # a data-loading worker: outlives its parent by a few seconds
    os.close(1), os.close(2)  # (leaves the test's pipes)
    time.sleep(30)
    os._exit(0)
print(child, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_run_s_forked_workers_do_not_keep_its_work_dir_locked(tmp_path: Path):
    from segkit.engine import workdir

    work_dir = str(tmp_path / "work")
    died = subprocess.run([sys.executable, "-c", LOCK_THEN_FORK_THEN_DIE, work_dir], capture_output=True,
                          text=True, timeout=60)
    assert died.returncode == -signal.SIGKILL, died.stderr
    worker = int(died.stdout.split()[0])
    try:
        os.kill(worker, 0)  # the worker is still alive ...
        handle = workdir.lock_work_dir(work_dir)  # ... and the folder is free
        assert handle is not None
        workdir._held.discard(handle)
        handle.close()
    finally:
        os.kill(worker, signal.SIGKILL)


DYING_DATASET = '''
import os
from segkit.data.shapes import Shapes
from segkit.registry import DATASETS


@DATASETS.register()
class DyingShapes(Shapes):
    """Shapes whose worker process dies on sample 5, as an out-of-memory kill would end it."""

    def __getitem__(self, index):
        import torch.utils.data
        if index == 5 and torch.utils.data.get_worker_info() is not None:
            os._exit(9)
        return super().__getitem__(index)
'''


class _DiesInItsWorker(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        if torch.utils.data.get_worker_info() is not None:
            os._exit(9)
        return index


def test_a_worker_s_death_is_recognised_inside_the_error_that_wraps_it():
    # The main process notices a dead worker wherever it happens to be: when TensorBoard's logger was
    # writing a scalar, Lightning re-raises PyTorch's report as a ValueError. The CLI must still see it.
    from segkit.engine.workdir import is_worker_death, worker_death

    loader = torch.utils.data.DataLoader(_DiesInItsWorker(), num_workers=1)
    with pytest.raises(ValueError) as raised:
        try:
            list(loader)
        except Exception as exc:
            raise ValueError("you tried to log 0.003 which is currently not supported") from exc
    death = worker_death(raised.value)
    assert isinstance(death, RuntimeError) and "DataLoader worker" in str(death)
    assert is_worker_death(raised.value) and not is_worker_death(ValueError("unrelated"))


def test_a_data_worker_that_dies_ends_the_run_with_one_message(tmp_path: Path):
    (tmp_path / "dying.py").write_text(DYING_DATASET)
    cfg = _config(tmp_path, epochs=2)
    text = cfg.read_text().replace("type: Shapes, split: train", "type: DyingShapes, split: train")
    cfg.write_text("imports: [dying.py]\n" + text.replace("batch_size: 4", "batch_size: 4\n  num_workers: 2"))
    result = subprocess.run([sys.executable, "-m", "segkit.cli", "train", str(cfg)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    message = " ".join(result.stderr.split())
    assert "data-loading worker" in message and "num_workers=0" in message
    assert "Traceback" not in result.stderr
