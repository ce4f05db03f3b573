"""Helpers shared by the commands: the checkpoint-or-config argument, image inputs, output folders."""

from __future__ import annotations

import argparse
import os

from segkit.errors import UserError

__all__ = ["CHECKPOINT_SUFFIXES", "add_config_arguments", "add_config_or_ckpt", "add_device_argument", "add_image_inputs", "is_rank_zero", "make_output_folder",
           "predict_arguments", "require_file"]

#: Endings of a checkpoint file, which tell `segkit eval CKPT` from `segkit eval CONFIG CKPT`.
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")


def add_config_or_ckpt(parser: argparse.ArgumentParser) -> None:
    """The first argument of the commands that load a checkpoint (eval, predict, export, cam)."""
    parser.add_argument("config_or_ckpt", metavar="CONFIG_OR_CKPT", help="a checkpoint, or a YAML config followed by CKPT")


def add_image_inputs(parser: argparse.ArgumentParser) -> None:
    """The arguments of the commands that run a checkpoint on images: CONFIG_OR_CKPT [CKPT] INPUT... --out DIR."""
    add_config_or_ckpt(parser)
    parser.add_argument("rest", nargs="+", metavar="INPUT",
                        help="[CKPT] (after a config), then images, folders or glob patterns, and key=value overrides")
    parser.add_argument("--out", metavar="DIR", required=True, help="output folder (created if needed)")


def require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise UserError(f"{what} '{path}' does not exist.")


def make_output_folder(path: str) -> None:
    """Create an output folder (and its parents) unless it exists; a UserError if that is impossible."""
    from segkit.fileio import make_folder

    make_folder(path, what="the output folder")


def predict_arguments(first: str, rest: list[str], *, command: str = "predict",
                       inputs_required: bool = True) -> tuple[str, str | None, list[str], list[str]]:
    """Split `segkit predict`'s (or `export`'s) positional arguments into (checkpoint, config or None,
    inputs, overrides)."""
    import re

    override = re.compile(r"^[A-Za-z_][\w.]*=")
    overrides = [a for a in rest if override.match(a) and not os.path.exists(a)]
    positional = [a for a in rest if a not in overrides]
    if first.endswith(CHECKPOINT_SUFFIXES):
        ckpt, config = first, None
    else:
        if not positional or not positional[0].endswith(CHECKPOINT_SUFFIXES):
            usage = "--out FILE" if command == "export" else "INPUT... --out DIR"
            raise UserError(f"`segkit {command} {first}` needs a checkpoint after the config: "
                            f"segkit {command} CONFIG CKPT {usage}")
        ckpt, config, positional = positional[0], first, positional[1:]
    require_file(ckpt, "checkpoint")
    if not positional and inputs_required:
        raise UserError(f"no input images given: segkit {command} CKPT INPUT... --out DIR (INPUT: image files, "
                        "folders or glob patterns).")
    return ckpt, config, positional, overrides


def is_rank_zero() -> bool:
    """Whether this process reports results (the first of a distributed run, or the only one)."""
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of the commands that read a config: CONFIG [key=value ...]."""
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. trainer.max_epochs=2")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device``: where the model runs."""
    parser.add_argument("--device", default=None, metavar="cpu|cuda[:N]", help="default: cuda if available, else cpu")
