"""A config value of the wrong type is refused with its key and the expected type, before anything is built."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pytest

from segkit.cli import main
from segkit.config_types import type_problem


def target(*, depth: int = 50, lr: float = 0.1, name: str | None = None, flag: bool = False,
           sizes: Sequence[int] = (1,), pairs: tuple[int, int] = (1, 2), cfg: Mapping[str, Any] | None = None,
           mode: Literal["a", "b"] = "a", path: str | os.PathLike | None = None, anything: Any = None,
           feats: str | Sequence[str] = "c5") -> None:
    """A function with the annotations configs meet."""


@pytest.mark.parametrize("key, value", [
    ("depth", 50), ("lr", 1), ("lr", 0.5), ("name", "x"), ("name", None), ("flag", True), ("sizes", [1, 2]),
    ("pairs", [3, 4]), ("cfg", {"a": 1}), ("mode", "b"), ("path", "x.pth"), ("anything", [1, "a"]),
    ("feats", "c4"), ("feats", ["c3", "c4"]),
])
def test_values_of_the_annotated_type_pass(key, value):
    assert type_problem(target, key, value) is None


@pytest.mark.parametrize("key, value, message", [
    ("depth", "fifty", "must be an integer, got 'fifty' (a string)"),
    ("depth", 2.5, "must be an integer, got 2.5 (a number)"),
    ("depth", True, "must be an integer, got True (a boolean)"),
    ("lr", "fast", "must be a number, got 'fast'"),
    ("name", 3, "must be a string or null, got 3"),
    ("flag", "yes please", "must be true or false"),
    ("sizes", 4, "must be a list of integers, got 4"),
    ("sizes", [1, "two"], "must be a list of integers"),
    ("pairs", [1, 2, 3], "got [1, 2, 3] (a list)"),
    ("cfg", [1], "must be a mapping or null"),
    ("mode", "c", "must be one of 'a', 'b'"),
    ("feats", 5, "must be a string or a list of strings"),
])
def test_values_of_another_type_are_named(key, value, message):
    assert message in type_problem(target, key, value)


def test_objects_passed_by_code_are_not_checked():
    assert type_problem(target, "depth", object()) is None


@pytest.mark.parametrize("override, key, expected", [
    ("data.batch_size=four", "data.batch_size", "must be an integer"),
    ("optimizer.lr=fast", "optimizer.lr", "must be a number"),
    ("trainer.max_epochs=ten", "trainer.max_epochs", "must be an integer or null"),
    ("model.neck.out_channels=16.5", "model.neck.out_channels", "must be an integer"),
    ("model.roi_head.batch_size_per_image=[1,2]", "model.roi_head.batch_size_per_image", "must be an integer"),
])
def test_cli_exits_2_naming_the_key(tiny_config: Path, capsys, override, key, expected):
    with pytest.raises(SystemExit) as info:
        main(["train", str(tiny_config), override])
    err = " ".join(capsys.readouterr().err.split())
    assert info.value.code == 2
    assert f"'{key}'" in err and expected in err and "Traceback" not in err
