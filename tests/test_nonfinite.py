"""Non-finite losses and gradients: the step is skipped without touching the weights, counted and
reported; too many in a row stop training with a clear error; under DDP every process agrees."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from segkit.cli import main
from segkit.config import load_config
from segkit.engine import runner
from segkit.errors import ConfigError
from segkit.models.two_stage import TwoStageDetector

FAST = ["trainer.max_epochs=2", "trainer.check_val_every_n_epoch=100"]  # 4 steps per epoch, no evaluation


pytestmark = pytest.mark.usefixtures("one_thread")


def _poison(monkeypatch: pytest.MonkeyPatch, *, loss_at: set[int] = frozenset(), grad_at: set[int] = frozenset(),
            from_call: int | None = None) -> None:
    """Make the loss (``loss_at``, every call from ``from_call``) or the gradients (``grad_at``) NaN
    in the given training forward calls (counted from 1)."""
    forward = TwoStageDetector.forward
    calls = [0]

    def poisoned(self, images, targets=None):
        out = forward(self, images, targets)
        if not self.training:
            return out
        calls[0] += 1
        out = dict(out)
        if calls[0] in loss_at or (from_call is not None and calls[0] >= from_call):
            out["loss_rpn_cls"] = out["loss_rpn_cls"] * float("nan")
        if calls[0] in grad_at:
            out["loss_cls"].register_hook(lambda grad: grad * float("nan"))
        return out

    monkeypatch.setattr(TwoStageDetector, "forward", poisoned)


class _Recorder(pl.Callback):
    """Whether each training batch changed the weights or the optimizer's state."""

    def __init__(self) -> None:
        self.changed: list[bool] = []

    def _state(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[torch.Tensor]:
        params = [p.detach().clone() for p in pl_module.parameters()]
        moments = [v.clone() for s in trainer.optimizers[0].state.values() for v in s.values() if torch.is_tensor(v)]
        return params + moments

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = self._state(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        after = self._state(trainer, pl_module)
        self.changed.append(len(after) != len(self.before)
                            or any(not torch.equal(a, b) for a, b in zip(after, self.before)))


def _train_recording(monkeypatch: pytest.MonkeyPatch, cfg_path: Path, overrides: list[str]) -> _Recorder:
    recorder = _Recorder()
    build = runner.build_trainer
    monkeypatch.setattr(runner, "build_trainer", lambda cfg, **kw: build(
        cfg, **{**kw, "extra_callbacks": [*kw.get("extra_callbacks", ()), recorder]}))
    runner.train(load_config(cfg_path, overrides))
    return recorder


def test_occasional_nonfinite_steps_are_skipped_without_changing_the_weights(
        tiny_config: Path, monkeypatch: pytest.MonkeyPatch):
    _poison(monkeypatch, loss_at={2, 5}, grad_at={7})
    with pytest.warns(RuntimeWarning) as caught:
        recorder = _train_recording(monkeypatch, tiny_config, FAST)
    assert recorder.changed == [True, False, True, True, False, True, False, True]
    messages = [str(w.message) for w in caught if "skipped the step" in str(w.message)]
    assert len(messages) == 3
    assert messages[0].startswith("step 1 (epoch 0): the training loss is nan (loss_rpn_cls=nan, loss_rpn_box=")
    assert "1 in a row, 1 in all" in messages[0]
    assert messages[1].startswith("step 4 (epoch 1): the training loss is nan")
    assert messages[2].startswith("step 6 (epoch 1): the gradients are not finite")

    work = tiny_config.parent / "work"
    ckpt = torch.load(work / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 8 and ckpt["segkit_nonfinite_steps"] == {"total": 3, "in_a_row": 0}
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    with open(work / "logs" / "version_0" / "metrics.csv") as f:
        counts = [float(r["train/nonfinite_steps"]) for r in csv.DictReader(f) if r.get("train/nonfinite_steps")]
    assert counts == [0, 1, 1, 1, 2, 2, 3, 3]


def test_consecutive_nonfinite_steps_stop_training_with_the_reason(tiny_config: Path,
                                                                   monkeypatch: pytest.MonkeyPatch):
    from segkit.engine.module import TrainingDivergedError

    _poison(monkeypatch, from_call=3)
    with pytest.warns(RuntimeWarning), pytest.raises(TrainingDivergedError) as exc:
        runner.train(load_config(tiny_config, [*FAST, "engine.max_nonfinite_steps=3"]))
    message = str(exc.value)
    assert message.startswith("training stopped at step 4 (epoch 1): 3 step(s) in a row had a non-finite loss")
    assert "(engine.max_nonfinite_steps: 3)" in message and "loss_rpn_cls=nan" in message
    assert "lower optimizer.lr" in message


def test_a_diverging_run_exits_2_with_one_paragraph(tiny_config: Path, capsys: pytest.CaptureFixture[str]):
    # A learning rate far too high: the weights blow up and every later loss is infinite or NaN.
    overrides = [*FAST, "optimizer.type=SGD", "optimizer.lr=1.0e+12", "engine.max_nonfinite_steps=2"]
    with pytest.warns(RuntimeWarning), pytest.raises(SystemExit) as exc:
        main(["train", str(tiny_config), *overrides])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    paragraph = err[err.index("segkit: error: "):].split("\n(run with --debug")[0]
    assert "2 step(s) in a row had a non-finite loss" in " ".join(paragraph.split())
    assert "Traceback" not in err


def test_the_count_in_a_row_starts_again_after_a_good_step(
        tiny_config: Path, monkeypatch: pytest.MonkeyPatch):
    # Two bad steps with a good one between: with max_nonfinite_steps 2 training goes on.
    _poison(monkeypatch, loss_at={1, 3})
    with pytest.warns(RuntimeWarning, match="skipped the step"):
        recorder = _train_recording(monkeypatch, tiny_config, [*FAST, "engine.max_nonfinite_steps=2"])
    assert recorder.changed == [False, True, False, True, True, True, True, True]


@pytest.mark.parametrize("key, value, expected", [
    ("engine.max_nonfinite_step", "3", "Did you mean 'max_nonfinite_steps'?"),
    ("engine.max_nonfinite_steps", "0", "a positive integer"),
    ("engine.checkpoint_every_n_steps", "-5", "positive number of optimizer steps"),
])
def test_engine_section_is_checked(tiny_config: Path, key: str, value: str, expected: str):
    with pytest.raises(ConfigError) as exc:
        runner.train(load_config(tiny_config, [f"{key}={value}"]))
    assert exc.value.key == key and expected in str(exc.value)


# A plugin that makes the loss NaN on one process only, in the given training steps.
RANK_POISON = '''
import os

from segkit.models.two_stage import TwoStageDetector

_forward = TwoStageDetector.forward
_calls = [0]


def _poisoned(self, images, targets=None):
    out = _forward(self, images, targets)
    if self.training and os.environ.get("LOCAL_RANK", "0") == "1":
        _calls[0] += 1
        if _calls[0] == 2:
            out = {**out, "loss_rpn_cls": out["loss_rpn_cls"] * float("nan")}
    return out


TwoStageDetector.forward = _poisoned
'''


def test_ddp_processes_skip_together_when_one_loss_is_nonfinite(tmp_path: Path):
    from tests.conftest import TINY_CONFIG

    (tmp_path / "poison.py").write_text(RANK_POISON)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("imports: [poison.py]\n" + TINY_CONFIG.format(root=tmp_path / "data", work_dir=tmp_path / "work"))
    result = subprocess.run([sys.executable, "-m", "segkit.cli", "train", str(cfg), "trainer.devices=2",
                             "trainer.strategy=ddp", "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=100"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 1 (epoch 0, process 1): the training loss is nan" in result.stderr
    ckpt = torch.load(tmp_path / "work" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # Written by process 0, whose own loss stayed finite: it skipped the step with process 1.
    assert ckpt["global_step"] == 4 and ckpt["segkit_nonfinite_steps"]["total"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_huge_but_finite_gradients_are_not_taken_for_nonfinite():
    from segkit.engine.module import _all_finite

    huge = [torch.ones(3), torch.full((1000,), 3e37)]  # the 2-norm overflows to inf, every element is finite
    assert not torch.isfinite(torch.linalg.vector_norm(huge[1]))
    assert _all_finite(huge)
    assert not _all_finite([torch.ones(3), torch.tensor([1.0, float("inf")])])
    assert not _all_finite([torch.tensor([float("nan"), 0.0])])
