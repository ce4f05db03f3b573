"""EMA of the weights (``engine.ema``): the average follows the hand-computed formula, evaluation uses
it, checkpoints carry it, and ``segkit eval`` / ``segkit.load_model`` load it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

import segkit
from segkit.cli import main
from segkit.config import load_config
from segkit.engine import runner
from segkit.engine.callbacks import EMAOptions, ModelEMA, engine_options
from segkit.errors import ConfigError

DECAY, WARMUP = 0.8, 2


pytestmark = pytest.mark.usefixtures("one_thread")


def _hand_ema(start: dict[str, torch.Tensor], steps: list[dict[str, torch.Tensor]], decay: float,
              warmup: int) -> dict[str, torch.Tensor]:
    """``e = d e + (1 - d) p`` after each step, ``d = decay (1 - exp(-t / warmup))``, in float64."""
    ema = {name: value.double() for name, value in start.items()}
    for t, params in enumerate(steps, start=1):
        d = decay * (1 - math.exp(-t / warmup)) if warmup else decay
        ema = {name: d * ema[name] + (1 - d) * params[name].double() for name in ema}
    return ema


def test_average_equals_a_hand_computed_ema_and_leaves_buffers_and_frozen_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[2].bias.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    ema = ModelEMA(model, decay=0.9, warmup_iters=3)
    trainable = lambda: {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}  # noqa: E731
    start, steps = trainable(), []
    for _ in range(5):
        optimizer.zero_grad()
        model(torch.randn(8, 3)).square().mean().backward()
        optimizer.step()
        ema.update(model)
        steps.append(trainable())
    expected = _hand_ema(start, steps, 0.9, 3)
    state = ema.averaged_state_dict(model)
    assert ema.updates == 5 and set(expected) == set(ema.shadow)
    for name, value in expected.items():
        assert torch.allclose(state[name].double(), value, rtol=1e-6, atol=1e-7), name
        assert not torch.equal(state[name], steps[-1][name])  # an average, not the last weights
    assert torch.equal(state["1.running_mean"], model[1].running_mean)  # buffers: the model's own
    assert torch.equal(state["2.bias"], model[2].bias)  # frozen: never averaged
    assert ema.decay_at(1) == pytest.approx(0.9 * (1 - math.exp(-1 / 3)))
    assert ModelEMA(model, decay=0.9, warmup_iters=0).decay_at(1) == 0.9

    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.applied_to(model):
        assert all(torch.equal(p, ema.shadow[n]) for n, p in model.named_parameters() if n in ema.shadow)
    assert all(torch.equal(p, live[n]) for n, p in model.named_parameters())


class _Recorder(pl.Callback):
    """The weights at the start, after every optimizer step, and while evaluating."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []
        self.evaluated: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.after_evaluation: list[dict[str, torch.Tensor]] = []

    @staticmethod
    def _weights(pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in pl_module.model.named_parameters() if p.requires_grad}

    def on_train_start(self, trainer, pl_module):
        self.start = self._weights(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(self._weights(pl_module))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self.evaluated.append((len(self.steps), self._weights(pl_module)))

    def on_validation_end(self, trainer, pl_module):
        self.after_evaluation.append(self._weights(pl_module))


@pytest.fixture()
def ema_run(tiny_config: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, _Recorder]:
    recorder = _Recorder()
    build = runner.build_trainer
    monkeypatch.setattr(runner, "build_trainer", lambda cfg, **kw: build(
        cfg, **{**kw, "extra_callbacks": [*kw.get("extra_callbacks", ()), recorder]}))
    overrides = ["trainer.max_epochs=2", "trainer.check_val_every_n_epoch=1", "data.val.num_images=4",
                 f"engine.ema={{decay: {DECAY}, warmup_iters: {WARMUP}}}"]
    runner.train(load_config(tiny_config, overrides))
    return tiny_config.parent / "work", recorder


def test_training_keeps_the_ema_evaluates_it_and_stores_it(ema_run: tuple[Path, _Recorder]):
    work, recorder = ema_run
    assert len(recorder.steps) == 8
    # Evaluation after each epoch ran with the average of the weights so far, then the weights came back.
    assert [n for n, _ in recorder.evaluated] == [4, 8]
    for n, weights in recorder.evaluated:
        expected = _hand_ema(recorder.start, recorder.steps[:n], DECAY, WARMUP)
        assert all(torch.allclose(weights[k].double(), v, rtol=1e-5, atol=1e-7) for k, v in expected.items())
        assert any(not torch.equal(weights[k], recorder.steps[n - 1][k]) for k in weights)
    for after, n in zip(recorder.after_evaluation, (4, 8)):
        assert all(torch.equal(after[k], recorder.steps[n - 1][k]) for k in after)

    ckpt = torch.load(work / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    stored = ckpt["segkit_ema"]
    assert stored["updates"] == 8 and stored["decay"] == DECAY and stored["warmup_iters"] == WARMUP
    assert all(torch.equal(ckpt["state_dict"][f"model.{k}"], v) for k, v in recorder.steps[-1].items())
    assert all(torch.equal(stored["state_dict"][k], v) for k, v in recorder.evaluated[-1][1].items())
    assert set(stored["state_dict"]) == {k[len("model."):] for k in ckpt["state_dict"]}  # a whole model


def test_load_model_and_eval_use_the_ema_weights(ema_run: tuple[Path, _Recorder], tmp_path: Path):
    work, recorder = ema_run
    last = work / "checkpoints" / "last.ckpt"
    stored = torch.load(last, map_location="cpu", weights_only=True)
    model = segkit.load_model(last)
    assert all(torch.equal(v, stored["segkit_ema"]["state_dict"][k]) for k, v in model.state_dict().items())
    segkit.load_checkpoint(model, last, use_ema=False)
    assert all(torch.equal(v, stored["state_dict"][f"model.{k}"]) for k, v in model.state_dict().items())

    out = tmp_path / "eval.json"
    assert main(["eval", str(last), "--out", str(out)]) == 0
    trained = json.loads((work / "metrics.json").read_text())
    evaluated = json.loads(out.read_text())
    assert trained["bbox/AR100"] > 0  # a real comparison, not of two zeros
    assert all(evaluated[k] == pytest.approx(trained[k], abs=1e-12) for k in evaluated)


@pytest.mark.parametrize("value, key, expected", [
    ({"dcay": 0.9}, "engine.ema.dcay", "Did you mean 'decay'?"),
    ({"decay": 1.5}, "engine.ema.decay", "a number in [0, 1)"),
    ({"warmup_iters": -1}, "engine.ema.warmup_iters", ">= 0"),
    (5, "engine.ema", "takes a mapping"),
])
def test_ema_options_are_checked(value: object, key: str, expected: str):
    with pytest.raises(ConfigError) as exc:
        engine_options({"engine": {"ema": value}})
    assert exc.value.key == key and expected in str(exc.value)


def test_ema_is_off_unless_given_and_true_means_the_defaults():
    assert engine_options({}).ema is None and engine_options({"engine": {"ema": None}}).ema is None
    assert engine_options({"engine": {"ema": True}}).ema == EMAOptions(decay=0.9998, warmup_iters=2000)
    assert engine_options({"engine": {"ema": {}}}).ema == EMAOptions()
