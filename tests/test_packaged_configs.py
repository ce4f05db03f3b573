"""The configs shipped in the package: by name from any folder, ``segkit://`` in ``_base_``,
``segkit configs`` (list, copy), and a wheel installed outside the repository training the quickstart."""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from segkit.cli import main
from segkit.config import dump_config, load_config
from segkit.config_files import copy_config, find_config, packaged_config, packaged_configs, packaged_dir
from segkit.errors import ConfigError
from tests.weight_cache import random_state

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_holds_every_config_of_the_repository():
    files = {p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.yaml")}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["segkit_configs"]
    assert {f for f in files if not any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs)} == set()
    names = {c.name for c in packaged_configs(bases=True)}
    assert names == {f[:-len(".yaml")] for f in files}
    assert {c.name for c in packaged_configs()} == {p.stem for p in (ROOT / "configs").glob("*.yaml")}
    assert all(c.description for c in packaged_configs())


def test_a_config_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = os.path.join(packaged_dir(), "quickstart.yaml")
    for name in ("quickstart", "quickstart.yaml", "configs/quickstart.yaml", "segkit://quickstart"):
        assert find_config(name) == expected, name
    assert load_config("quickstart")["model"]["backbone"]["depth"] == 18
    (tmp_path / "quickstart.yaml").write_text("model: {type: Mine}\n")  # a file next to the user wins
    assert find_config("quickstart.yaml") == "quickstart.yaml"
    assert find_config("segkit://quickstart") == expected


def test_an_unknown_config_names_the_folder_and_the_closest_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        find_config("quikstart_mask")
    message = str(info.value)
    assert f"'quikstart_mask' does not exist (looked in {tmp_path})" in message
    assert "Did you mean 'quickstart_mask'" in message and "segkit configs" in message
    for escape in ("segkit://../pyproject.toml", "segkit:///etc/passwd", "segkit://"):
        with pytest.raises(ConfigError, match="no packaged config"):
            packaged_config(escape)


