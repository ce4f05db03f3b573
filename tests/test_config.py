"""Config loading: _base_ inheritance, _delete_, overrides, interpolation, error messages."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from segkit.config import load_config
from segkit.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture()
def base_tree(tmp_path: Path) -> Path:
    write(tmp_path / "_base_" / "model.yaml", """
        model:
          type: TwoStageDetector
          backbone: {type: ResNet, depth: 50, frozen_stages: 1}
          neck: {type: FPN, out_channels: 256}
          rpn_head: {type: RPN}
          roi_head: {type: StandardRoIHead, num_classes: 3}
        """)
    write(tmp_path / "_base_" / "data.yaml", """
        data:
          batch_size: 2
          train: {type: Shapes, split: train}
        """)
    return write(tmp_path / "child.yaml", """
        _base_: [_base_/model.yaml, _base_/data.yaml]
        model:
          backbone: {depth: 18}
          neck: {_delete_: true, type: FPN, out_channels: 64}
        data:
          val_batch_size: ${data.batch_size}
        work_dir: runs/${model.backbone.type}-${model.backbone.depth}
        """)


def test_base_files_merge_depth_first_and_child_wins(base_tree: Path):
    cfg = load_config(base_tree)
    assert cfg["model"]["backbone"] == {"type": "ResNet", "depth": 18, "frozen_stages": 1}
    assert cfg["data"]["train"] == {"type": "Shapes", "split": "train"}


def test_delete_replaces_instead_of_merging(base_tree: Path):
    assert load_config(base_tree)["model"]["neck"] == {"type": "FPN", "out_channels": 64}


def test_interpolation_keeps_types_and_substitutes_in_strings(base_tree: Path):
    cfg = load_config(base_tree)
    assert cfg["data"]["val_batch_size"] == 2 and isinstance(cfg["data"]["val_batch_size"], int)
    assert cfg["work_dir"] == "runs/ResNet-18"


def test_overrides_parse_yaml_values_and_apply_before_interpolation(base_tree: Path):
    cfg = load_config(base_tree, ["data.batch_size=8", "model.backbone.depth=101", "model.neck.extra=[1, 2]",
                                  "model.roi_head=null"])
    assert cfg["data"]["val_batch_size"] == 8
    assert cfg["model"]["backbone"]["depth"] == 101
    assert cfg["model"]["neck"]["extra"] == [1, 2]
    assert cfg["model"]["roi_head"] is None
    assert cfg.origin("model.backbone.depth") == "command line"


def test_origin_tracks_the_file_that_set_each_key(base_tree: Path, tmp_path: Path):
    cfg = load_config(base_tree)
    assert cfg.origin("model.backbone.frozen_stages").endswith("_base_/model.yaml")
    assert cfg.origin("model.backbone.depth").endswith("child.yaml")
    assert cfg.origin("data.train.split").endswith("_base_/data.yaml")


def test_yaml_syntax_error_reports_line_and_column(tmp_path: Path):
    bad = write(tmp_path / "bad.yaml", "model:\n  type: [unclosed\n  depth: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert "line" in str(info.value) and "column" in str(info.value) and "bad.yaml" in str(info.value)


def test_missing_base_file_names_it_and_the_referencing_file(tmp_path: Path):
    cfg = write(tmp_path / "a.yaml", "_base_: [nowhere.yaml]\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert "nowhere.yaml" in str(info.value) and "a.yaml" in str(info.value)


def test_base_cycle_is_reported(tmp_path: Path):
    write(tmp_path / "a.yaml", "_base_: [b.yaml]\n")
    write(tmp_path / "b.yaml", "_base_: [a.yaml]\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_unknown_top_level_section_suggests_nearest(tmp_path: Path):
    cfg = write(tmp_path / "typo.yaml", "modle: {type: X}\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    msg = str(info.value)
    assert "'modle'" in msg and "Did you mean 'model'" in msg and "typo.yaml" in msg


def test_unknown_section_in_override_is_reported(base_tree: Path):
    with pytest.raises(ConfigError) as info:
        load_config(base_tree, ["trainr.max_epochs=2"])
    assert "Did you mean 'trainer'" in str(info.value) and "command line" in str(info.value)


def test_malformed_override_is_reported(base_tree: Path):
    with pytest.raises(ConfigError, match="key.subkey=value"):
        load_config(base_tree, ["trainer.max_epochs"])


def test_missing_interpolation_target_names_key_and_suggestion(tmp_path: Path):
    cfg = write(tmp_path / "ref.yaml", "data: {batch_size: 2, val_batch_size: '${data.batch_sise}'}\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert info.value.key == "data.val_batch_size" and "batch_size" in str(info.value)


def test_env_interpolation_with_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cfg = write(tmp_path / "env.yaml", "work_dir: ${env:SEGKIT_TEST_DIR,/tmp/default}\nseed: ${env:SEGKIT_TEST_SEED}\n")
    monkeypatch.setenv("SEGKIT_TEST_SEED", "7")
    loaded = load_config(cfg)
    assert loaded["work_dir"] == "/tmp/default" and loaded["seed"] == 7  # read as YAML, as the default is


def test_typo_in_component_argument_names_file_key_and_suggestion(base_tree: Path):
    import segkit

    cfg = load_config(base_tree, ["model.backbone={type: ResNet, dpth: 18}"])
    with pytest.raises(ConfigError) as info:
        segkit.build_model(cfg)
    msg = str(info.value)
    assert "model.backbone.dpth" in msg and "Did you mean 'depth'" in msg and "command line" in msg


def test_typo_in_component_name_names_the_file(tmp_path: Path, base_tree: Path):
    import segkit

    child = write(tmp_path / "typo_type.yaml", "_base_: [child.yaml]\nmodel: {backbone: {type: ResNett}}\n")
    with pytest.raises(ConfigError) as info:
        segkit.build_model(load_config(child))
    msg = str(info.value)
    assert "typo_type.yaml" in msg and "model.backbone.type" in msg and "Did you mean 'ResNet'" in msg


def test_override_with_delete_replaces_a_whole_section(base_tree: Path):
    cfg = load_config(base_tree, ["model.backbone={_delete_: true, type: ResNet, depth: 34}"])
    assert cfg["model"]["backbone"] == {"type": "ResNet", "depth": 34}


def test_override_of_a_mapping_merges_into_it(base_tree: Path):
    cfg = load_config(base_tree, ["model.backbone={depth: 34}"])
    assert cfg["model"]["backbone"] == {"type": "ResNet", "depth": 34, "frozen_stages": 1}
