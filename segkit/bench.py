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

import contextlib
import copy
import ctypes
import gc
import inspect
import itertools
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segkit.errors import UserError

__all__ = ["PHASES", "REFERENCES", "Reference", "BenchOptions", "run_bench", "format_report", "reference_for",
           "comparison_ratios", "parse_image_size", "parse_skip", "synthetic_batch", "TorchvisionSegmentor"]

PHASES = ("infer", "throughput", "train", "data", "eval")
SYNTHETIC_DEFAULT_SIZE = (512, 512)
_MB = 1024.0 ** 2
_TRAIN_BATCHES = 4  # distinct training batches, cycled

Batch = tuple[list[Tensor], list[dict[str, Any]]]


@dataclass(frozen=True)
class Reference:
    """A torchvision model that a segkit config can be compared with.

    Attributes:
        title: what the model is (``"Mask R-CNN R50-FPN"``).
        builder: the torchvision function (``"torchvision.models.detection.maskrcnn_resnet50_fpn"``).
        example_config: a shipped config that matches it.
        same_weights: whether both models run with identical weights.
    """

    title: str
    builder: str
    example_config: str
    same_weights: bool = True


REFERENCES: dict[str, Reference] = {
    "fasterrcnn_resnet50_fpn": Reference("Faster R-CNN R50-FPN", "torchvision.models.detection.fasterrcnn_resnet50_fpn",
                                         "configs/faster_rcnn_r50_fpn_coco.yaml"),
    "maskrcnn_resnet50_fpn": Reference("Mask R-CNN R50-FPN", "torchvision.models.detection.maskrcnn_resnet50_fpn",
                                       "configs/mask_rcnn_r50_fpn_coco.yaml"),
    "fcn_resnet50": Reference("FCN R50-D8", "torchvision.models.segmentation.fcn_resnet50",
                              "configs/fcn_r50_d8_voc.yaml"),
}


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
    device = _device(options.device)
    if options.threads:
        torch.set_num_threads(options.threads)
    batch_size = options.batch_size or int((cfg.get("data") or {}).get("batch_size") or 2)
    data = _DataSource(cfg, batch_size)
    adjustments = _match_reference(reference_name, cfg) if reference_name else []
    size, source = options.image_size, ""
    if size is None and (data.get("train") is None or data.eval_dataset() is None):
        size, source = SYNTHETIC_DEFAULT_SIZE, f" (the config's data cannot be read: {data.first_error()})"
    if size is not None:
        source = f"synthetic {size[0]}x{size[1]}" + source
        adjustments += _keep_input_size(cfg, size)
    else:
        source = "data.train (training steps) and data.val (inference)"
    for note in adjustments:
        log(f"segkit bench: {note}")

    subjects, infer_images = _build_subjects(cfg, reference_name, size, data, batch_size, device)
    skipped = {phase: "--skip" for phase in PHASES if phase in options.skip}
    probe = _MemoryProbe(device)
    _time_models(subjects, infer_images, batch_size, skipped, _Timer(options.iters, options.warmup, device, log), probe)
    ours = subjects["segkit"]
    for phase, bench_fn in (("data", lambda: _bench_data(data, batch_size, options.iters, log)),
                            ("eval", lambda: _bench_eval(cfg, ours.model, data, device, options.iters, log))):
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
        "same_weights": reference.same_weights if reference else None, "device": _device_name(device),
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "versions": _versions(), "inputs": source,
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
        return lambda: _infer(self.model, images)

    def train_step(self) -> None:
        loss = _train_step(self.model, self.optimizer, next(self.batches))
        if not bool(torch.isfinite(loss)):
            self.entry["train_loss_finite"] = False


def _build_subjects(cfg: Mapping[str, Any], reference_name: str | None, size: tuple[int, int] | None,
                    data: _DataSource, batch_size: int,
                    device: torch.device) -> tuple[dict[str, _Subject], list[Tensor]]:
    """segkit's model (and the reference) with optimizers and batches, and the inference images."""
    from segkit.api import build_model
    from segkit.config import config_errors

    seed = int(cfg.get("seed") or 0)
    torch.manual_seed(seed)
    ours = build_model(cfg).to(device)
    models = {"segkit": ours}
    if reference_name:
        models["reference"] = _build_reference(reference_name, cfg, ours, size, seed).to(device)
    if size is not None:
        task = _task(ours)
        gen = torch.Generator().manual_seed(seed)
        train_batches = [synthetic_batch(batch_size, size, *task, generator=gen) for _ in range(_TRAIN_BATCHES)]
        infer_batch = synthetic_batch(batch_size, size, *task, generator=gen)
    else:
        train_batches, infer_batch = data.batches(_TRAIN_BATCHES)
    train_batches = [_to_device(b, device) for b in train_batches]
    subjects = {}
    with config_errors(cfg):
        for name, model in models.items():
            subjects[name] = _Subject(model, _optimizer(model, cfg, batch_size), itertools.cycle(train_batches),
                                      _empty_entry(model))
    return subjects, _to_device(infer_batch, device)[0]


