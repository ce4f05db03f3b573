"""Training curves from a run's CSV logs (``segkit plot WORK_DIR``).

A run logs to ``WORK_DIR/logs/version_N/metrics.csv``, one folder per ``segkit train`` call. The
files are read in version order; where a later run starts at step ``s`` (a resumed run starts at
its checkpoint's step, a new run at 0), the earlier runs' values from step ``s`` on are replaced
by its own, so a resumed run's curves continue where the checkpoint left off.

The picture has one panel per training loss (``train/*``: raw values faint, a light moving
average on top), one for the learning rate of each parameter group, one for the seconds per
iteration (``time/data``, ``time/step``) and one per family of evaluation metrics (``bbox/AP``,
``bbox/AP50``, ``bbox/AP75``; ``segm/...``; ``voc/mAP``; ``mIoU``, ``mAcc``, ``aAcc``), all
against the optimizer step, with epochs on the top axis of the metric panels.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from segkit.errors import UserError
from segkit.fileio import atomic_open

__all__ = ["Series", "find_logs", "read_logs", "plot_panels", "plot_curves", "smooth"]

# Headline evaluation metrics, by the part of the name after the family prefix ("bbox/AP" -> "AP").
_HEADLINE = ("AP", "AP50", "AP75", "mAP", "mIoU", "mAcc", "aAcc")
_MAX_LINES = 4
_LR_TITLE = "learning rate"
_TIME_TITLE = "seconds per iteration"


@dataclass
class Series:
    """The logged values of one metric: ``values[i]`` at optimizer step ``steps[i]``, in ``epochs[i]``."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    epochs: list[int | None] = field(default_factory=list)

    def truncate(self, step: int) -> None:
        """Drop the values logged at ``step`` or later."""
        keep = [i for i, s in enumerate(self.steps) if s < step]
        self.steps = [self.steps[i] for i in keep]
        self.values = [self.values[i] for i in keep]
        self.epochs = [self.epochs[i] for i in keep]


def find_logs(work_dir: str | os.PathLike[str]) -> list[str]:
    """``WORK_DIR/logs/version_N/metrics.csv`` files in version order.

    Raises:
        UserError: ``work_dir`` is not a folder, or it holds no such file.
    """
    work_dir = os.fspath(work_dir)
    if not os.path.isdir(work_dir):
        raise UserError(f"the work dir '{work_dir}' does not exist; give the work_dir of a training run "
                        f"(work_dirs/<config name> by default).")
    logs_dir = os.path.join(work_dir, "logs")
    versions = []
    for name in os.listdir(logs_dir) if os.path.isdir(logs_dir) else []:
        match = re.fullmatch(r"version_(\d+)", name)
        path = os.path.join(logs_dir, name, "metrics.csv")
        if match and os.path.isfile(path):
            versions.append((int(match.group(1)), path))
    if not versions:
        expected = os.path.join(logs_dir, "version_N", "metrics.csv")
        raise UserError(f"no training logs in '{work_dir}': expected {expected}, which `segkit train` writes unless "
                        f"trainer.logger is false or lists loggers without csv.")
    return [path for _, path in sorted(versions)]


def read_logs(work_dir: str | os.PathLike[str]) -> dict[str, Series]:
    """Every logged series of a run, its versions joined (see the module docstring).

    Returns:
        ``{name: Series}`` in the order the names first appear (``train/loss``, ``lr-AdamW``,
        ``bbox/AP``, ...); empty cells and non-numbers are skipped.

    Raises:
        UserError: no logs (see :func:`find_logs`), or logs without a single value.
    """
    series: dict[str, Series] = {}
    for path in find_logs(work_dir):
        rows = _read_csv(path)
        steps = [step for _, step, _ in rows]
        if not steps:
            continue
        first = min(steps)
        for s in series.values():
            s.truncate(first)
        for values, step, epoch in rows:
            for name, value in values.items():
                target = series.setdefault(name, Series())
                target.steps.append(step)
                target.values.append(value)
                target.epochs.append(epoch)
    series = {name: s for name, s in series.items() if s.steps}
    if not series:
        raise UserError(f"the logs of '{os.fspath(work_dir)}' hold no values yet (logs/version_N/metrics.csv); "
                        f"values appear after trainer.log_every_n_steps steps.")
    return series


