"""Distributed (DDP on CPU, 2 processes): training runs and evaluation equals single-process evaluation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_CONFIG


def _segkit(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "segkit.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow  # 50-65 s; DDP training stays in the default suite through tests/test_nonfinite.py
def test_ddp_training_and_evaluation_match_single_process(tmp_path: Path):
    # 7 validation images over 2 processes: the sampler pads with a duplicate that must not count twice.
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY_CONFIG.format(root=tmp_path / "data", work_dir=tmp_path / "work")
                   .replace("split: val, num_images: 8", "split: val, num_images: 7"))
    ddp = ["trainer.devices=2", "trainer.strategy=ddp"]
    result = _segkit("train", str(cfg), *ddp, "trainer.max_epochs=6", "trainer.check_val_every_n_epoch=3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Final metrics") == 1  # reported once, by rank 0
    ckpt = tmp_path / "work" / "checkpoints" / "last.ckpt"
    trained = json.loads((tmp_path / "work" / "metrics.json").read_text())

    single, multi = tmp_path / "single.json", tmp_path / "multi.json"
    assert _segkit("eval", str(ckpt), "--out", str(single), cwd=tmp_path).returncode == 0
    result = _segkit("eval", str(ckpt), *ddp, "--out", str(multi), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = json.loads(single.read_text()), json.loads(multi.read_text())
    assert one.keys() == two.keys()
    for key in one:
        assert one[key] == pytest.approx(two[key], abs=1e-12), key
        assert one[key] == pytest.approx(trained[key], abs=1e-12), key
    assert any(v > 0 for v in one.values())  # a real, non-degenerate comparison