def _time_models(subjects: Mapping[str, _Subject], images: list[Tensor], batch_size: int, skipped: Mapping[str, str],
                 timer: _Timer, probe: _MemoryProbe) -> None:
    """The infer, throughput and train phases, all models alternately; results go to each ``entry``."""
    entries = {name: subject.entry for name, subject in subjects.items()}
    # Inference first, while compared models still hold the same weights: training steps move them
    # apart, and a detector's postprocessing cost depends on how many detections pass its threshold.
    if "infer" not in skipped:
        fns = {name: subject.infer(images[:1]) for name, subject in subjects.items()}
        _record(entries, "infer", timer.run("inference, batch 1", fns), probe, fns, mem_key="infer_peak_mem_mb")
    if "throughput" not in skipped:
        if batch_size == 1 and "infer" not in skipped:
            for entry in entries.values():  # the same measurement
                entry.update({f"throughput_batch{suffix}": entry[f"infer{suffix}"]
                              for suffix in ("_s", "_min_s", "_max_s", "_all_s")})
        else:
            fns = {name: subject.infer(images[:batch_size]) for name, subject in subjects.items()}
            _record(entries, "throughput_batch", timer.run(f"inference, batch {batch_size}", fns))
        for entry in entries.values():
            if entry["throughput_batch_s"]:
                entry["throughput_img_s"] = batch_size / entry["throughput_batch_s"]
    if "train" not in skipped:
        for entry in entries.values():
            entry["train_loss_finite"] = True
        fns = {name: subject.train_step for name, subject in subjects.items()}
        _record(entries, "train_step", timer.run(f"training step, batch {batch_size}", fns), probe, fns,
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


# ------------------------------------------------------------------------------ timing, memory
class _Timer:
    """Runs callables alternately (the order flips every iteration), ``warmup`` untimed rounds first."""

    def __init__(self, iters: int, warmup: int, device: torch.device, log: Callable[[str], None]) -> None:
        self.iters, self.warmup, self.device, self.log = iters, warmup, device, log

    def run(self, what: str, fns: Mapping[str, Callable[[], None]]) -> dict[str, list[float]]:
        from tqdm import tqdm

        names = list(fns)
        self.log(f"segkit bench: {what}: {self.warmup} warm-up + {self.iters} timed iteration(s)"
                 + (" of each model, alternating" if len(names) > 1 else ""))
        times: dict[str, list[float]] = {name: [] for name in names}
        rounds = self.warmup + self.iters
        with tqdm(total=rounds * len(names), desc=what, unit="it", disable=None, leave=False,
                  file=sys.stderr) as bar:
            for it in range(rounds):
                for name in names if it % 2 == 0 else names[::-1]:
                    _sync(self.device)
                    start = time.perf_counter()
                    fns[name]()
                    _sync(self.device)
                    if it >= self.warmup:
                        times[name].append(time.perf_counter() - start)
                    bar.update()
        return times


def _record(results: dict[str, dict[str, Any]], key: str, times: Mapping[str, list[float]],
            probe: _MemoryProbe | None = None, fns: Mapping[str, Callable[[], None]] | None = None,
            mem_key: str = "") -> None:
    for name, values in times.items():
        results[name].update({f"{key}_s": statistics.median(values), f"{key}_min_s": min(values),
                              f"{key}_max_s": max(values), f"{key}_all_s": list(values)})
        if probe is not None and fns is not None:
            results[name][mem_key] = probe.measure(fns[name])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _MemoryProbe:
    """The peak memory one call needs above the memory in use just before it, in MB."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self._mode = "cuda"
            self.method = "torch.cuda.max_memory_allocated during one call above the memory allocated before it"
        elif _reset_peak_rss():
            self._mode = "hwm"
            self.method = ("peak RSS during one call (VmHWM, reset through /proc/self/clear_refs) above the RSS "
                           "before it, after gc and malloc_trim")
        elif os.path.exists("/proc/self/statm") or _psutil_process() is not None:
            self._mode = "sample"
            self.method = "RSS sampled every 1 ms during one call above the RSS before it (a lower bound)"
        else:
            self._mode = "none"
            self.method = "unavailable (no /proc and no psutil)"

    def measure(self, fn: Callable[[], None]) -> float | None:
        """Run ``fn`` once and return its peak memory in MB (``None`` where it cannot be measured)."""
        gc.collect()
        if self._mode == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - before) / _MB
        if self._mode == "none":
            fn()
            return None
        _malloc_trim()
        before = _rss_bytes()
        if self._mode == "hwm" and _reset_peak_rss():
            fn()
            return max(0.0, (_proc_status_kb("VmHWM") * 1024 - before) / _MB)
        with _Sampler() as peak:
            fn()
        return max(0.0, (peak.peak - before) / _MB)


class _Sampler:
    """Samples the resident size every millisecond in a thread while the block runs."""

    def __init__(self) -> None:
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0); ``False`` where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_kb("VmHWM") > 0
    except OSError:
        return False


def _proc_status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def _psutil_process() -> Any:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process()


def _rss_bytes() -> int:
    if os.path.exists("/proc/self/statm"):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    process = _psutil_process()
    return int(process.memory_info().rss) if process is not None else 0


def _malloc_trim() -> None:
    """Give freed heap memory back to the system (glibc), so the RSS before a call is what is in use."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


# ------------------------------------------------------------------------------- model steps
def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch) -> Tensor:
    images, targets = batch
    model.train()
    losses = model(images, targets)
    loss = sum(losses.values())
    loss.backward()
    optimizer.step()
    # Gradients are freed after the step, not before the next, so a step's peak memory includes them.
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _infer(model: nn.Module, images: list[Tensor]) -> None:
    model.eval()
    with torch.no_grad():
        model(images)


