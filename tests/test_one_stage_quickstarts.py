"""The one-stage quickstarts learn the Shapes data: bbox AP50 >= 0.75 on the validation set after
training from scratch with the shipped config (each about five minutes on an idle 2-core CPU, hence slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from segkit.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["retinanet", "fcos", "yolo"])
def test_the_quickstart_learns_the_shapes(name: str, tmp_path: Path):
    assert main(["train", str(ROOT / "configs" / f"quickstart_{name}.yaml"), f"work_dir={tmp_path}"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["bbox/AP50"] >= 0.75, metrics
