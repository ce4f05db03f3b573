"""Hostile and careless configs and checkpoints: stored plugin imports, values out of range, YAML that
expands or nests without bound, text encodings. Each ends in one clear message (exit 2 on the command
line) before any data is read or any model built, and a checkpoint never runs code."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

import segkit
from segkit.checkpoint import CONFIG_KEY
from segkit.cli import main
from tests.conftest import TINY_CONFIG

_PLUGIN = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")
import torch
from segkit.registry import BACKBONES

@BACKBONES.register()
class StrangerNet(torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
"""


def _exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err and err.startswith("segkit: error:"), err
    return " ".join(err.split())


def _tiny_cfg(tmp_path: Path, *overrides: str) -> segkit.Config:
    path = tmp_path / "tiny.yaml"
    path.write_text(textwrap.dedent(TINY_CONFIG.format(root=tmp_path / "data", work_dir=tmp_path / "work")))
    return segkit.load_config(path, list(overrides))


def _checkpoint_naming_imports(tmp_path: Path, imports: list[str], *, backbone: str = "ResNet") -> Path:
    """A checkpoint of the tiny detector whose stored config lists ``imports`` (built-in backbone unless
    ``backbone`` names the plugin's)."""
    cfg = _tiny_cfg(tmp_path)
    model = segkit.build_model(cfg)
    stored = cfg.to_dict()
    stored["imports"] = imports
    if backbone != "ResNet":
        stored["model"]["backbone"] = {"type": backbone}
    path = tmp_path / "stranger.ckpt"
    torch.save({"state_dict": model.state_dict(), CONFIG_KEY: stored}, path)
    return path