def _optimizer(model: nn.Module, cfg: Mapping[str, Any], batch_size: int) -> torch.optim.Optimizer:
    """The config's optimizer over ``model``, at the learning rate of the schedule's first iteration."""
    from segkit.engine.optim import BatchSize, build_optimizer, build_scheduler

    optimizer = build_optimizer(model, cfg.get("optimizer") or {"type": "SGD", "lr": 0.01},
                                batch_size=BatchSize(batch_size))
    build_scheduler(optimizer, cfg.get("scheduler"), total_iters=1000, iters_per_epoch=100)  # sets lr(0)
    return optimizer


def _empty_entry(model: nn.Module) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    for key in ("train_step", "infer", "throughput_batch"):
        entry.update({f"{key}_s": None, f"{key}_min_s": None, f"{key}_max_s": None, f"{key}_all_s": None})
    entry.update(throughput_img_s=None, peak_mem_mb=None, infer_peak_mem_mb=None, train_loss_finite=None,
                 params_m=sum(p.numel() for p in model.parameters()) / 1e6)
    return entry


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"--device takes cpu, cuda or cuda:N; got '{name}'.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available to this torch ({torch.__version__}); "
                        f"use --device cpu.")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device takes cpu, cuda or cuda:N; got '{name}'.")
    return device


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return "cpu"


def _versions() -> dict[str, str | None]:
    import segkit

    try:
        import torchvision
        tv: str | None = torchvision.__version__
    except ImportError:
        tv = None
    return {"segkit": segkit.__version__, "torch": torch.__version__, "torchvision": tv,
            "python": platform.python_version()}


# ------------------------------------------------------------------------------------ inputs
def synthetic_batch(batch_size: int, size: tuple[int, int], task: str, num_classes: int, masks: bool, *,
                    generator: torch.Generator) -> Batch:
    """Random images in [0, 1] with targets for ``task`` (``"detection"`` or ``"semantic"``).

    Detection: six boxes per image (xyxy pixels inside the image, 10-40 % of its sides), labels in
    1..K and, with ``masks``, the boxes filled as uint8 masks. Semantic: ``sem_seg`` int64 [H, W]
    with classes 0..K-1.
    """
    height, width = size
    images, targets = [], []
    ys, xs = torch.arange(height)[:, None], torch.arange(width)[None, :]
    scale = torch.tensor([width, height], dtype=torch.float32)
    for _ in range(batch_size):
        images.append(torch.rand(3, height, width, generator=generator))
        if task == "semantic":
            targets.append({"sem_seg": torch.randint(0, num_classes, (height, width), generator=generator)})
            continue
        xy = torch.rand(6, 2, generator=generator) * 0.6 * scale
        wh = (0.1 + 0.3 * torch.rand(6, 2, generator=generator)) * scale
        boxes = torch.cat([xy, xy + wh], 1)
        target = {"boxes": boxes, "labels": torch.randint(1, num_classes + 1, (6,), generator=generator)}
        if masks:
            target["masks"] = ((xs >= boxes[:, 0, None, None]) & (xs < boxes[:, 2, None, None])
                               & (ys >= boxes[:, 1, None, None]) & (ys < boxes[:, 3, None, None])).to(torch.uint8)
        targets.append(target)
    return images, targets


