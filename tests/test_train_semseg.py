"""End to end for semantic segmentation: EncNet trains on Shapes label maps, the loss falls, and
`segkit eval` scores the checkpoint with whole-image, sliding-window and multi-scale flip inference."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from segkit.cli import main

TINY_SEG_CONFIG = """
seed: 0
model:
  type: EncoderDecoder
  backbone: {{type: ResNet, depth: 18, base_channels: 8, strides: [1, 2, 1, 1], dilations: [1, 1, 2, 4]}}
  decode_head: {{type: EncHead, in_features: c5, channels: 16, num_codes: 8, num_classes: 4}}
  auxiliary_head: {{type: FCNHead, in_features: c4, num_classes: 4, loss_weight: 0.2}}
data:
  batch_size: 4
  train: {{type: ShapesSegmentation, split: train, num_images: 16, image_size: 64, root: "{root}", progress: false}}
  val: {{type: ShapesSegmentation, split: val, num_images: 8, image_size: 64, root: "{root}", progress: false}}
optimizer: {{type: AdamW, lr: 0.005}}
scheduler: {{type: Poly, power: 0.9, warmup: null}}
evaluation: {{type: SemSegEvaluator, main_metric: mIoU}}
trainer:
  max_epochs: 6
  check_val_every_n_epoch: 6
  log_every_n_steps: 1
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
work_dir: "{work_dir}"
"""


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("seg")
    cfg = root / "seg.yaml"
    cfg.write_text(TINY_SEG_CONFIG.format(root=root / "data", work_dir=root / "work"))
    assert main(["train", str(cfg)]) == 0
    return root


def test_encnet_trains_and_its_losses_fall(seg_run: Path):
    with open(seg_run / "work" / "logs" / "version_0" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("train/loss")]
    assert {"train/loss_seg", "train/loss_se", "train/loss_aux_seg"} <= set(rows[0])
    losses = [float(row["train/loss"]) for row in rows]
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
    metrics = json.loads((seg_run / "work" / "metrics.json").read_text())
    assert {"mIoU", "aAcc", "mAcc", "fwIoU", "mIoU_all", "pixAcc", "IoU-circle"} <= set(metrics)
    assert (seg_run / "work" / "checkpoints" / "best.ckpt").is_file()


def test_eval_reproduces_training_and_runs_sliding_window_and_multi_scale_flip(seg_run: Path, capsys):
    ckpt = str(seg_run / "work" / "checkpoints" / "last.ckpt")
    trained = json.loads((seg_run / "work" / "metrics.json").read_text())
    assert main(["eval", ckpt, "--out", str(seg_run / "whole.json")]) == 0
    whole = json.loads((seg_run / "whole.json").read_text())
    assert whole["mIoU"] == pytest.approx(trained["mIoU"], abs=1e-9)
    # one 64-px window over 64-px images: sliding-window inference is whole-image inference
    assert main(["eval", ckpt, "model.test_cfg.mode=slide", "model.test_cfg.crop_size=64", "model.test_cfg.stride=48",
                 "--out", str(seg_run / "slide.json")]) == 0
    assert json.loads((seg_run / "slide.json").read_text())["mIoU"] == pytest.approx(whole["mIoU"], abs=1e-6)
    capsys.readouterr()
    assert main(["eval", ckpt, "model.test_cfg.mode=slide", "model.test_cfg.crop_size=48", "model.test_cfg.stride=32",
                 "model.test_cfg.scales=[0.75,1.0,1.25]", "model.test_cfg.flip=true",
                 "--out", str(seg_run / "tta.json")]) == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "triangle" in printed and "IoU" in printed
    tta = json.loads((seg_run / "tta.json").read_text())
    assert tta.keys() == whole.keys() and 0.0 <= tta["mIoU"] <= 1.0


def test_eval_with_a_bad_test_setting_names_the_key(seg_run: Path, capsys):
    ckpt = str(seg_run / "work" / "checkpoints" / "last.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", ckpt, "model.test_cfg.mode=sliding"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "model.test_cfg.mode" in err and "Did you mean 'slide'" in err


@pytest.mark.slow  # 30 s; tests/test_distributed.py runs DDP training and evaluation in the default suite
def test_ddp_evaluation_equals_single_process(seg_run: Path):
    import math
    import subprocess
    import sys

    ckpt = str(seg_run / "work" / "checkpoints" / "last.ckpt")
    odd = "data.val.num_images=7"  # 7 images over 2 processes: the sampler pads with a duplicate
    outs = {}
    for name, extra in (("single", []), ("ddp", ["trainer.devices=2", "trainer.strategy=ddp"])):
        outs[name] = seg_run / f"{name}.json"
        result = subprocess.run([sys.executable, "-m", "segkit.cli", "eval", ckpt, odd, *extra, "--out", str(outs[name])],
                                cwd=seg_run, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = (json.loads(outs[n].read_text()) for n in ("single", "ddp"))
    assert one.keys() == two.keys() and one["mIoU"] > 0
    for key in one:
        assert (math.isnan(one[key]) and math.isnan(two[key])) or one[key] == pytest.approx(two[key], abs=1e-12), key
