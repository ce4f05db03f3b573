"""Drawing of one Shapes image: textured background, clutter, and occluding shapes.

Everything here is a pure function of a ``numpy.random.Generator``, so the same seed always gives
the same pixels; :mod:`segkit.data.shapes` writes the images and their COCO annotations to disk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

__all__ = ["SHAPE_CATEGORIES", "GENERATOR_VERSION", "render_image"]

SHAPE_CATEGORIES = ("circle", "square", "triangle")
# Bump when the drawing changes, so that caches of the previous version are not reused.
GENERATOR_VERSION = 2
_MIN_VISIBLE = 0.5  # fraction of a shape's area that must stay visible
_MAX_TRIES = 25  # placement attempts per shape


# ---------------------------------------------------------------------- drawing primitives
def _window(cx: float, cy: float, radius: float, size: int) -> tuple[slice, slice]:
    x0, x1 = max(int(cx - radius) - 1, 0), min(int(cx + radius) + 2, size)
    y0, y1 = max(int(cy - radius) - 1, 0), min(int(cy + radius) + 2, size)
    return slice(y0, max(y1, y0)), slice(x0, max(x1, x0))


def _grid(win: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (float32) of a window, as broadcastable column and row."""
    ys = np.arange(win[0].start, win[0].stop, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(win[1].start, win[1].stop, dtype=np.float32)[None, :] + 0.5
    return xs, ys


def _polygon_sd(vertices: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Signed distance (positive inside) to a convex polygon, exact along the edges."""
    v = vertices if _signed_area(vertices) > 0 else vertices[::-1]
    sd = None
    for (x0, y0), (x1, y1) in zip(v.tolist(), v[[*range(1, len(v)), 0]].tolist()):
        length = math.hypot(x1 - x0, y1 - y0)
        d = ((x1 - x0) * (ys - y0) - (y1 - y0) * (xs - x0)) / length
        sd = d if sd is None else np.minimum(sd, d)
    return sd


def _signed_area(v: np.ndarray) -> float:
    x, y = v[:, 0], v[:, 1]
    return 0.5 * float(np.dot(x, y[[*range(1, len(y)), 0]]) - np.dot(y, x[[*range(1, len(x)), 0]]))


def _sample_shape(rng: np.random.Generator, category: str, size: int) -> tuple[tuple[slice, slice], np.ndarray, float]:
    """A random shape: its window, signed distance inside it and its full (unclipped) area."""
    scale = size / 128.0
    d = rng.uniform(16.0, 60.0) * scale
    margin = 0.06 * size
    cx, cy = rng.uniform(margin, size - margin, 2)
    if category == "circle":
        r = d / 2
        win = _window(cx, cy, r, size)
        xs, ys = _grid(win)
        return win, r - np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2), math.pi * r * r
    if category == "square":
        half = d * 0.42
        angle = rng.uniform(0, math.pi / 2) + np.arange(4) * math.pi / 2
        radius = half * math.sqrt(2)
        corners = np.stack([cx + radius * np.cos(angle + math.pi / 4), cy + radius * np.sin(angle + math.pi / 4)], 1)
    else:  # triangle: arcs of at least 50 degrees between vertices keep every angle >= 25 degrees
        radius = d * 0.56
        arcs = np.deg2rad(50 + 210 * rng.dirichlet((2.0, 2.0, 2.0)))
        angle = rng.uniform(0, 2 * math.pi) + np.concatenate([[0.0], np.cumsum(arcs[:2])])
        r = radius * rng.uniform(0.85, 1.0, 3)
        corners = np.stack([cx + r * np.cos(angle), cy + r * np.sin(angle)], 1)
    win = _window(cx, cy, radius, size)
    xs, ys = _grid(win)
    return win, _polygon_sd(corners, xs, ys), abs(_signed_area(corners))


def _paint(canvas: np.ndarray, win: tuple[slice, slice], sd: np.ndarray, colour: np.ndarray) -> None:
    """Alpha-blend ``colour`` (float32 [3] or [h, w, 3]) where ``sd > -0.5`` (anti-aliased edge)."""
    alpha = np.clip(sd + 0.5, 0.0, 1.0)[..., None]
    canvas[win] = canvas[win] * (1.0 - alpha) + colour * alpha


# ---------------------------------------------------------------------- backgrounds and clutter
def _two_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    c1 = rng.uniform(0, 255, 3)
    direction = rng.normal(size=3)
    c2 = c1 + direction / np.linalg.norm(direction) * rng.uniform(15, 110)
    return c1.astype(np.float32), np.clip(c2, 0, 255).astype(np.float32)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """One background layer, float32 [S, S, 3] in [0, 255]."""
    xs, ys = _grid((slice(0, size), slice(0, size)))
    theta = rng.uniform(0, math.pi)
    proj = xs * math.cos(theta) + ys * math.sin(theta)
    kind = rng.integers(4)
    if kind == 0:  # smooth gradient
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
    elif kind == 1:  # stripes, soft or hard
        period = rng.uniform(5, 24) * size / 128
        t = 0.5 + 0.5 * np.sin(2 * math.pi * proj / period)
        if rng.random() < 0.5:
            t = (t > 0.5).astype(np.float32)
    elif kind == 2:  # checkerboard, possibly rotated
        cell = rng.uniform(5, 22) * size / 128
        other = -xs * math.sin(theta) + ys * math.cos(theta)
        t = ((np.floor(proj / cell) + np.floor(other / cell)) % 2).astype(np.float32)
    else:  # low-frequency blotches
        cells = int(rng.integers(3, 10))
        coarse = (rng.random((cells, cells)) * 255).astype(np.uint8)
        t = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32) / 255
    c1, c2 = _two_colours(rng)
    return c1 + np.asarray(t, np.float32)[..., None] * (c2 - c1)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    canvas = _texture(rng, size)
    if rng.random() < 0.5:
        alpha = rng.uniform(0.2, 0.6)
        canvas = (1 - alpha) * canvas + alpha * _texture(rng, size)
    return canvas


def _draw_clutter(rng: np.random.Generator, canvas: np.ndarray) -> None:
    """Unannotated distractors: thin lines, small specks, partial arcs (open rings)."""
    size = canvas.shape[0]
    scale = size / 128
    for _ in range(int(rng.integers(1, 9))):
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        kind = rng.integers(3)
        cx, cy = rng.uniform(0, size, 2)
        if kind == 0:  # thin line through (cx, cy)
            half = rng.uniform(0.1, 0.5) * size
            theta = rng.uniform(0, math.pi)
            dx, dy = math.cos(theta) * half, math.sin(theta) * half
            win = _window(cx, cy, half + 2, size)
            xs, ys = _grid(win)
            t = np.clip(((xs - cx + dx) * dx + (ys - cy + dy) * dy) / (2 * half * half), 0, 1)
            dist = np.hypot(xs - (cx - dx + 2 * t * dx), ys - (cy - dy + 2 * t * dy))
            sd = rng.uniform(0.4, 1.0) * scale - dist
        elif kind == 1:  # speck
            r = rng.uniform(1.0, 3.0) * scale
            win = _window(cx, cy, r, size)
            xs, ys = _grid(win)
            sd = r - np.hypot(xs - cx, ys - cy)
        else:  # arc of a ring, 60-240 degrees
            r = rng.uniform(6, 26) * scale
            win = _window(cx, cy, r + 3, size)
            xs, ys = _grid(win)
            start, span = rng.uniform(0, 2 * math.pi), np.deg2rad(rng.uniform(60, 240))
            on_arc = (np.arctan2(ys - cy, xs - cx) - start) % (2 * math.pi) < span
            sd = np.where(on_arc, rng.uniform(0.5, 1.3) * scale - np.abs(np.hypot(xs - cx, ys - cy) - r), -1.0)
        _paint(canvas, win, sd, colour)


# ---------------------------------------------------------------------- one image
def render_image(rng: np.random.Generator, *, image_size: int, categories: Sequence[str], min_objects: int = 2,
                 max_objects: int = 7) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Draw one image.

    Returns:
        ``(image, owner, labels)``: uint8 ``[S, S, 3]`` RGB; int16 ``[S, S]`` index of the front-most
        shape at each pixel (``-1`` background); the label ``1..K`` of each shape, in drawing order.
    """
    size = image_size
    canvas = _background(rng, size)
    _draw_clutter(rng, canvas)
    owner = np.full((size, size), -1, dtype=np.int16)
    visible: list[int] = []  # per placed shape: visible pixels, full area, window, label
    areas: list[float] = []
    windows: list[tuple[slice, slice]] = []
    labels: list[int] = []
    min_side = max(4.0, 0.05 * size)
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        label = int(rng.integers(len(categories))) + 1
        for _try in range(_MAX_TRIES):
            win, sd, area = _sample_shape(rng, categories[label - 1], size)
            inside = sd > 0
            if inside.sum() < _MIN_VISIBLE * area or min(_extent(inside)) < min_side:
                continue
            if _occludes_too_much(owner, win, inside, visible, areas, windows, min_side):
                continue
            hidden = owner[win][inside]
            for j, lost in enumerate(np.bincount(hidden[hidden >= 0], minlength=len(visible))):
                visible[j] -= int(lost)
            owner[win][inside] = len(visible)
            visible.append(int(inside.sum()))
            areas.append(area)
            windows.append(win)
            labels.append(label)
            _paint(canvas, win, sd, _object_colour(rng, canvas, win, sd))
            break
    canvas += rng.normal(0, rng.uniform(2, 8), canvas.shape).astype(np.float32)
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8), owner, labels


def _extent(mask: np.ndarray) -> tuple[int, int]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return 0, 0
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def _occludes_too_much(owner: np.ndarray, win: tuple[slice, slice], inside: np.ndarray, visible: list[int],
                       areas: list[float], windows: list[tuple[slice, slice]], min_side: float) -> bool:
    """Whether drawing ``inside`` on top would leave an earlier shape too hidden or too small."""
    hidden = owner[win][inside]
    hidden = hidden[hidden >= 0]
    if hidden.size == 0:
        return False
    covered = np.zeros(owner.shape, dtype=bool)
    covered[win] = inside
    for j in np.unique(hidden).tolist():
        lost = int((hidden == j).sum())
        if visible[j] - lost < _MIN_VISIBLE * areas[j]:
            return True
        if min(_extent((owner[windows[j]] == j) & ~covered[windows[j]])) < min_side:
            return True
    return False


def _object_colour(rng: np.random.Generator, canvas: np.ndarray, win: tuple[slice, slice], sd: np.ndarray) -> np.ndarray:
    """A random colour with a soft shading gradient; sometimes close to what lies underneath."""
    if rng.random() < 0.1:  # low contrast with the local background
        under = canvas[win][sd > 0].mean(0)
        direction = rng.normal(size=3)
        base = under + direction / np.linalg.norm(direction) * rng.uniform(40, 70)
    else:
        base = rng.uniform(0, 255, 3)
    xs, ys = _grid(win)
    theta = rng.uniform(0, 2 * math.pi)
    ramp = (xs * math.cos(theta) + ys * math.sin(theta)) / canvas.shape[0]
    shade = (ramp - ramp.mean()) * rng.uniform(0, 120)
    return np.clip(base.astype(np.float32) + shade[..., None], 0, 255).astype(np.float32)