def _task(model: nn.Module) -> tuple[str, int, bool]:
    """``(task, num_classes, masks)`` of a model, for synthetic targets."""
    from segkit.models.segmentor import EncoderDecoder

    if isinstance(model, EncoderDecoder):
        return "semantic", model.num_classes, False
    roi_heads = getattr(model, "roi_heads", None)
    num_classes = getattr(roi_heads, "num_classes", None)
    if not isinstance(num_classes, int):
        raise UserError(f"synthetic inputs are made for detectors with roi_heads.num_classes and for EncoderDecoder "
                        f"segmentors, not for {type(model).__name__}; leave out --image-size to use the config's data.")
    return "detection", num_classes, getattr(roi_heads, "mask_head", None) is not None


def _to_device(batch: Batch, device: torch.device) -> Batch:
    images, targets = batch
    return ([image.to(device) for image in images],
            [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets])


class _DataSource:
    """The config's datasets and loaders, built on first use; errors are kept as reasons, not raised."""

    def __init__(self, cfg: Mapping[str, Any], batch_size: int) -> None:
        self.cfg = cfg
        self.batch_size = batch_size
        self.errors: dict[str, str] = {}
        self._datasets: dict[str, Any] = {}
        self._module: Any = None

    def module(self) -> Any:
        if self._module is None and "datamodule" not in self.errors:
            from segkit.engine.datamodule import build_datamodule

            try:
                self._module = build_datamodule(self.cfg)
            except (UserError, OSError) as exc:
                self.errors["datamodule"] = str(exc)
            else:
                self._module.batch_size = self.batch_size
        return self._module

    def get(self, split: str) -> Any:
        if split not in self._datasets and split not in self.errors:
            module = self.module()
            if module is None:
                return None
            try:
                self._datasets[split] = module.build_dataset(split)
            except (UserError, OSError) as exc:
                self.errors[split] = str(exc)
        return self._datasets.get(split)

    def eval_dataset(self) -> Any:
        return self.get("val") if (self.cfg.get("data") or {}).get("val") is not None else self.get("train")

    def first_error(self) -> str:
        return next(iter(self.errors.values()), "no data section")

    def batches(self, count: int) -> tuple[list[Batch], Batch]:
        """``count`` training batches from data.train (cycled through it) and one inference batch."""
        from segkit.data.collate import collate

        train, evaluation = self.get("train"), self.eval_dataset()
        samples = [train[i % len(train)] for i in range(count * self.batch_size)]
        batches = [collate(samples[i:i + self.batch_size]) for i in range(0, len(samples), self.batch_size)]
        return batches, collate([evaluation[i % len(evaluation)] for i in range(self.batch_size)])


def _bench_data(data: _DataSource, batch_size: int, iters: int, log: Callable[[str], None]) -> dict[str, Any] | str:
    """Images/s through the train DataLoader, from the first batch's arrival (worker start-up is
    ``data_first_batch_s``); at least 4 batches per worker so prefetched batches do not dominate."""
    if data.get("train") is None:
        return f"data.train cannot be read: {data.errors.get('train') or data.first_error()}"
    module = data.module()
    count = max(iters, 4 * module.num_workers)
    log(f"segkit bench: data loading, batch {batch_size}, {module.num_workers} worker(s): up to {count} batches")
    start = time.perf_counter()
    iterator: Iterator[Batch] = iter(module.train_dataloader())
    first = next(iterator)
    first_s = time.perf_counter() - start
    images = batches = 0
    start = time.perf_counter()
    for batch in itertools.islice(iterator, count):
        images += len(batch[0])
        batches += 1
    elapsed = time.perf_counter() - start
    del iterator
    if batches == 0:  # one batch in the whole dataset: start-up included
        images, elapsed = len(first[0]), first_s
    return {"data_img_s": images / elapsed if elapsed > 0 else None, "data_first_batch_s": first_s,
            "data_batches": batches, "data_images": images, "data_workers": module.num_workers}