def test_base_names_a_packaged_config(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("_base_: [segkit://quickstart_mask]\ntrainer: {max_epochs: 1}\n")
    cfg = load_config(mine)
    assert cfg["model"]["roi_head"]["mask_head"]["type"] == "MaskRCNNHead"
    assert cfg["trainer"]["max_epochs"] == 1
    assert cfg.origins["trainer.max_epochs"] == str(mine)
    mine.write_text("_base_:\n  - segkit://_base_/models/mask_rcnn_r50_fn.yaml\n")
    with pytest.raises(ConfigError) as info:
        load_config(mine)
    assert info.value.key == "_base_" and info.value.file == str(mine)
    assert "Did you mean '_base_/models/mask_rcnn_r50_fpn'" in str(info.value)


@pytest.mark.parametrize("name", [c.name for c in packaged_configs()])
def test_a_copy_is_the_packaged_config(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    written = copy_config(name)
    assert written == f"{name}.yaml"
    bases = yaml.safe_load(Path(written).read_text()).get("_base_", [])
    assert all(base.startswith("segkit://") for base in ([bases] if isinstance(bases, str) else bases))
    monkeypatch.setenv("SEGKIT_DATA", str(tmp_path / "data"))
    assert dump_config(load_config(written, import_plugins=False)) == dump_config(
        load_config(packaged_config(name), import_plugins=False))


def test_segkit_configs_lists_and_copies(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    assert "  quickstart " in out and "panet_r50_fpn_coco" in out and "_base_/" not in out
    assert main(["configs", "list", "--all"]) == 0
    assert "_base_/models/mask_rcnn_r50_fpn " in capsys.readouterr().out
    (tmp_path / "mine").mkdir()
    assert main(["configs", "copy", "panet_r50_fpn_coco", "mine"]) == 0
    assert (tmp_path / "mine" / "panet_r50_fpn_coco.yaml").is_file()
    capsys.readouterr()
    assert _exit_status(["configs", "copy", "panet_r50_fpn_coco", "mine"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "'mine/panet_r50_fpn_coco.yaml' exists" in err and "--force" in err and "Traceback" not in err
    assert main(["configs", "copy", "panet_r50_fpn_coco", "mine", "--force"]) == 0
    assert _exit_status(["configs", "copy", "panet_r51"]) == 2
    assert "Did you mean 'panet_r50_fpn_coco'" in " ".join(capsys.readouterr().err.split())


def _exit_status(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


# 85 s (a wheel build and an environment of its own): in the slow suite; the package's configs and
# their use by name from any folder are checked by the tests above.
@pytest.mark.slow
def test_from_the_wheel_to_a_model_trained_on_your_coco_data(tmp_path):
    """`pip install segkit_cv-*.whl` (not editable) into an environment of its own, then, in an empty
    folder outside the repository: list the configs, copy the quickstart, point it at a COCO-format
    folder and at named ImageNet weights (cached: a random stand-in, nothing is downloaded), train a few
    steps, evaluate with --results, and score that file: the same 12 numbers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(dist),
          str(ROOT)], cwd=tmp_path, env=env)
    (wheel,) = dist.glob("segkit_cv-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path, env=env)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path, env=env).stdout.strip())
    # torch and the other dependencies come from the test environment; segkit only from the wheel
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", str(wheel)],
         cwd=tmp_path, env=env)
    user = tmp_path / "user"
    user.mkdir()
    env.update(SEGKIT_DATA=str(tmp_path / "segkit-data"), TORCH_HOME=str(tmp_path / "torch"), HF_HUB_OFFLINE="1")
    segkit = str(venv / "bin" / "segkit")

    # a COCO-format folder of the user's (written by segkit's Shapes generator), and where segkit comes from
    where = _run([str(python), "-c", "import segkit, segkit_configs\n"
                  "from segkit.data.shapes import generate_shapes\n"
                  "for split, n in (('train', 16), ('val', 8)):\n"
                  "    generate_shapes('mine', split=split, num_images=n, image_size=64, progress=False)\n"
                  "print(segkit.__file__, segkit_configs.__file__)"], cwd=user, env=env).stdout
    assert str(ROOT) not in where and str(site) in where
    assert "quickstart_mask" in _run([segkit, "configs"], cwd=user, env=env).stdout
    assert "PAFPN" in _run([segkit, "config", "panet_r50_fpn_coco"], cwd=user, env=env).stdout
    _run([segkit, "configs", "copy", "quickstart"], cwd=user, env=env)
    config = user / "quickstart.yaml"
    text = config.read_text()
    data = text[text.index("\ndata:\n"):text.index("\noptimizer:")]
    config.write_text(text.replace(data, """
data:
  batch_size: 4
  train: {_delete_: true, type: CocoDataset, ann_file: mine/annotations/instances_train.json,
          img_dir: mine/images/train}
  val: {_delete_: true, type: CocoDataset, ann_file: mine/annotations/instances_val.json, img_dir: mine/images/val}
""").replace("base_channels: 32", "base_channels: 64\n    pretrained: torchvision://resnet18"))
    weights = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    offline = subprocess.run([segkit, "config", "quickstart.yaml", "--check"], cwd=user, env=env, capture_output=True,
                             text=True, timeout=300)  # offline, not cached yet: the file and where it goes
    assert offline.returncode == 2 and str(weights) in offline.stderr and "Traceback" not in offline.stderr, offline.stderr
    weights.parent.mkdir(parents=True, exist_ok=True)  # the offline attempt may have made it
    torch.save(random_state(torchvision.models.resnet18()), weights)  # torchvision://resnet18's file, cached
    _run([segkit, "train", "quickstart.yaml", "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=2",
          "trainer.enable_progress_bar=false", "scheduler.warmup_iters=1"], cwd=user, env=env)
    last = "work_dirs/quickstart/checkpoints/last.ckpt"
    _run([segkit, "eval", last, "--results", "results.json", "--out", "eval.json"], cwd=user, env=env)
    _run([segkit, "score", "--task", "bbox", "--gt", "mine/annotations/instances_val.json", "--pred", "results.json",
          "--out", "score.json"], cwd=user, env=env)
    evaluated, scored = (json.loads((user / name).read_text()) for name in ("eval.json", "score.json"))
    bbox = {k: v for k, v in evaluated.items() if k.startswith("bbox/")}
    assert len(bbox) == 12 and bbox == {k: v for k, v in scored.items() if k.startswith("bbox/")}
    images = {r["image_id"] for r in json.loads((user / "results.json").read_text())}
    assert images <= {i["id"] for i in json.loads((user / "mine/annotations/instances_val.json").read_text())["images"]}