def _read_csv(path: str) -> list[tuple[dict[str, float], int, int | None]]:
    """``(values, step, epoch)`` of every row of a Lightning CSV log that has a step."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            step = _number(row.get("step"))
            if step is None:
                continue
            epoch = _number(row.get("epoch"))
            values = {name: value for name, cell in row.items()
                      if name not in ("step", "epoch") and name is not None and (value := _number(cell)) is not None}
            rows.append((values, int(step), None if epoch is None else int(epoch)))
    return rows


def _number(cell: str | None) -> float | None:
    if cell is None or cell == "":
        return None
    try:
        value = float(cell)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def smooth(values: Sequence[float], weight: float | None = None) -> list[float]:
    """A debiased exponential moving average (TensorBoard's smoothing).

    Args:
        values: the raw series.
        weight: the weight of the past in ``[0, 1)``; by default light, growing with the length
            (no smoothing below 30 points, at most 0.95).
    """
    if weight is None:
        weight = min(0.95, max(0.0, 1.0 - 30.0 / max(1, len(values))))
    out, average, norm = [], 0.0, 0.0
    for value in values:
        average = weight * average + (1 - weight) * value
        norm = weight * norm + (1 - weight)
        out.append(average / norm)
    return out


def plot_panels(names: Sequence[str]) -> list[tuple[str, list[str]]]:
    """The panels of the picture: ``(title, [series names])`` for the given logged names."""
    names = list(names)
    # the losses (train/loss, train/loss_*); counters such as train/nonfinite_steps are not curves to read
    losses = [n for n in names if n.startswith("train/loss")]
    losses.sort(key=lambda n: (n != "train/loss", names.index(n)))
    panels = [(n, [n]) for n in losses]
    lrs = [n for n in names if n.startswith("lr-")]
    if lrs:
        panels.append((_LR_TITLE, lrs))
    times = [n for n in ("time/data", "time/step") if n in names]
    if times:
        panels.append((_TIME_TITLE, times))
    families: dict[str, list[str]] = {}
    for n in names:
        if n.startswith(("train/", "lr-", "momentum-", "time/")) or "-" in n.rpartition("/")[2]:
            continue  # per-class numbers ("IoU-road", "bbox/AP-cat") would crowd the panel
        families.setdefault(n.rpartition("/")[0], []).append(n)
    for family, members in families.items():
        chosen = [n for n in members if _is_headline(n.rpartition("/")[2])] or members
        panels.append((family or "evaluation", chosen[:_MAX_LINES]))
    return panels


def _is_metric_panel(title: str) -> bool:
    return not title.startswith("train/") and title not in (_LR_TITLE, _TIME_TITLE)


def _is_headline(leaf: str) -> bool:
    return leaf in _HEADLINE or re.fullmatch(r"mAP\d+", leaf) is not None


def plot_curves(work_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
                columns: int = 3) -> str:
    """Draw the curves of a run as a PNG, written atomically.

    Args:
        work_dir: the run's folder (the config's ``work_dir``).
        out: the PNG to write (default ``WORK_DIR/curves.png``).
        columns: panels per row.

    Returns:
        The path written.

    Raises:
        UserError: no logs or no values (see :func:`read_logs`), or ``out`` cannot be written.

    Example:
        >>> plot_curves("work_dirs/quickstart")
        'work_dirs/quickstart/curves.png'
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    series = read_logs(work_dir)
    out = os.fspath(out) if out is not None else os.path.join(os.fspath(work_dir), "curves.png")
    panels = plot_panels(list(series))
    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(5.0 * columns, 3.4 * rows), dpi=100, layout="constrained")
    fig.suptitle(os.fspath(work_dir), fontsize=10)
    metric_names = [n for title, names in panels if _is_metric_panel(title) for n in names]
    boundaries = _epoch_boundaries(series, metric_names)
    for index, (title, names) in enumerate(panels):
        ax = fig.add_subplot(rows, columns, index + 1)
        _draw_panel(ax, title, [(n, series[n]) for n in names], boundaries)
    try:
        with atomic_open(out, "wb") as f:
            fig.savefig(f, format="png")
    except OSError as exc:
        raise UserError(f"cannot write the picture '{out}': {exc.strerror or exc}.") from exc
    return out


def _draw_panel(ax: Any, title: str, lines: list[tuple[str, Series]], boundaries: list[tuple[int, int]]) -> None:
    is_metric = _is_metric_panel(title)
    for i, (name, s) in enumerate(lines):
        color = f"C{i}"
        if name.startswith("lr-"):  # a schedule, not a noisy measurement: drawn as it is
            ax.plot(s.steps, s.values, color=color, linewidth=1.5, label=name[3:])
            continue
        if is_metric:
            ax.plot(s.steps, s.values, marker="o", markersize=3, color=color, label=name)
            continue
        ax.plot(s.steps, s.values, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(s.steps, smooth(s.values), color=color, linewidth=1.5, label=name)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if len(lines) > 1 or is_metric:
        ax.legend(fontsize=8)
    if is_metric and len(boundaries) >= 2:
        _epoch_axis(ax, boundaries)


def _epoch_boundaries(series: Mapping[str, Series], metric_names: Sequence[str]) -> list[tuple[int, int]]:
    """``(step, epochs completed)`` pairs from the evaluations (an evaluation in epoch ``e`` ends it)."""
    points = {(0, 0)}
    for name in metric_names:
        s = series[name]
        points.update((step, epoch + 1) for step, epoch in zip(s.steps, s.epochs) if epoch is not None)
    clean: list[tuple[int, int]] = []
    for step, epoch in sorted(points):  # strictly increasing in both, so the mapping can be inverted
        if not clean or (step > clean[-1][0] and epoch > clean[-1][1]):
            clean.append((step, epoch))
    return clean


def _epoch_axis(ax: Any, boundaries: list[tuple[int, int]]) -> None:
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    steps = np.array([b[0] for b in boundaries], dtype=float)
    epochs = np.array([b[1] for b in boundaries], dtype=float)
    top = ax.secondary_xaxis("top", functions=(lambda x: np.interp(x, steps, epochs),
                                               lambda e: np.interp(e, epochs, steps)))
    top.xaxis.set_major_locator(MaxNLocator(integer=True))
    top.set_xlabel("epochs completed", fontsize=9)
    top.tick_params(labelsize=8)