def _bench_eval(cfg: Mapping[str, Any], model: nn.Module, data: _DataSource, device: torch.device, iters: int,
                log: Callable[[str], None]) -> dict[str, Any] | str:
    """The config's evaluator on ``iters`` validation batches: ``process`` of each batch's outputs
    and one ``evaluate``; the model's own time is ``eval_model_s``."""
    from segkit.config import config_errors
    from segkit.engine.module import EVALUATION_RESERVED_KEYS
    from segkit.registry import EVALUATORS

    split = "val" if (cfg.get("data") or {}).get("val") is not None else None
    dataset = data.get(split) if split else None
    if split is None:
        return "the config has no data.val"
    if dataset is None:
        return f"data.val cannot be read: {data.errors.get('val') or data.first_error()}"
    eval_cfg = {k: v for k, v in (cfg.get("evaluation") or {}).items() if k not in EVALUATION_RESERVED_KEYS}
    eval_cfg.setdefault("type", "CocoEvaluator")
    defaults: dict[str, Any] = {"dataset": dataset}
    threshold = getattr(model, "mask_threshold", None)
    with config_errors(cfg):
        evaluator_class = EVALUATORS.get(str(eval_cfg["type"]), key="evaluation.type")
        if threshold is not None and "mask_threshold" in inspect.signature(evaluator_class).parameters:
            defaults["mask_threshold"] = threshold  # the model's test-time setting, as in training
        evaluator = EVALUATORS.build(eval_cfg, path="evaluation", **defaults)
    evaluator.reset()
    log(f"segkit bench: evaluation with {eval_cfg['type']}: {iters} validation batch(es)")
    model.eval()
    model_s = process_s = 0.0
    images = 0
    with torch.no_grad():
        for batch in itertools.islice(iter(data.module().val_dataloader()), iters):
            inputs, targets = _to_device(batch, device)
            start = time.perf_counter()
            outputs = model(inputs)
            _sync(device)
            model_s += time.perf_counter() - start
            targets = [{**t, "image_size": tuple(img.shape[-2:])} for t, img in zip(targets, inputs)]
            start = time.perf_counter()
            evaluator.process(targets, outputs)
            process_s += time.perf_counter() - start
            images += len(inputs)
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # pycocotools prints its tables
        evaluator.evaluate()
    evaluate_s = time.perf_counter() - start
    return {"eval_s": process_s + evaluate_s, "eval_process_s": process_s, "eval_evaluate_s": evaluate_s,
            "eval_images": images, "eval_model_s": model_s}


def _keep_input_size(cfg: dict[str, Any], size: tuple[int, int]) -> list[str]:
    """Make a resizing detector keep synthetic images at their size, unless the command line set it."""
    from segkit.config import COMMAND_LINE

    model = cfg.get("model") or {}
    origins = getattr(cfg, "origins", {})
    if model.get("min_size") is None or COMMAND_LINE in (origins.get("model.min_size"), origins.get("model.max_size")):
        return []
    old = (model.get("min_size"), model.get("max_size"))
    model["min_size"], model["max_size"] = min(size), max(size)
    return [f"model.min_size/max_size {old[0]}/{old[1]} -> {min(size)}/{max(size)} so the network sees the "
            f"{size[0]}x{size[1]} synthetic images unresized (set them on the command line to keep a resize)"]


# --------------------------------------------------------------------------------- references
def reference_for(cfg: Mapping[str, Any]) -> str:
    """The key of :data:`REFERENCES` whose torchvision model matches ``cfg["model"]``.

    Raises:
        UserError: the model has no torchvision equivalent; the message lists those that have one.
    """
    model = cfg.get("model") or {}
    backbone, neck = model.get("backbone") or {}, model.get("neck") or {}
    resnet50 = backbone.get("type") == "ResNet" and backbone.get("depth") == 50
    undilated = list(backbone.get("strides", [1, 2, 2, 2])) == [1, 2, 2, 2] \
        and list(backbone.get("dilations", [1, 1, 1, 1])) == [1, 1, 1, 1]
    if model.get("type") == "TwoStageDetector" and resnet50 and undilated and neck.get("type") == "FPN":
        roi = model.get("roi_head") or {}
        if (model.get("rpn_head") or {}).get("type") == "RPN" and roi.get("type") == "StandardRoIHead":
            mask = roi.get("mask_head")
            if mask is None:
                return "fasterrcnn_resnet50_fpn"
            if mask.get("type") == "MaskRCNNHead":
                return "maskrcnn_resnet50_fpn"
    if model.get("type") == "EncoderDecoder" and resnet50 and not neck \
            and (model.get("decode_head") or {}).get("type") == "FCNHead":
        return "fcn_resnet50"
    described = {"TwoStageDetector": "a TwoStageDetector", "EncoderDecoder": "an EncoderDecoder"}
    what = described.get(str(model.get("type")), f"a {model.get('type')}")
    parts = f"{backbone.get('type')}-{backbone.get('depth')}" + (f" + {neck.get('type')}" if neck else "")
    choices = "; ".join(f"{r.title} ({name}, e.g. {r.example_config})" for name, r in REFERENCES.items())
    raise UserError(f"--compare torchvision: {getattr(cfg, 'filename', '') or 'this config'} describes {what} on "
                    f"{parts}, which has no torchvision equivalent. Configs that can be compared: {choices}.")


