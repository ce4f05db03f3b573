"""``segkit bench``: speed and memory of a config's model, optionally beside torchvision's equivalent.

Phases, in this order (each can be left out with ``BenchOptions.skip``):

* ``infer``: inference latency at batch 1 (eval mode, ``torch.no_grad``, the model's own
  preprocessing and postprocessing included);
* ``throughput``: inference on ``batch_size`` images at once; images/s = batch / median time;
* ``train``: one training step, forward + backward + ``optimizer.step()`` with the config's
  optimizer at the learning rate of its first iteration (warm-up included);
* ``data``: images/s through the config's train ``DataLoader`` (its dataset, transforms and workers);
* ``eval``: the config's evaluator, ``process`` on validation batches plus ``evaluate`` once.

Timed phases run ``warmup`` untimed iterations, then ``iters`` timed ones (median, min, max). Inputs
are the config's data (training batches from ``data.train``, inference images from ``data.val``),
or synthetic images of ``image_size`` with random boxes, masks or label maps; with synthetic images
the network sees that size (a detector's ``min_size`` / ``max_size`` are set to it unless given on
the command line).

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` during one call above the memory allocated
before it. On the CPU, the peak resident set size during one call above the resident size before it,
read from ``VmHWM`` after resetting it through ``/proc/self/clear_refs`` (Linux), with freed heap
memory first returned to the system (``gc.collect`` and glibc's ``malloc_trim``); where that reset
is not allowed the resident size is sampled every millisecond instead (a lower bound). The number is
what one step needs on top of the resident model and optimizer state: activations, gradients and
temporaries. It is measured in one extra call after the timed iterations, so timings are unaffected.

With ``compare="torchvision"`` the equivalent torchvision model is built in the same process and
timed alternately with segkit's (the order flips every iteration), so background load affects both
alike; see :data:`REFERENCES`.

Example:
    >>> cfg = segkit.load_config("configs/mask_rcnn_r50_fpn_coco.yaml", ["model.backbone.pretrained=null"])
    >>> report = run_bench(cfg, BenchOptions(iters=3, warmup=1, image_size=(320, 480), compare="torchvision"))
    >>> print(format_report(report))
"""

from __future__ import annotations

import copy
import itertools
import os
import platform
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from segkit.bench.inputs import (Batch, bench_data, bench_eval, DataSource, keep_input_size, model_task, to_device,
                                 synthetic_batch)
from segkit.bench.measure import (resolve_device, device_name, empty_entry, infer_once, MemoryProbe, bench_optimizer, record_times,
                                  Timer, run_train_step, library_versions)
from segkit.bench.reference import (REFERENCES, Reference, TorchvisionSegmentor, build_reference, match_reference,
                                    reference_for)
from segkit.bench.report import format_report
from segkit.errors import UserError

__all__ = ["PHASES", "REFERENCES", "Reference", "BenchOptions", "run_bench", "format_report", "reference_for",
           "comparison_ratios", "parse_image_size", "parse_skip", "synthetic_batch", "TorchvisionSegmentor"]

PHASES = ("infer", "throughput", "train", "data", "eval")
SYNTHETIC_DEFAULT_SIZE = (512, 512)
_TRAIN_BATCHES = 4  # distinct training batches, cycled


@dataclass(frozen=True)
class BenchOptions:
    """Settings of one benchmark run.

    Args:
        iters: timed iterations per phase (>= 1).
        warmup: untimed iterations before them (>= 0).
        batch_size: training and throughput batch (default: the config's ``data.batch_size``, else 2).
        image_size: ``(height, width)`` of synthetic inputs; ``None`` uses the config's data when it
            can be read and synthetic 512x512 images otherwise.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (default: CUDA when available).
        threads: CPU threads for torch (default: torch's own setting).
        compare: ``"torchvision"`` to time the equivalent torchvision model too.
        skip: phases to leave out (names from :data:`PHASES`).

    Raises:
        UserError: a value out of range or an unknown phase.
    """

    iters: int = 10
    warmup: int = 2
    batch_size: int | None = None
    image_size: tuple[int, int] | None = None
    device: str | None = None
    threads: int | None = None
    compare: str | None = None
    skip: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        for name, low in (("iters", 1), ("warmup", 0), ("batch_size", 1), ("threads", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise UserError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}.")
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise UserError(f"--image-size must be two positive sizes HxW, got {self.image_size!r}.")
        if self.compare not in (None, "torchvision"):
            raise UserError(f"--compare takes 'torchvision', got {self.compare!r}.")
        unknown = sorted(set(self.skip) - set(PHASES))
        if unknown:
            raise UserError(f"unknown phase(s) {', '.join(unknown)} in --skip; phases: {', '.join(PHASES)}.")


def parse_image_size(text: str) -> tuple[int, int]:
    """``"320x480"`` -> ``(320, 480)``; one number means a square.

    Raises:
        UserError: not of the form ``HxW`` with positive integers.
    """
    parts = text.lower().replace("×", "x").split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) == 1:
        sizes *= 2
    if len(sizes) != 2 or min(sizes) < 1:
        raise UserError(f"--image-size takes HxW in pixels, e.g. 320x480; got '{text}'.")
    return sizes[0], sizes[1]


