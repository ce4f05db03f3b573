"""A kind of model segkit has never seen, added from a file outside the package (a config's `imports:`),
goes through every tool: train, eval, predict, export (both formats, checked), bench and cam. Nothing in
segkit/ knows it: the tools ask the model contract."""

from __future__ import annotations

import csv
import json
import shutil
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from segkit.cli import main

ROOT = Path(__file__).parent.parent
PLUGIN = Path(__file__).parent / "fixtures" / "centre_point_detector.py"

CONFIG = """
imports: [centre_point_detector.py]
seed: 0
model:
  type: CentrePointDetector
  backbone: {{type: ResNet, depth: 18, base_channels: 8}}
  num_classes: 3
data:
  batch_size: 4
  train: {{type: Shapes, split: train, num_images: 16, image_size: 64, root: "{root}", progress: false}}
  val: {{type: Shapes, split: val, num_images: 4, image_size: 64, root: "{root}", progress: false}}
optimizer: {{type: AdamW, lr: 0.01}}
scheduler: {{type: Constant, warmup: null}}
trainer: {{max_epochs: 4, num_sanity_val_steps: 0, enable_progress_bar: false, enable_model_summary: false,
          log_every_n_steps: 1}}
work_dir: "{work_dir}"
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The outside model trained for a few epochs by `segkit train` (its evaluator: the contract's default)."""
    root = tmp_path_factory.mktemp("outside")
    shutil.copy(PLUGIN, root / PLUGIN.name)
    config = root / "centre.yaml"
    config.write_text(textwrap.dedent(CONFIG.format(root=root / "data", work_dir=root / "work")))
    assert main(["train", str(config)]) == 0
    return {"root": root, "config": config, "ckpt": root / "work" / "checkpoints" / "last.ckpt",
            "images": root / "data" / "shapes" / "val"}


def test_nothing_in_segkit_names_the_outside_model():
    assert not [p for p in (ROOT / "segkit").rglob("*.py") if "CentrePoint" in p.read_text()]


def test_it_trains_and_evaluates_with_the_detection_metrics(run, capsys: pytest.CaptureFixture[str]):
    log = next((run["root"] / "work" / "logs").rglob("metrics.csv"))
    losses = [float(row["train/loss"]) for row in csv.DictReader(log.open()) if row.get("train/loss")]
    assert len(losses) == 16 and sum(losses[-4:]) < 0.8 * sum(losses[:4])  # its own losses, summed and learnt
    trained = json.loads((run["root"] / "work" / "metrics.json").read_text())
    assert "bbox/AP" in trained  # CocoEvaluator, chosen from the model's declared default
    out = run["root"] / "eval.json"
    assert main(["eval", str(run["config"]), str(run["ckpt"]), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["bbox/AP"] == pytest.approx(trained["bbox/AP"], abs=1e-12)


def test_it_predicts_pictures_and_coco_results(run, capsys: pytest.CaptureFixture[str]):
    out = run["root"] / "predictions"
    assert main(["predict", str(run["config"]), str(run["ckpt"]), str(_images(run)), "--out", str(out),
                 "--score-thr", "0"]) == 0
    results = json.loads((out / "predictions.json").read_text())
    assert len(results) > 0 and {"bbox", "score", "category_id", "file_name"} <= set(results[0])
    assert len(list(out.glob("*.png"))) == len(list(_images(run).glob("*.png")))
    assert Image.open(next(out.glob("*.png"))).size == (64, 64)


@pytest.mark.parametrize("fmt, suffix", [("torchscript", ".pt"), ("onnx", ".onnx")])
def test_it_exports_and_the_export_is_checked(run, capsys: pytest.CaptureFixture[str], fmt: str, suffix: str):
    out = run["root"] / f"centre{suffix}"
    assert main(["export", str(run["config"]), str(run["ckpt"]), "--format", fmt, "--out", str(out),
                 "--num-images", "3"]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "checked on 3 image(s)" in printed and "outputs boxes, labels, scores" in printed


def test_it_is_benchmarked(run, capsys: pytest.CaptureFixture[str]):
    out = run["root"] / "bench.json"
    assert main(["bench", str(run["config"]), "--iters", "1", "--warmup", "0", "--skip", "data",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["segkit"]["train_step_s"] > 0 and report["segkit"]["infer_s"] > 0


def test_its_class_activation_maps_are_drawn(run, capsys: pytest.CaptureFixture[str]):
    out = run["root"] / "cam"
    image = sorted(_images(run).glob("*.png"))[0]
    assert main(["cam", str(run["config"]), str(run["ckpt"]), str(image), "model.score_threshold=0",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "detection 0" in printed and "c3 ->" in printed
    assert Image.open(out / image.name).size == (64, 64)


def _images(run: dict[str, Path]) -> Path:
    folders = [p for p in run["images"].parent.rglob("*") if p.is_dir() and any(p.glob("*.png"))]
    return next(p for p in folders if "val" in str(p) and "label" not in p.name)