def _match_reference(name: str, cfg: dict[str, Any]) -> list[str]:
    """Settings of segkit's model changed to torchvision's architecture, as notes."""
    model = cfg["model"]
    pretrained = model["backbone"].get("pretrained")
    notes = []
    if pretrained is not None:  # replaced by the reference's weights anyway; the file need not exist
        model["backbone"]["pretrained"] = None
        notes.append(f"model.backbone.pretrained {pretrained} -> null (both models get torchvision's weights)")
    if name != "fcn_resnet50":
        return notes
    # torchvision: 7x7 stem; heads of one 3x3 conv to in_channels / 4 (c5: 512, c4: 256), then a 1x1 classifier.
    wanted = {("backbone", "stem"): "default", ("decode_head", "in_features"): "c5",
              ("decode_head", "num_convs"): 1, ("decode_head", "channels"): 512, ("decode_head", "kernel_size"): 3}
    if isinstance(model.get("auxiliary_head"), Mapping):
        wanted.update({("auxiliary_head", "in_features"): "c4", ("auxiliary_head", "num_convs"): 1,
                       ("auxiliary_head", "channels"): 256, ("auxiliary_head", "kernel_size"): 3})
    defaults = {"stem": "default", "in_features": "c5", "num_convs": 1, "kernel_size": 3,
                "channels": {"decode_head": 512, "auxiliary_head": 256}}
    changed = []
    for (section, key), value in wanted.items():
        default = defaults[key][section] if isinstance(defaults[key], dict) else defaults[key]
        current = model[section].get(key)
        current = default if current is None else current
        if current != value:
            model[section][key] = value
            changed.append(f"model.{section}.{key} {current} -> {value}")
    test_cfg = model.get("test_cfg") or {}
    if test_cfg.get("mode", "whole") != "whole" or test_cfg.get("flip") or list(test_cfg.get("scales", [1.0])) != [1.0]:
        model["test_cfg"] = {"mode": "whole"}
        changed.append("model.test_cfg -> {mode: whole} (single scale, no flip)")
    return notes + ([f"to match torchvision's fcn_resnet50: {', '.join(changed)}"] if changed else [])


def _build_reference(name: str, cfg: Mapping[str, Any], ours: nn.Module, size: tuple[int, int] | None,
                     seed: int) -> nn.Module:
    """torchvision's model for ``name``, with its weights loaded into ``ours`` (proving the match)."""
    torch.manual_seed(seed)
    if name == "fcn_resnet50":
        return _torchvision_fcn(cfg, ours)
    from segkit.models.convert_detectors import convert_torchvision_detector

    reference = _torchvision_detector(name, cfg, size)
    state, _ = convert_torchvision_detector(reference.state_dict())
    _load_or_explain(ours, state, name, cfg)
    return reference


def _load_or_explain(model: nn.Module, state: Mapping[str, Tensor], name: str, cfg: Mapping[str, Any]) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise UserError(f"--compare torchvision: the model of {getattr(cfg, 'filename', '') or 'this config'} differs "
                        f"from torchvision's {name} ({detail[:400]}); compare a config like "
                        f"{REFERENCES[name].example_config}.") from exc


def _settings(registry: Any, section: Mapping[str, Any]) -> dict[str, Any]:
    """A component's constructor defaults overlaid with its config section."""
    params = inspect.signature(registry.get(str(section["type"]))).parameters
    return {**{k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty},
            **{k: v for k, v in section.items() if k != "type"}}


def _torchvision_detector(name: str, cfg: Mapping[str, Any], size: tuple[int, int] | None) -> nn.Module:
    """torchvision's Faster / Mask R-CNN with the settings of segkit's config (sizes, RPN, RoI heads)."""
    from torchvision.models import resnet50
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import MultiScaleRoIAlign
    from torchvision.ops.misc import FrozenBatchNorm2d

    from segkit.registry import BACKBONES, HEADS, MODELS

    m = cfg["model"]
    det, bb = _settings(MODELS, m), _settings(BACKBONES, m["backbone"])
    rpn, roi = _settings(HEADS, m["rpn_head"]), _settings(HEADS, m["roi_head"])
    norms = {"FrozenBN": FrozenBatchNorm2d, "BN": nn.BatchNorm2d}
    if bb["norm"] not in norms:
        raise UserError(f"--compare torchvision: model.backbone.norm '{bb['norm']}' has no torchvision equivalent "
                        f"(FrozenBN or BN).")
    frozen = int(bb["frozen_stages"])
    backbone = _resnet_fpn_extractor(resnet50(norm_layer=norms[bb["norm"]]),
                                     trainable_layers=5 if frozen < 0 else max(0, 4 - frozen))
    min_size, max_size = det["min_size"], det["max_size"]
    if min_size is None:  # segkit keeps the input size; torchvision always resizes, so resize to it
        min_size, max_size = (min(size), max(size)) if size else (800, 1333)
    elif max_size is None:
        max_size = int(round(min_size * 1333 / 800))
    levels = len(rpn["anchor_sizes"])
    kwargs: dict[str, Any] = dict(
        num_classes=int(roi["num_classes"]) + 1, min_size=min_size, max_size=max_size,
        image_mean=list(det["pixel_mean"]), image_std=list(det["pixel_std"]),
        rpn_anchor_generator=AnchorGenerator(tuple(tuple(s) for s in rpn["anchor_sizes"]),
                                             (tuple(rpn["aspect_ratios"]),) * levels),
        rpn_pre_nms_top_n_train=rpn["pre_nms_top_n_train"], rpn_pre_nms_top_n_test=rpn["pre_nms_top_n_test"],
        rpn_post_nms_top_n_train=rpn["post_nms_top_n_train"], rpn_post_nms_top_n_test=rpn["post_nms_top_n_test"],
        rpn_nms_thresh=rpn["nms_threshold"], rpn_fg_iou_thresh=rpn["fg_iou_threshold"],
        rpn_bg_iou_thresh=rpn["bg_iou_threshold"], rpn_batch_size_per_image=rpn["batch_size_per_image"],
        rpn_positive_fraction=rpn["positive_fraction"], rpn_score_thresh=rpn["score_threshold"],
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], roi["pooler_resolution"], roi["pooler_sampling_ratio"]),
        box_score_thresh=roi["score_threshold"], box_nms_thresh=roi["nms_threshold"],
        box_detections_per_img=roi["detections_per_image"], box_fg_iou_thresh=roi["fg_iou_threshold"],
        box_bg_iou_thresh=roi["bg_iou_threshold"], box_batch_size_per_image=roi["batch_size_per_image"],
        box_positive_fraction=roi["positive_fraction"],
    )
    if name == "fasterrcnn_resnet50_fpn":
        return FasterRCNN(backbone, **kwargs)
    mask = _settings(HEADS, m["roi_head"]["mask_head"])
    return MaskRCNN(backbone, mask_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], mask["pooler_resolution"],
                                                               mask["pooler_sampling_ratio"]), **kwargs)


