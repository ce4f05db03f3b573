"""Pictures of a dataset's samples as the model sees them (``segkit data show``).

Each sample is read with ``dataset[i]``, so the split's transforms (flips, crops, resizing, colour
changes) are applied, and its target is drawn on the transformed image: detection boxes with their
class names and translucent instance masks, or a label map coloured by class with a legend of the
classes present (ignored pixels are left uncoloured). Colours follow
:func:`segkit.visualize.class_colors`, so a class looks the same here as in ``segkit predict``.

Example:
    >>> cfg = segkit.load_config("configs/quickstart_mask.yaml")
    >>> paths = show_samples(cfg, split="train", num_samples=16, out_dir="samples", grid=True)
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from segkit.errors import UserError
from segkit.fileio import atomic_open
from segkit.predict import as_image_array
from segkit.visualize import (
    binary_masks,
    blend_masks,
    draw_label,
    label_font,
    class_name_of,
    class_colors,
    draw_semantic,
)

__all__ = ["RenderedSample", "draw_target", "show_samples", "contact_sheet"]

_GRID_GAP = 4
_GRID_BACKGROUND = (40, 40, 40)


@dataclass
class RenderedSample:
    """One picture written by :func:`show_samples`.

    Attributes:
        path: the PNG written.
        index: the sample's position in the dataset.
        name: its image id (detection) or file stem (label maps), as in the file name.
        target: the transformed target that was drawn.
    """

    path: str
    index: int
    name: str
    target: dict[str, Any]


def draw_target(image: Any, target: Mapping[str, Any], class_names: Sequence[str], *,
                ignore_index: int | None = None, alpha: float = 0.45) -> np.ndarray:
    """Draw a ground-truth target on its image.

    Args:
        image: the sample's image, float ``[3, H, W]`` in ``[0, 1]`` (or uint8 ``[H, W, 3]``).
        target: ``sem_seg`` (int ``[H, W]``), or ``boxes`` (``[N, 4]`` xyxy pixels), ``labels``
            (``[N]``, ``1..K``) and optionally ``masks`` (uint8 ``[N, H, W]``).
        class_names: for detection ``class_names[label - 1]``; for label maps ``class_names[c]``.
        ignore_index: label-map value left uncoloured.
        alpha: opacity of masks and label colours.

    Returns:
        uint8 ``[H, W, 3]``: masks first, then each box outline with its class name above it.
    """
    if target.get("sem_seg") is not None:
        return draw_semantic(image, target["sem_seg"], class_names, alpha=alpha, ignore_index=ignore_index)
    canvas = as_image_array(image).copy()
    boxes = _numpy(target.get("boxes", np.zeros((0, 4))), np.float64).reshape(-1, 4)
    labels = _numpy(target.get("labels", np.zeros(0)), np.int64).reshape(-1)
    colors = class_colors(labels)
    if target.get("masks") is not None and len(boxes):
        canvas = blend_masks(canvas, binary_masks(target["masks"], 0.5, canvas.shape[:2]), colors, alpha)
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    height, width = canvas.shape[:2]
    line = max(1, round(max(height, width) / 320))
    font = label_font(height, width)
    for (x0, y0, x1, y1), label, color in zip(boxes, labels.tolist(), colors):
        color = tuple(int(c) for c in color)
        draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=color, width=line)
        draw_label(draw, (x0, y0), class_name_of(class_names, label), color, font, (height, width))
    return np.asarray(picture)


def show_samples(cfg: Mapping[str, Any], *, split: str = "train", num_samples: int = 16, out_dir: str,
                 seed: int = 0, grid: bool = False, progress: bool | None = None) -> list[RenderedSample]:
    """Draw ``num_samples`` transformed samples of a split into ``out_dir``.

    Samples are drawn at random without replacement (all of them when the split is smaller), in
    dataset order; ``seed`` fixes both the choice and the random transforms. Each is written as
    ``out_dir/<image id>.png`` (label-map datasets: ``<image file stem>.png``); with ``grid``,
    ``out_dir/grid.png`` holds them all as a contact sheet.

    Raises:
        ConfigError: the config has no such split, or its dataset config is wrong.
        DatasetError: the dataset or a drawn sample cannot be read.
        UserError: ``num_samples`` below 1, or ``out_dir`` cannot be created.
    """
    from segkit.engine.datamodule import build_datamodule

    if num_samples < 1:
        raise UserError(f"the number of samples to draw must be at least 1, got {num_samples}.")
    dataset = build_datamodule(cfg).build_dataset(split)
    indices = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:num_samples]).tolist()
    _make_folder(out_dir)
    torch.manual_seed(seed)  # the datasets reseed their transforms from torch's seed
    names = _class_names(dataset)
    ignore_index = getattr(dataset, "ignore_index", None)
    rendered, pictures = [], []
    for index in tqdm(indices, desc=f"drawing {split}", unit="img", disable=None if progress is None else not progress):
        image, target = dataset[index]
        picture = draw_target(image, target, names, ignore_index=ignore_index)
        name = _sample_name(target, index)
        path = os.path.join(out_dir, f"{name}.png")
        _save_png(picture, path)
        rendered.append(RenderedSample(path=path, index=index, name=name, target=target))
        if grid:
            pictures.append(picture)
    if grid:
        _save_png(contact_sheet(pictures, captions=[r.name for r in rendered]), os.path.join(out_dir, "grid.png"))
    return rendered


def contact_sheet(pictures: Sequence[np.ndarray], *, captions: Sequence[str] | None = None,
                  columns: int | None = None) -> np.ndarray:
    """Pictures side by side in a grid (``ceil(sqrt(n))`` columns by default) on a dark background.

    Every cell has the size of the largest picture; pictures sit in its top-left corner, with their
    caption (if given) in a strip below.
    """
    if not pictures:
        raise ValueError("contact_sheet needs at least one picture")
    columns = columns or math.ceil(math.sqrt(len(pictures)))
    rows = math.ceil(len(pictures) / columns)
    cell_h = max(p.shape[0] for p in pictures)
    cell_w = max(p.shape[1] for p in pictures)
    font = label_font(max(cell_h, 256), max(cell_w, 256))
    caption_h = 0
    if captions:
        left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), "Ag", font=font)
        caption_h = bottom - top + 4
    step_y, step_x = cell_h + caption_h + _GRID_GAP, cell_w + _GRID_GAP
    sheet = Image.new("RGB", (columns * step_x + _GRID_GAP, rows * step_y + _GRID_GAP), _GRID_BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for k, picture in enumerate(pictures):
        x, y = _GRID_GAP + (k % columns) * step_x, _GRID_GAP + (k // columns) * step_y
        sheet.paste(Image.fromarray(picture), (x, y))
        if captions:
            draw.text((x + 1, y + picture.shape[0] + 2), str(captions[k]), fill=(230, 230, 230), font=font)
    return np.asarray(sheet)


# ------------------------------------------------------------------------------- helpers
def _numpy(value: Any, dtype: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


def _class_names(dataset: Any) -> list[str]:
    classes = getattr(dataset, "classes", None)
    return [str(c) for c in classes] if classes is not None else []


def _sample_name(target: Mapping[str, Any], index: int) -> str:
    """The image id, or for label-map datasets the image file's stem (folders joined with '_')."""
    if target.get("sem_seg") is not None and isinstance(target.get("file_name"), str):
        stem = os.path.splitext(target["file_name"])[0]
        return re.sub(r"[^\w.-]+", "_", stem.replace(os.sep, "_")) or str(index)
    return str(target.get("image_id", index))


def _make_folder(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the output folder '{path}': {exc.strerror or exc}.") from exc


def _save_png(picture: np.ndarray, path: str) -> None:
    with atomic_open(path, "wb") as f:
        Image.fromarray(picture).save(f, format="PNG")
