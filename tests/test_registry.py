"""The registry: registration, duplicates, lookup suggestions, signature checks, discovery."""

from __future__ import annotations

from typing import Any

import pytest

from segkit.errors import ConfigError
from segkit.registry import BACKBONES, DATASETS, EVALUATORS, HEADS, MODELS, NECKS, TRANSFORMS, Registry


def _fresh() -> Registry:
    return Registry("widget")


def test_register_uses_class_name_and_builds_with_kwargs():
    reg = _fresh()

    @reg.register()
    class Conv:
        def __init__(self, *, channels: int, kernel: int = 3) -> None:
            self.channels, self.kernel = channels, kernel

    obj = reg.build({"type": "Conv", "channels": 8}, path="model.conv")
    assert (obj.channels, obj.kernel) == (8, 3)
    assert "Conv" in reg


def test_register_with_explicit_name():
    reg = _fresh()
    reg.register("fancy")(lambda *, x=1: x * 2)
    assert reg.build({"type": "fancy", "x": 4}) == 8


def test_duplicate_name_names_both_modules():
    reg = _fresh()
    first = type("Thing", (), {"__module__": "pkg_a.things"})
    second = type("Thing", (), {"__module__": "pkg_b.other"})
    reg.add(first)
    with pytest.raises(ValueError) as info:
        reg.add(second)
    assert "pkg_a.things" in str(info.value) and "pkg_b.other" in str(info.value)
    reg.add(second, force=True)
    assert reg.get("Thing") is second


def test_unknown_name_suggests_nearest():
    reg = _fresh()
    for name in ("ResNet", "ResNeXt", "SENet"):
        reg.add(type(name, (), {}), name=name)
    with pytest.raises(ConfigError) as info:
        reg.build({"type": "ResNte"}, path="model.backbone")
    msg = str(info.value)
    assert "'ResNte'" in msg and "Did you mean 'ResNet'" in msg
    assert info.value.key == "model.backbone.type"


def test_unknown_argument_names_dotted_key_and_suggestion():
    reg = _fresh()

    @reg.register()
    class ResNet:
        def __init__(self, *, depth: int = 50, frozen_stages: int = -1) -> None:
            pass

    with pytest.raises(ConfigError) as info:
        reg.build({"type": "ResNet", "dpth": 50}, path="model.backbone")
    assert info.value.key == "model.backbone.dpth"
    assert "Did you mean 'depth'" in str(info.value)


def test_missing_required_argument_is_reported():
    reg = _fresh()

    @reg.register()
    class Head:
        def __init__(self, *, num_classes: int) -> None:
            pass

    with pytest.raises(ConfigError, match="num_classes"):
        reg.build({"type": "Head"}, path="model.head")


def test_missing_type_and_non_mapping_are_config_errors():
    reg = _fresh()
    with pytest.raises(ConfigError, match="'type'"):
        reg.build({"depth": 3}, path="model.backbone")
    with pytest.raises(ConfigError, match="mapping"):
        reg.build(["ResNet"], path="model.backbone")  # type: ignore[arg-type]


def test_defaults_are_passed_and_config_wins():
    reg = _fresh()

    @reg.register()
    class Neck:
        def __init__(self, *, in_channels: int, out_channels: int = 4) -> None:
            self.in_channels, self.out_channels = in_channels, out_channels

    neck = reg.build({"type": "Neck", "out_channels": 16}, in_channels=32)
    assert (neck.in_channels, neck.out_channels) == (32, 16)


def test_builtin_plugins_are_discovered_through_entry_points():
    assert "ResNet" in BACKBONES and "FPN" in NECKS
    assert "RPN" in HEADS and "StandardRoIHead" in HEADS
    assert "TwoStageDetector" in MODELS
    assert "Shapes" in DATASETS and "CocoDataset" in DATASETS
    assert "CocoEvaluator" in EVALUATORS
    entry = next(e for e in BACKBONES.entries() if e.name == "ResNet")
    assert entry.module == "segkit_plugins.backbones.resnet" and entry.plugin and entry.plugin.startswith("resnet")


def test_every_albumentations_transform_is_available_by_name():
    import albumentations as A

    flip = TRANSFORMS.build({"type": "HorizontalFlip", "p": 1.0}, path="data.train.transforms[0]")
    assert isinstance(flip, A.HorizontalFlip)
    with pytest.raises(ConfigError, match="HorizontalFlip"):
        TRANSFORMS.build({"type": "HorizontalFlp"})


REGISTRATION = '''
from segkit.registry import BACKBONES

@BACKBONES.register()
class NotebookNet:
    """A backbone defined in a notebook cell."""

    def __init__(self, *, width: int = {width}) -> None:
        self.width = width
'''


def test_running_a_cell_again_replaces_the_class_it_registered():
    namespace: dict[str, Any] = {"__name__": "__main__"}
    try:
        exec(REGISTRATION.format(width=8), namespace)  # noqa: S102 - the test's own code, as a notebook runs a cell
        first = BACKBONES.build({"type": "NotebookNet"})
        exec(REGISTRATION.format(width=16), namespace)  # noqa: S102 - the cell, edited and run again
        second = BACKBONES.build({"type": "NotebookNet"})
        assert (first.width, second.width) == (8, 16) and type(second) is namespace["NotebookNet"]
        other = {"__name__": "another_module"}
        with pytest.raises(ValueError, match="'NotebookNet' is already registered by module '__main__'; module "
                                             "'another_module' tried to register it again"):
            exec(REGISTRATION.format(width=4), other)  # noqa: S102 - a different class under the taken name
    finally:
        BACKBONES.remove("NotebookNet")