def parse_skip(text: str | None) -> frozenset[str]:
    """``"data,eval"`` -> ``frozenset({"data", "eval"})`` (checked by :class:`BenchOptions`)."""
    return frozenset(p.strip() for p in (text or "").split(",") if p.strip())


# ---------------------------------------------------------------------------------- the run
def run_bench(cfg: Mapping[str, Any], options: BenchOptions, *,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure the phases of :data:`PHASES` for the model of ``cfg`` (and its torchvision reference).

    Args:
        cfg: a merged config (:func:`segkit.load_config`); it is copied, not changed.
        options: what to measure and how.
        log: receives one line per phase.

    Returns:
        The report: run settings, ``segkit`` and ``reference`` (``None`` without a comparison)
        measurements, and the ``ratio_*`` entries of :func:`comparison_ratios`.

    Raises:
        UserError: no torchvision equivalent (the message lists the models that have one), an
            unusable device, or a config error (ConfigError, naming the key and file).
    """
    cfg = copy.deepcopy(cfg)
    reference_name = reference_for(cfg) if options.compare else None
    device = resolve_device(options.device)
    if options.threads:
        torch.set_num_threads(options.threads)
    batch_size = options.batch_size or int((cfg.get("data") or {}).get("batch_size") or 2)
    data = DataSource(cfg, batch_size)
    adjustments = match_reference(reference_name, cfg) if reference_name else []
    size, source = options.image_size, ""
    if size is None and (data.get("train") is None or data.eval_dataset() is None):
        size, source = SYNTHETIC_DEFAULT_SIZE, f" (the config's data cannot be read: {data.first_error()})"
    if size is not None:
        source = f"synthetic {size[0]}x{size[1]}" + source
        adjustments += keep_input_size(cfg, size)
    else:
        source = "data.train (training steps) and data.val (inference)"
    for note in adjustments:
        log(f"segkit bench: {note}")

    subjects, infer_images = _build_subjects(cfg, reference_name, size, data, batch_size, device)
    skipped = {phase: "--skip" for phase in PHASES if phase in options.skip}
    probe = MemoryProbe(device)
    _time_models(subjects, infer_images, batch_size, skipped, Timer(options.iters, options.warmup, device, log), probe)
    ours = subjects["segkit"]
    for phase, bench_fn in (("data", lambda: bench_data(data, batch_size, options.iters, log)),
                            ("eval", lambda: bench_eval(cfg, ours.model, data, device, options.iters, log))):
        if phase not in skipped:
            measured = bench_fn()
            if isinstance(measured, str):
                skipped[phase] = measured  # the reason it could not run
            else:
                ours.entry.update(measured)

    reference = REFERENCES[reference_name] if reference_name else None
    report: dict[str, Any] = {
        "config": getattr(cfg, "filename", "") or None, "model": str((cfg.get("model") or {}).get("type")),
        "compare": options.compare, "reference_model": reference.builder if reference else None,
        "same_weights": reference.same_weights if reference else None, "device": device_name(device),
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "versions": library_versions(), "inputs": source,
        "image_size": list(size) if size else None, "batch_size": batch_size, "iters": options.iters,
        "warmup": options.warmup, "adjustments": adjustments, "skipped": skipped, "memory_method": probe.method,
        "segkit": ours.entry, "reference": subjects["reference"].entry if reference else None,
    }
    report.update(comparison_ratios(report["segkit"], report["reference"]))
    return report


@dataclass
class _Subject:
    """A model under measurement: its optimizer, training batches (cycled) and results."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: Iterator[Batch]
    entry: dict[str, Any]

    def infer(self, images: list[Tensor]) -> Callable[[], None]:
        return lambda: infer_once(self.model, images)

    def train_step(self) -> None:
        loss = run_train_step(self.model, self.optimizer, next(self.batches))
        if not bool(torch.isfinite(loss)):
            self.entry["train_loss_finite"] = False


def _build_subjects(cfg: Mapping[str, Any], reference_name: str | None, size: tuple[int, int] | None,
                    data: DataSource, batch_size: int,
                    device: torch.device) -> tuple[dict[str, _Subject], list[Tensor]]:
    """segkit's model (and the reference) with optimizers and batches, and the inference images."""
    from segkit.api import build_model
    from segkit.config import config_errors
    from segkit.data.class_weights import resolve_class_weights, uses_median_frequency, without_median_frequency

    seed = int(cfg.get("seed") or 0)
    if uses_median_frequency(cfg.get("model")):  # the weights' values do not change the timings
        train = data.get("train") if size is None else None
        cfg = resolve_class_weights(cfg, train, progress=False) if train is not None else without_median_frequency(cfg)
    torch.manual_seed(seed)
    ours = build_model(cfg).to(device)
    models = {"segkit": ours}
    if reference_name:
        models["reference"] = build_reference(reference_name, cfg, ours, size, seed).to(device)
    if size is not None:
        task = model_task(ours)
        gen = torch.Generator().manual_seed(seed)
        train_batches = [synthetic_batch(batch_size, size, *task, generator=gen) for _ in range(_TRAIN_BATCHES)]
        infer_batch = synthetic_batch(batch_size, size, *task, generator=gen)
    else:
        train_batches, infer_batch = data.batches(_TRAIN_BATCHES)
    train_batches = [to_device(b, device) for b in train_batches]
    subjects = {}
    with config_errors(cfg):
        for name, model in models.items():
            subjects[name] = _Subject(model, bench_optimizer(model, cfg, batch_size), itertools.cycle(train_batches),
                                      empty_entry(model))
    return subjects, to_device(infer_batch, device)[0]


def _time_models(subjects: Mapping[str, _Subject], images: list[Tensor], batch_size: int, skipped: Mapping[str, str],
                 timer: Timer, probe: MemoryProbe) -> None:
    """The infer, throughput and train phases, all models alternately; results go to each ``entry``."""
    entries = {name: subject.entry for name, subject in subjects.items()}
    # Inference first, while compared models still hold the same weights: training steps move them
    # apart, and a detector's postprocessing cost depends on how many detections pass its threshold.
    if "infer" not in skipped:
        fns = {name: subject.infer(images[:1]) for name, subject in subjects.items()}
        record_times(entries, "infer", timer.run("inference, batch 1", fns), probe, fns, mem_key="infer_peak_mem_mb")
    if "throughput" not in skipped:
        if batch_size == 1 and "infer" not in skipped:
            for entry in entries.values():  # the same measurement
                entry.update({f"throughput_batch{suffix}": entry[f"infer{suffix}"]
                              for suffix in ("_s", "_min_s", "_max_s", "_all_s")})
        else:
            fns = {name: subject.infer(images[:batch_size]) for name, subject in subjects.items()}
            record_times(entries, "throughput_batch", timer.run(f"inference, batch {batch_size}", fns))
        for entry in entries.values():
            if entry["throughput_batch_s"]:
                entry["throughput_img_s"] = batch_size / entry["throughput_batch_s"]
    if "train" not in skipped:
        for entry in entries.values():
            entry["train_loss_finite"] = True
        fns = {name: subject.train_step for name, subject in subjects.items()}
        record_times(entries, "train_step", timer.run(f"training step, batch {batch_size}", fns), probe, fns,
                mem_key="peak_mem_mb")


def comparison_ratios(ours: Mapping[str, Any], reference: Mapping[str, Any] | None) -> dict[str, float | None]:
    """``ratio_train_step``, ``ratio_infer``, ``ratio_peak_mem`` (segkit / reference: below 1 means
    segkit is faster or smaller) and ``ratio_throughput`` (segkit / reference images/s: above 1 means
    segkit is faster); ``None`` where either side was not measured.

    Example:
        >>> comparison_ratios({"train_step_s": 1.0}, {"train_step_s": 2.0})["ratio_train_step"]
        0.5
    """
    pairs = {"ratio_train_step": "train_step_s", "ratio_infer": "infer_s", "ratio_throughput": "throughput_img_s",
             "ratio_peak_mem": "peak_mem_mb"}
    out: dict[str, float | None] = {}
    for ratio, key in pairs.items():
        a, b = ours.get(key), (reference or {}).get(key)
        out[ratio] = float(a) / float(b) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0 \
            else None
    return out
