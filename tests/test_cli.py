"""The `segkit` command: user errors exit with status 2 and one clear paragraph, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segkit.cli import main


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    captured = capsys.readouterr()
    return int(info.value.code), captured.err


def test_missing_config_file_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    code, err = run_cli(["train", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "nope.yaml" in err and "does not exist" in err and "Traceback" not in err


def test_typo_in_config_key_names_file_key_and_suggestion(capsys: pytest.CaptureFixture[str], tiny_config: Path):
    text = tiny_config.read_text().replace("base_channels: 8", "base_chanels: 8")
    tiny_config.write_text(text)
    code, err = run_cli(["train", str(tiny_config)], capsys)
    assert code == 2
    flat = " ".join(err.split())
    assert "model.backbone.base_chanels" in flat and "tiny.yaml" in flat and "Did you mean 'base_channels'" in flat


def test_unknown_component_name_suggests_nearest(capsys: pytest.CaptureFixture[str], tiny_config: Path):
    code, err = run_cli(["train", str(tiny_config), "model.neck.type=FNP"], capsys)
    flat = " ".join(err.split())
    assert code == 2 and "model.neck.type" in flat and "Did you mean 'FPN'" in flat and "command line" in flat


def test_trainer_option_typo_is_caught(capsys: pytest.CaptureFixture[str], tiny_config: Path):
    code, err = run_cli(["train", str(tiny_config), "trainer.max_epoch=1"], capsys)
    flat = " ".join(err.split())
    assert code == 2 and "trainer.max_epoch" in flat and "Did you mean 'max_epochs'" in flat


def test_malformed_override_exits_2(capsys: pytest.CaptureFixture[str], tiny_config: Path):
    code, err = run_cli(["train", str(tiny_config), "trainer.max_epochs"], capsys)
    assert code == 2 and "key.subkey=value" in err


def test_eval_of_missing_checkpoint_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    code, err = run_cli(["eval", str(tmp_path / "missing.ckpt")], capsys)
    assert code == 2 and "missing.ckpt" in err and "does not exist" in err


def test_eval_with_config_but_no_checkpoint_explains_usage(capsys: pytest.CaptureFixture[str], tiny_config: Path):
    code, err = run_cli(["eval", str(tiny_config)], capsys)
    assert code == 2 and "segkit eval CONFIG CKPT" in err


def test_eval_of_checkpoint_without_config_asks_for_one(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    ckpt = tmp_path / "weights.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, ckpt)
    code, err = run_cli(["eval", str(ckpt)], capsys)
    assert code == 2 and "does not carry a segkit config" in " ".join(err.split())


def test_truncated_checkpoint_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    ckpt = tmp_path / "broken.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    code, err = run_cli(["eval", str(ckpt)], capsys)
    assert code == 2 and "broken.ckpt" in err and "truncated" in err


def test_list_unknown_kind_suggests(capsys: pytest.CaptureFixture[str]):
    code, err = run_cli(["list", "backbone_s"], capsys)
    assert code == 2 and "Did you mean 'backbones'" in err


def test_list_shows_components_with_signatures(capsys: pytest.CaptureFixture[str]):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("ResNet", "FPN", "RPN", "StandardRoIHead", "TwoStageDetector", "Shapes", "CocoEvaluator"):
        assert name in out
    assert "depth=50" in out and "segkit_plugins.backbones.resnet" in out


def test_config_prints_the_merged_config(capsys: pytest.CaptureFixture[str]):
    assert main(["config", "configs/quickstart.yaml", "trainer.max_epochs=5"]) == 0
    out = capsys.readouterr().out
    assert "type: TwoStageDetector" in out and "max_epochs: 5" in out and "_base_" not in out


def test_real_process_exits_2_without_traceback_and_debug_shows_it(tmp_path: Path):
    env = {**os.environ}
    cmd = [sys.executable, "-m", "segkit.cli"]
    result = subprocess.run([*cmd, "config", str(tmp_path / "absent.yaml")], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 2 and "absent.yaml" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([*cmd, "--debug", "config", str(tmp_path / "absent.yaml")], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_num_classes_disagreeing_with_the_dataset_is_named(capsys: pytest.CaptureFixture[str], tiny_config: Path):
    code, err = run_cli(["train", str(tiny_config), "model.roi_head.num_classes=80"], capsys)
    flat = " ".join(err.split())
    assert code == 2
    assert "model.roi_head.num_classes=80 but data.train has 3 categories (circle, square, triangle)" in flat
    assert "command line" in flat


def test_version_names_segkit_and_the_torch_it_runs_on(capsys: pytest.CaptureFixture[str]):
    import importlib.metadata

    import segkit

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == (f"segkit {segkit.__version__} (torch {importlib.metadata.version('torch')}, "
                                               f"torchvision {importlib.metadata.version('torchvision')})")