class TorchvisionSegmentor(nn.Module):
    """torchvision's FCN behind segkit's segmentor interface, so both run the same calls.

    Images are normalised and zero-padded to multiples of ``size_divisor`` as segkit does; training
    returns the cross-entropy of the main output (``loss_seg``) and of the auxiliary one scaled by
    ``aux_weight`` (``loss_aux``); inference returns ``{"sem_seg": probabilities [K, H, W]}``.

    Args:
        net: a ``torchvision.models.segmentation`` model returning ``{"out", "aux"?}`` logits.
        pixel_mean / pixel_std / size_divisor / ignore_index: as in segkit's ``EncoderDecoder``.
        aux_weight: weight of the auxiliary loss.
    """

    def __init__(self, *, net: nn.Module, pixel_mean: Sequence[float], pixel_std: Sequence[float],
                 size_divisor: int = 32, ignore_index: int = 255, aux_weight: float = 0.2) -> None:
        super().__init__()
        self.net = net
        self.backbone = net.backbone
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(3, 1, 1), persistent=False)
        self.size_divisor, self.ignore_index, self.aux_weight = size_divisor, ignore_index, aux_weight

    def _pad(self, tensors: Sequence[Tensor], value: float) -> Tensor:
        d = self.size_divisor
        height = -(-max(t.shape[-2] for t in tensors) // d) * d
        width = -(-max(t.shape[-1] for t in tensors) // d) * d
        return torch.stack([F.pad(t, (0, width - t.shape[-1], 0, height - t.shape[-2]), value=value) for t in tensors])

    def forward(self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None = None) -> Any:
        batch = self._pad([(image - self.pixel_mean) / self.pixel_std for image in images], 0.0)
        out = self.net(batch)
        if self.training:
            labels = self._pad([t["sem_seg"] for t in targets or ()], float(self.ignore_index))
            losses = {"loss_seg": F.cross_entropy(out["out"], labels, ignore_index=self.ignore_index)}
            if "aux" in out:
                aux = F.cross_entropy(out["aux"], labels, ignore_index=self.ignore_index)
                losses["loss_aux"] = self.aux_weight * aux
            return losses
        logits = out["out"]
        return [{"sem_seg": logits[i, :, :img.shape[-2], :img.shape[-1]].softmax(0)} for i, img in enumerate(images)]


_FCN_HEAD_KEYS = {"convs.0.0.": "0.", "convs.0.1.": "1.", "classifier.": "4."}


def _torchvision_fcn(cfg: Mapping[str, Any], ours: nn.Module) -> nn.Module:
    """torchvision's fcn_resnet50 (auxiliary head when segkit has one), its weights loaded into ``ours``."""
    from torchvision.models.segmentation import fcn_resnet50

    m = cfg["model"]
    bb = m["backbone"]
    if list(bb.get("strides", [])) != [1, 2, 1, 1] or list(bb.get("dilations", [])) != [1, 1, 2, 4]:
        raise UserError("--compare torchvision: fcn_resnet50 is a dilated ResNet-50 of output stride 8; set "
                        "model.backbone.strides=[1,2,1,1] and model.backbone.dilations=[1,1,2,4].")
    aux_heads = list(getattr(ours, "auxiliary_heads", []))
    net = fcn_resnet50(weights=None, weights_backbone=None, num_classes=ours.num_classes, aux_loss=bool(aux_heads))
    state = {f"backbone.{k}": v for k, v in net.backbone.state_dict().items()}
    heads = [("decode_head.", net.classifier)] + ([("auxiliary_heads.0.", net.aux_classifier)] if aux_heads else [])
    for prefix, head in heads:
        theirs = head.state_dict()
        for ours_key, their_key in _FCN_HEAD_KEYS.items():
            state.update({prefix + ours_key + k[len(their_key):]: v for k, v in theirs.items()
                          if k.startswith(their_key)})
    _load_or_explain(ours, state, "fcn_resnet50", cfg)
    weight = float(getattr(aux_heads[0], "loss_weight", 0.2)) if aux_heads else 0.0
    return TorchvisionSegmentor(net=net, pixel_mean=ours.pixel_mean.flatten().tolist(),
                                pixel_std=ours.pixel_std.flatten().tolist(), size_divisor=ours.size_divisor,
                                ignore_index=ours.ignore_index, aux_weight=weight)


# -------------------------------------------------------------------------------------- output
def format_report(report: Mapping[str, Any]) -> str:
    """The report of :func:`run_bench` as a table (times: median [min-max])."""
    ours, ref = report["segkit"], report.get("reference")
    batch = report["batch_size"]
    lines = [f"segkit bench {report['config'] or ''}: {report['model']}"
             + (f" against {report['reference_model']}"
                + (" (same weights)" if report.get("same_weights") else "") if ref else ""),
             f"{report['device']}, {report['threads']} thread(s), inputs: {report['inputs']}, "
             f"{report['iters']} timed iteration(s) after {report['warmup']} warm-up; median [min-max]",
             ""]
    header = f"{'':<28}{'segkit':>26}" + (f"{'torchvision':>26}{'segkit/torchvision':>20}" if ref else "")
    lines.append(header)

    def time_cell(entry: Mapping[str, Any], key: str) -> str:
        if entry.get(f"{key}_s") is None:
            return "-"
        return f"{entry[f'{key}_s']:.3f} s [{entry[f'{key}_min_s']:.3f}-{entry[f'{key}_max_s']:.3f}]"

    def number(value: Any, unit: str, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f} {unit}"

    def ratio(key: str) -> str:
        return "-" if report.get(key) is None else f"{report[key]:.3f}"

    rows = [
        (f"train step (batch {batch})", time_cell(ours, "train_step"), ref and time_cell(ref, "train_step"),
         ratio("ratio_train_step")),
        ("inference (batch 1)", time_cell(ours, "infer"), ref and time_cell(ref, "infer"), ratio("ratio_infer")),
        (f"throughput (batch {batch})", number(ours["throughput_img_s"], "img/s", 2),
         ref and number(ref["throughput_img_s"], "img/s", 2), ratio("ratio_throughput")),
        ("peak memory, train step", number(ours["peak_mem_mb"], "MB"), ref and number(ref["peak_mem_mb"], "MB"),
         ratio("ratio_peak_mem")),
        ("peak memory, inference", number(ours["infer_peak_mem_mb"], "MB"),
         ref and number(ref["infer_peak_mem_mb"], "MB"), "-"),
        ("parameters", number(ours["params_m"], "M", 2), ref and number(ref["params_m"], "M", 2), "-"),
    ]
    for label, a, b, r in rows:
        lines.append(f"{label:<28}{a:>26}" + (f"{b:>26}{r:>20}" if ref else ""))
    if ours.get("data_img_s") is not None:
        lines.append(f"{'data loading (train)':<28}{ours['data_img_s']:>20.1f} img/s  "
                     f"({ours['data_workers']} worker(s), "
                     f"{ours['data_images']} images; first batch after {ours['data_first_batch_s']:.2f} s)")
    if ours.get("eval_s") is not None:
        lines.append(f"{'evaluation (val)':<28}{ours['eval_s']:>24.3f} s  ({ours['eval_images']} images: process "
                     f"{ours['eval_process_s']:.3f} s, evaluate {ours['eval_evaluate_s']:.3f} s; model "
                     f"{ours['eval_model_s']:.3f} s not included)")
    for phase, reason in report["skipped"].items():
        lines.append(f"{phase}: skipped ({reason})")
    for name, entry in (("segkit", ours), ("torchvision", ref)):
        if entry and entry.get("train_loss_finite") is False:
            lines.append(f"warning: {name}'s training loss became non-finite; its step times may not be representative")
    lines.append(f"memory: {report['memory_method']}")
    return "\n".join(lines)
