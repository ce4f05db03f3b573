"""Shared fixtures: a tiny detector config on a few generated Shapes images."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

TINY_CONFIG = """
seed: 0
model:
  type: TwoStageDetector
  backbone: {{type: ResNet, depth: 18, base_channels: 8}}
  neck: {{type: FPN, out_channels: 16}}
  rpn_head:
    type: RPN
    anchor_sizes: [[16], [32], [64], [128], [256]]
    pre_nms_top_n_train: 200
    post_nms_top_n_train: 100
    pre_nms_top_n_test: 100
    post_nms_top_n_test: 50
  roi_head:
    type: StandardRoIHead
    num_classes: 3
    batch_size_per_image: 64
    box_head: {{type: TwoFCHead, fc_dim: 32}}
data:
  batch_size: 4
  train: {{type: Shapes, split: train, num_images: 16, image_size: 64, root: "{root}", progress: false}}
  val: {{type: Shapes, split: val, num_images: 8, image_size: 64, root: "{root}", progress: false}}
optimizer: {{type: AdamW, lr: 0.003}}
scheduler: {{type: Constant, warmup: null}}
evaluation: {{type: CocoEvaluator, main_metric: bbox/AP}}
trainer:
  max_epochs: 8
  log_every_n_steps: 1
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
work_dir: "{work_dir}"
"""


@pytest.fixture()
def one_thread():
    """One intra-op thread for tests of tiny tensors (more only add contention on a shared machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def tiny_config(tmp_path: Path) -> Path:
    """A config file for a tiny Faster R-CNN on 16 Shapes images of 64 px (trains in seconds)."""
    path = tmp_path / "tiny.yaml"
    path.write_text(textwrap.dedent(TINY_CONFIG.format(root=tmp_path / "data", work_dir=tmp_path / "work")))
    return path


MASK_HEAD = "model.roi_head.mask_head={type: MaskRCNNHead, num_convs: 1, conv_dim: 8}"


@pytest.fixture(scope="session")
def trained_mask_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``last.ckpt`` of the tiny detector with a mask head trained for 4 epochs on its Shapes images:
    a model whose detections vary from image to image (trained once per test session)."""
    import segkit
    from segkit.engine import runner

    root = tmp_path_factory.mktemp("trained_mask")
    cfg_path = root / "mask.yaml"
    cfg_path.write_text(textwrap.dedent(TINY_CONFIG.format(root=root / "data", work_dir=root / "work")))
    cfg = segkit.load_config(cfg_path, [MASK_HEAD, "trainer.max_epochs=4", "data.train.with_masks=true",
                                        "data.val.with_masks=true"])
    runner.train(cfg)
    return root / "work" / "checkpoints" / "last.ckpt"
