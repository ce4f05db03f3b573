"""End to end: training writes its run folder, the loss falls, `segkit eval` reproduces the metrics."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from segkit.cli import main
from segkit.evaluation.coco import COCO_METRIC_NAMES


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import TINY_CONFIG

    root = tmp_path_factory.mktemp("run")
    cfg = root / "tiny.yaml"
    cfg.write_text(TINY_CONFIG.format(root=root / "data", work_dir=root / "work"))
    assert main(["train", str(cfg), "trainer.check_val_every_n_epoch=4"]) == 0
    return root


def test_training_writes_config_checkpoints_logs_and_metrics(trained_run: Path):
    work = trained_run / "work"
    assert (work / "config.yaml").is_file()
    assert (work / "checkpoints" / "last.ckpt").is_file() and (work / "checkpoints" / "best.ckpt").is_file()
    assert (work / "logs" / "version_0" / "metrics.csv").is_file()
    metrics = json.loads((work / "metrics.json").read_text())
    assert set(f"bbox/{name}" for name in COCO_METRIC_NAMES) <= set(metrics)
    assert [entry["epoch"] for entry in metrics["history"]] == [3, 7]


def test_training_loss_falls(trained_run: Path):
    with open(trained_run / "work" / "logs" / "version_0" / "metrics.csv") as f:
        losses = [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert len(losses) >= 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.75 * first, (first, last)


def test_checkpoint_carries_the_config_and_loads_with_weights_only(trained_run: Path):
    import segkit

    ckpt = trained_run / "work" / "checkpoints" / "last.ckpt"
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert raw["segkit_config"]["model"]["roi_head"]["num_classes"] == 3
    model = segkit.load_model(ckpt)
    assert not model.training
    out = model([torch.rand(3, 64, 80)])
    assert set(out[0]) >= {"boxes", "labels", "scores"}


def test_eval_of_the_checkpoint_reproduces_training_metrics(trained_run: Path, capsys: pytest.CaptureFixture[str]):
    work = trained_run / "work"
    final = json.loads((work / "metrics.json").read_text())
    out_file = trained_run / "eval.json"
    assert main(["eval", str(work / "checkpoints" / "last.ckpt"), "--out", str(out_file)]) == 0
    evaluated = json.loads(out_file.read_text())
    for name in COCO_METRIC_NAMES:
        assert evaluated[f"bbox/{name}"] == pytest.approx(final[f"bbox/{name}"], abs=1e-9), name
    assert "AP50" in capsys.readouterr().out


def test_eval_with_config_and_checkpoint(trained_run: Path):
    work = trained_run / "work"
    out_file = trained_run / "eval2.json"
    assert main(["eval", str(trained_run / "tiny.yaml"), str(work / "checkpoints" / "last.ckpt"), "--out",
                 str(out_file)]) == 0
    assert json.loads(out_file.read_text())["bbox/AP"] == json.loads((work / "metrics.json").read_text())["bbox/AP"]


def test_resume_auto_continues_from_last_checkpoint(tiny_config: Path):
    common = ["trainer.check_val_every_n_epoch=1"]
    assert main(["train", str(tiny_config), "trainer.max_epochs=1", *common]) == 0
    assert main(["train", str(tiny_config), "trainer.max_epochs=2", *common, "--resume", "auto"]) == 0
    history = json.loads((tiny_config.parent / "work" / "metrics.json").read_text())["history"]
    assert [(h["epoch"], h["step"]) for h in history] == [(0, 4), (1, 8)]
    ckpt = torch.load(tiny_config.parent / "work" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 8
    logs = tiny_config.parent / "work" / "logs"
    assert (logs / "version_0" / "metrics.csv").is_file() and (logs / "version_1" / "metrics.csv").is_file()