@pytest.mark.parametrize("form", ["absolute", "relative", "module"])
def test_a_checkpoint_s_stored_imports_are_never_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str):
    marker = tmp_path / "ran.txt"
    (tmp_path / "stranger_plugin.py").write_text(_PLUGIN.format(marker=str(marker)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    item = {"absolute": str(tmp_path / "stranger_plugin.py"), "relative": "stranger_plugin.py",
            "module": "stranger_plugin"}[form]
    ckpt = _checkpoint_naming_imports(tmp_path, [item])
    cfg = segkit.config_from_checkpoint(ckpt)
    model = segkit.load_model(ckpt)
    assert not marker.exists()
    assert cfg.skipped_imports == [item] and "imports" not in cfg
    assert not model.training


def test_eval_of_a_checkpoint_that_needs_its_plugin_names_the_module_and_how_to_allow_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    marker = tmp_path / "ran.txt"
    plugin = tmp_path / "stranger_plugin.py"
    plugin.write_text(_PLUGIN.format(marker=str(marker)))
    ckpt = _checkpoint_naming_imports(tmp_path, [str(plugin)], backbone="StrangerNet")
    Image.new("RGB", (32, 32)).save(tmp_path / "image.png")
    for command in (["eval", str(ckpt)], ["predict", str(ckpt), str(tmp_path), "--out", str(tmp_path / "out")]):
        err = _exit_2(capsys, command)
        assert "unknown backbone type 'StrangerNet'" in err and str(plugin) in err, err
        assert "never loads code" in err and "imports=[...]" in err, err
    assert not marker.exists()


def test_imports_given_on_the_command_line_load_a_checkpoint_s_plugin(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch):
    marker = tmp_path / "ran.txt"
    (tmp_path / "stranger_plugin2.py").write_text(_PLUGIN.format(marker=str(marker)).replace("StrangerNet",
                                                                                            "StrangerNet2"))
    ckpt = _checkpoint_naming_imports(tmp_path, ["stranger_plugin2.py"])
    monkeypatch.chdir(tmp_path)
    cfg = segkit.config_from_checkpoint(ckpt, ["imports=[stranger_plugin2.py]"])
    assert marker.exists() and cfg.skipped_imports == []


# ------------------------------------------------------------------ values checked before any work
@pytest.mark.parametrize(("override", "key", "expected"), [
    ("seed=null", "seed", "seed must be an integer in [0, 4294967295], got null"),
    ("seed=ten", "seed", "got 'ten'"),
    ("seed=-1", "seed", "in [0, 4294967295]"),
    ("optimizer.lr=.nan", "optimizer.lr", "lr must be a finite number > 0, got nan"),
    ("optimizer.lr=-0.1", "optimizer.lr", "> 0, got -0.1"),
    ("optimizer.weight_decay=-1", "optimizer.weight_decay", ">= 0"),
    ("optimizer.betas=[0.9, 1.5]", "optimizer.betas", "[0, 1)"),
    ("data.batch_size=0", "data.batch_size", "batch_size must be an integer >= 1, got 0"),
    ("data.batch_size=-4", "data.batch_size", ">= 1"),
    ("data.num_workers=-1", "data.num_workers", "integer in [0, 256]"),
    ("data.num_workers=100000", "data.num_workers", "integer in [0, 256]"),
    ("trainer.max_epochs=-5", "trainer.max_epochs", ">= -1 or null (-1: no limit), got -5"),
    ("trainer.accelerator=gpu", "trainer.accelerator", "not available on this machine"),
    ("trainer.accelerator=gpo", "trainer.accelerator", "unknown accelerator 'gpo'"),
    ("trainer.devices=0", "trainer.devices", "integer >= 1"),
    ("trainer.strategy=ddq", "trainer.strategy", "Did you mean 'ddp'"),
    ("trainer.limit_val_batches=1.5", "trainer.limit_val_batches", "fraction"),
    ("trainer=[1, 2]", "trainer", "trainer must be a mapping"),
    ("data=[1]", "data", "data must be a mapping"),
    ("optimizer=fast", "optimizer", "optimizer must be a mapping"),
    ("work_dir=[a]", "work_dir", "folder path"),
    ("scheduler.warmup_iters=-3", "scheduler.warmup_iters", "warmup_iters must be an integer >= 0, got -3"),
    ("scheduler.gamma=0", "scheduler.gamma", "> 0"),
    ("scheduler.milestones=[-1]", "scheduler.milestones", "integers >= 0"),
    ("data.train.num_imagez=4", "data.train.num_imagez", "Did you mean 'num_images'"),
    ("data.val=[1]", "data.val", "must be a mapping or null, got [1]"),
    ("data.val={_delete_: true, root: x}", "data.val", "a dataset is a mapping with a 'type' key"),
    ("engine.keep_best=0", "engine.keep_best", "positive integer"),
])
def test_a_bad_value_is_named_with_its_range_before_any_data_is_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, key: str, expected: str):
    config = tmp_path / "tiny.yaml"
    config.write_text(textwrap.dedent(TINY_CONFIG.format(root=tmp_path / "data", work_dir=tmp_path / "work")))
    err = _exit_2(capsys, ["train", str(config), override])
    assert f"at '{key}'" in err and "in command line" in err and expected in err, err
    assert not (tmp_path / "data").exists() and not (tmp_path / "work").exists()  # no data read, nothing written


def test_a_bad_value_in_a_file_names_the_file_that_set_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    base = tmp_path / "base.yaml"
    base.write_text(textwrap.dedent(TINY_CONFIG.format(root=tmp_path / "data", work_dir=tmp_path / "work")))
    child = tmp_path / "child.yaml"
    child.write_text("_base_: base.yaml\ndata: {num_workers: -1}\n")
    err = _exit_2(capsys, ["config", "--check", str(child)])
    assert f"at 'data.num_workers' in {child}" in err, err
    err = _exit_2(capsys, ["eval", str(child), str(tmp_path / "missing.ckpt"), "trainer.max_epochs=-5"])
    assert "does not exist" in err  # eval checks the checkpoint first


# ------------------------------------------------------------------ YAML that costs without bound
def _alias_bomb(levels: int = 8) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def _run_cli(args: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The command in its own process, so a regression that hangs fails the test instead of stalling it."""
    return subprocess.run([sys.executable, "-m", "segkit.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    config = tmp_path / "bomb.yaml"
    config.write_text("model: {type: TwoStageDetector}\nevaluation:\n  " + _alias_bomb().replace("\n", "\n  "))
    err = _exit_2(capsys, ["config", str(config)])
    assert f"in {config}" in err and "expands to more than 100,000 values" in err and "aliases" in err, err


def test_an_alias_bomb_in_a_checkpoint_s_stored_config_is_refused(tmp_path: Path):
    levels: list = [["x"] * 10]
    for _ in range(8):
        levels.append([levels[-1]] * 10)  # the pickle stores each level once; copying expands it 10^8 times
    stored = {"model": {"type": "TwoStageDetector"}, "evaluation": {"junk": levels[-1]}}
    ckpt = tmp_path / "bomb.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, CONFIG_KEY: stored}, ckpt)
    done = _run_cli(["eval", str(ckpt)], tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"config stored in checkpoint '{ckpt}' cannot be used" in " ".join(done.stderr.split()), done.stderr


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, "a:\n" + "".join("  " * i + "b:\n" for i in range(1, 200))])
def test_deeply_nested_yaml_is_refused_with_the_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str):
    config = tmp_path / "deep.yaml"
    config.write_text(text)
    err = _exit_2(capsys, ["config", str(config)])
    assert f"in {config}" in err and "nested deeper than the 64 levels" in err, err


def test_a_deep_override_value_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    config = tmp_path / "c.yaml"
    config.write_text("seed: 0\n")
    err = _exit_2(capsys, ["config", str(config), "model.x=" + "[" * 5000 + "]" * 5000])
    assert "at 'model.x' in command line" in err and "nested deeper" in err, err
    err = _exit_2(capsys, ["config", str(config), "model." + ".".join(["a"] * 100) + "=1"])
    assert "nested deeper" in err, err


def test_a_long_base_chain_is_refused_naming_its_ends(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    for i in range(40):
        (tmp_path / f"c{i}.yaml").write_text(f"_base_: c{i + 1}.yaml\n" if i < 39 else "seed: 0\n")
    err = _exit_2(capsys, ["config", str(tmp_path / "c0.yaml")])
    assert "more than 16 files deep" in err and "c0.yaml" in err and "_base_" in err, err


def test_a_base_diamond_that_doubles_at_each_level_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    for i in range(15):  # each file lists the next twice: 2^15 reads without a limit
        (tmp_path / f"d{i}.yaml").write_text(f"_base_: [d{i + 1}.yaml, d{i + 1}.yaml]\n")
    (tmp_path / "d15.yaml").write_text("seed: 0\n")
    err = _exit_2(capsys, ["config", str(tmp_path / "d0.yaml")])
    assert "more than 64 times" in err, err


def test_an_interpolation_bomb_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    lines = ["engine:", "  v0: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"]
    lines += [f"  v{i}: [{', '.join([repr('${engine.v' + str(i - 1) + '}')] * 10)}]" for i in range(1, 9)]
    lines += ["  s0: xxxxxxxxxx"] + [f"  s{i}: {'${engine.s' + str(i - 1) + '}' * 10}" for i in range(1, 9)]
    config = tmp_path / "interp.yaml"
    config.write_text("\n".join(lines) + "\n")
    err = _exit_2(capsys, ["config", str(config)])
    assert "interpolations (${...}) expand to more than 100,000" in err and "at 'engine.v" in err, err


# ------------------------------------------------------------------ how values are read
def test_numbers_in_exponent_notation_are_numbers(tmp_path: Path):
    config = tmp_path / "lr.yaml"
    config.write_text("optimizer: {type: AdamW, lr: 1e-4, weight_decay: 5E-2, eps: 1e-8}\n")
    cfg = segkit.load_config(config, ["optimizer.momentum=2e-1"])
    assert cfg["optimizer"] == {"type": "AdamW", "lr": 1e-4, "weight_decay": 0.05, "eps": 1e-8, "momentum": 0.2}


def test_dates_stay_text(tmp_path: Path):
    config = tmp_path / "d.yaml"
    config.write_text("work_dir: 2024-01-31\n")
    assert segkit.load_config(config)["work_dir"] == "2024-01-31"


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    config = tmp_path / "dup.yaml"
    config.write_text("seed: 0\noptimizer:\n  type: SGD\n  lr: 0.1\n  lr: 0.01\n")
    err = _exit_2(capsys, ["config", str(config)])
    assert f"in {config}" in err and "line 5" in err and "key 'lr' appears twice" in err and "first at line 4" in err, err
    err = _exit_2(capsys, ["config", str(config).replace("dup", "dup"), "optimizer={lr: 1, lr: 2}"])
    assert "appears twice" in err


def test_merge_keys_may_repeat_what_they_merge(tmp_path: Path):
    config = tmp_path / "merge.yaml"
    config.write_text("engine:\n  a: &base {x: 1, y: 2}\n  b:\n    <<: *base\n    x: 3\n")
    assert segkit.load_config(config)["engine"]["b"] == {"x": 3, "y": 2}


def test_an_environment_variable_is_read_as_yaml_like_its_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    config = tmp_path / "env.yaml"
    config.write_text("data: {batch_size: '${env:SEGKIT_BS,4}'}\nwork_dir: ${env:SEGKIT_WD}\n"
                      "engine: {load_from: '${env:SEGKIT_NULL}'}\n")
    monkeypatch.setenv("SEGKIT_BS", "2")
    monkeypatch.setenv("SEGKIT_WD", "runs/a #1")  # text is kept exactly, a '#' included
    monkeypatch.setenv("SEGKIT_NULL", "null")
    cfg = segkit.load_config(config)
    assert cfg["data"]["batch_size"] == 2 and cfg["work_dir"] == "runs/a #1" and cfg["engine"]["load_from"] is None


# ------------------------------------------------------------------ text encodings
@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig", "utf-16-be"])
def test_a_config_saved_with_a_byte_order_mark_is_read(tmp_path: Path, encoding: str):
    config = tmp_path / "win.yaml"
    text = "seed: 3\ndata: {batch_size: 2}\nwork_dir: runs/été\n"
    data = text.encode(encoding)
    if encoding == "utf-16-be":
        data = b"\xfe\xff" + data
    config.write_bytes(data)  # what PowerShell's `>` writes (UTF-16 with a byte-order mark)
    cfg = segkit.load_config(config)
    assert cfg["seed"] == 3 and cfg["data"]["batch_size"] == 2 and cfg["work_dir"] == "runs/été"


def test_a_config_that_is_not_utf8_names_the_file_line_and_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("seed: 0\nwork_dir: runs/caf\u00e9\n".encode("latin-1"))
    err = _exit_2(capsys, ["config", str(config)])
    assert str(config) in err and "not valid UTF-8" in err and "line 2" in err and "Save the file as UTF-8" in err, err


def test_config_check_builds_the_model_and_reads_no_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    config = tmp_path / "tiny.yaml"
    config.write_text(textwrap.dedent(TINY_CONFIG.format(root=tmp_path / "data", work_dir=tmp_path / "work")))
    assert main(["config", str(config), "--check"]) == 0
    out = capsys.readouterr().out
    assert "every value checked; the model builds (TwoStageDetector" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]  # no data generated, no work_dir
