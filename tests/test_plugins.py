"""Third-party plugins: a module under `imports:` and a real entry point of another distribution."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from segkit.config import load_config
from segkit.errors import ConfigError
from segkit.registry import BACKBONES

PLUGIN_SOURCE = '''
from collections import OrderedDict
import torch
from torch import nn
from segkit.ops import ShapeSpec
from segkit.registry import BACKBONES


@BACKBONES.register()
class {name}(nn.Module):
    """A two-level toy backbone."""

    def __init__(self, *, width: int = 8) -> None:
        super().__init__()
        self.width = width
        self.stem = nn.Conv2d(3, width, 3, stride=4, padding=1)
        self.down = nn.Conv2d(width, width, 3, stride=2, padding=1)

    def output_shape(self):
        return {{"c2": ShapeSpec(self.width, 4), "c3": ShapeSpec(self.width, 8)}}

    def forward(self, x):
        c2 = self.stem(x)
        return OrderedDict(c2=c2, c3=self.down(c2))
'''


def test_imports_loads_a_local_plugin_file_relative_to_the_config(tmp_path: Path):
    (tmp_path / "plugins_dir").mkdir()
    (tmp_path / "plugins_dir" / "toy_backbone.py").write_text(PLUGIN_SOURCE.format(name="ImportedToyBackbone"))
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("imports: [plugins_dir/toy_backbone.py]\nmodel: {type: X}\n")
    load_config(cfg_file)
    backbone = BACKBONES.build({"type": "ImportedToyBackbone", "width": 4}, path="model.backbone")
    import torch

    out = backbone(torch.zeros(1, 3, 32, 32))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"c2": (1, 4, 8, 8), "c3": (1, 4, 4, 4)}
    assert backbone.output_shape()["c3"].stride == 8


def test_imports_by_module_name_on_sys_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "my_toy_pkg.py").write_text(PLUGIN_SOURCE.format(name="ModuleToyBackbone"))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("imports: [my_toy_pkg]\n")
    load_config(cfg_file)
    assert "ModuleToyBackbone" in BACKBONES


def test_imports_of_a_missing_module_names_the_item_and_file(tmp_path: Path):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("imports: [no_such_plugin_module_xyz]\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg_file)
    assert "no_such_plugin_module_xyz" in str(info.value) and "cfg.yaml" in str(info.value)
    assert info.value.key == "imports[0]"


def _fake_distribution(root: Path) -> None:
    """A distribution on sys.path with two `segkit.plugins` entry points, one of them broken."""
    (root / "toy_ep_plugin.py").write_text(PLUGIN_SOURCE.format(name="EntryPointToyBackbone"))
    (root / "broken_ep_plugin.py").write_text("raise RuntimeError('this plugin is broken on purpose')\n")
    info = root / "toy_segkit_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-segkit-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[segkit.plugins]\ntoy = toy_ep_plugin\nbroken = broken_ep_plugin\n"
    )


def _run(code: str, root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=120)


def test_entry_point_plugin_is_discovered_and_a_broken_one_does_not_break_others(tmp_path: Path):
    _fake_distribution(tmp_path)
    result = _run("""
        from segkit.registry import BACKBONES, plugin_errors
        entry = next(e for e in BACKBONES.entries() if e.name == 'EntryPointToyBackbone')
        print('FOUND', entry.module, entry.plugin)
        print('RESNET', 'ResNet' in BACKBONES)
        print('ERRORS', [(e.module, e.error) for e in plugin_errors()])
        try:
            BACKBONES.get('EntryPointToyBackbonee')
        except Exception as exc:
            print('UNKNOWN', exc)
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "FOUND toy_ep_plugin toy from toy-segkit-plugin" in out
    assert "RESNET True" in out
    assert "broken_ep_plugin" in out and "broken on purpose" in out
    unknown = next(line for line in out.splitlines() if line.startswith("UNKNOWN"))
    assert "Did you mean 'EntryPointToyBackbone'" in unknown and "broken" in unknown


def test_segkit_list_shows_plugins_and_failures(tmp_path: Path):
    _fake_distribution(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "segkit.cli", "list", "backbones"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "EntryPointToyBackbone" in result.stdout and "toy from toy-segkit-plugin" in result.stdout
    assert "ResNet" in result.stdout and "depth" in result.stdout
    assert "failed to import" in result.stdout and "broken on purpose" in result.stdout
