"""The example plugin distribution in docs/examples: pip-installed, discovered through its entry point,
trained in a detector and a segmentor, and equal to torchvision on the same weights."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision

PACKAGE = Path(__file__).parent.parent / "docs" / "examples" / "segkit-torchvision-backbones"

DETECTOR = """
model:
  type: TwoStageDetector
  backbone: {{type: MobileNetV3, arch: mobilenet_v3_small}}
  neck: {{type: FPN, in_features: [c3, c4, c5], out_channels: 16}}
  rpn_head:
    type: RPN
    in_features: [p3, p4, p5, p6]
    anchor_sizes: [[16], [32], [64], [128]]
    pre_nms_top_n_train: 100
    post_nms_top_n_train: 50
    pre_nms_top_n_test: 50
    post_nms_top_n_test: 20
  roi_head:
    type: StandardRoIHead
    in_features: [p3, p4, p5]
    num_classes: 3
    batch_size_per_image: 32
    box_head: {{type: TwoFCHead, fc_dim: 32}}
data:
  batch_size: 4
  train: {{type: Shapes, split: train, num_images: 8, image_size: 64, root: "{root}", progress: false}}
  val: {{type: Shapes, split: val, num_images: 4, image_size: 64, root: "{root}", progress: false}}
optimizer: {{type: AdamW, lr: 0.001}}
evaluation: {{type: CocoEvaluator, main_metric: bbox/AP}}
trainer: {{max_epochs: 2, num_sanity_val_steps: 0, enable_progress_bar: false, enable_model_summary: false}}
work_dir: "{work}"
"""

SEGMENTOR = """
model:
  type: EncoderDecoder
  backbone: {{type: RegNet, arch: regnet_x_400mf}}
  neck: {{type: FPN, in_features: [c2, c3, c4, c5], out_channels: 16}}
  decode_head: {{type: FCNHead, in_features: p3, num_convs: 1, channels: 16, num_classes: 4}}
data:
  batch_size: 4
  train: {{type: ShapesSegmentation, split: train, num_images: 8, image_size: 64, root: "{root}", progress: false}}
  val: {{type: ShapesSegmentation, split: val, num_images: 4, image_size: 64, root: "{root}", progress: false}}
optimizer: {{type: AdamW, lr: 0.001}}
evaluation: {{type: SemSegEvaluator, main_metric: mIoU}}
trainer: {{max_epochs: 2, num_sanity_val_steps: 0, enable_progress_bar: false, enable_model_summary: false}}
work_dir: "{work}"
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The example package pip-installed into a folder of its own (with its entry-point metadata)."""
    target = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target",
         str(target), str(PACKAGE)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert list(target.glob("segkit_torchvision_backbones-*.dist-info/entry_points.txt"))
    return target


def _segkit(args: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, "-m", "segkit.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def test_installed_plugin_is_listed_with_its_distribution(installed: Path, tmp_path: Path):
    result = _segkit(["list", "backbones"], installed, tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("MobileNetV3", "ConvNeXt", "RegNet"):
        assert name in result.stdout
    assert "from segkit-torchvision-backbones" in result.stdout


@pytest.mark.parametrize("template, metric", [(DETECTOR, "\nbbox "), (SEGMENTOR, "mIoU")], ids=["detector", "segmentor"])
def test_installed_plugin_trains_in_a_detector_and_a_segmentor(installed: Path, tmp_path: Path, template: str,
                                                               metric: str):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(textwrap.dedent(template.format(root=tmp_path / "data", work=tmp_path / "work")))
    result = _segkit(["train", str(cfg)], installed, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Final metrics" in result.stdout and metric in result.stdout
    assert (tmp_path / "work" / "checkpoints" / "last.ckpt").is_file()


def test_same_weights_give_torchvision_features(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(PACKAGE / "src"))
    from segkit_tv_backbones.backbones import TorchvisionBackbone  # noqa: F401 - registers nothing twice below
    import segkit_tv_backbones.backbones as plugin

    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v3_small().eval()
    path = tmp_path / "mnv3.pth"
    torch.save(reference.state_dict(), path)
    backbone = plugin.MobileNetV3(arch="mobilenet_v3_small", pretrained=str(path)).eval()
    x = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        assert torch.equal(backbone(x)["c5"], reference.features(x))
    with pytest.raises(Exception, match="does not fit"):
        torch.save(torchvision.models.mobilenet_v3_large().state_dict(), tmp_path / "large.pth")
        plugin.MobileNetV3(arch="mobilenet_v3_small", pretrained=str(tmp_path / "large.pth"))
    with pytest.raises(Exception, match="Did you mean 'mobilenet_v3_small'"):
        plugin.MobileNetV3(arch="mobilenet_v3_smal")


def test_the_guide_s_backbone_and_neck_work_as_written(tmp_path: Path):
    """docs/plugins.md's code blocks, run as a user would paste them, in a whole detector."""
    import re

    guide = (PACKAGE.parent.parent / "plugins.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", guide, flags=re.S)
    source = "\n".join(b.replace("@BACKBONES.register()", "@BACKBONES.register(force=True)")
                       .replace("@NECKS.register()", "@NECKS.register(force=True)") for b in blocks[:2])
    (tmp_path / "guide_plugins.py").write_text(source)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(textwrap.dedent(DETECTOR.format(root=tmp_path / "data", work=tmp_path / "work"))
                   .replace("{type: MobileNetV3, arch: mobilenet_v3_small}", "{type: TinyBackbone, width: 8}")
                   .replace("{type: FPN, in_features: [c3, c4, c5], out_channels: 16}",
                            "{type: LateralOnly, in_features: [c3, c4, c5], out_channels: 16}")
                   .replace("in_features: [p3, p4, p5, p6]", "in_features: [p3, p4, p5]")
                   .replace("anchor_sizes: [[16], [32], [64], [128]]", "anchor_sizes: [[16], [32], [64]]")
                   .replace("model:\n", "imports: [guide_plugins.py]\nmodel:\n", 1))
    import segkit

    model = segkit.build_model(segkit.load_config(cfg))
    backbone = model.backbone
    for size in ((64, 64), (96, 128)):
        out = backbone(torch.zeros(1, 3, *size))
        assert {k: (v.shape[1], size[0] // v.shape[2]) for k, v in out.items()} == \
            {k: (s.channels, s.stride) for k, s in backbone.output_shape().items()}
    model.train()
    losses = model([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]),
                                               "labels": torch.tensor([1])}])
    assert all(torch.isfinite(v) for v in losses.values())
