"""Timing and memory of ``segkit bench``: the timer that runs models alternately, the peak-memory probe
(CUDA allocator statistics, ``VmHWM`` or the sampled resident size), one training step and one inference
call of a model, and the device and version details of the report.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from segkit.errors import UserError

if TYPE_CHECKING:
    from segkit.bench.inputs import Batch

_MB = 1024.0 ** 2


# ------------------------------------------------------------------------------ timing, memory
class Timer:
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
                    sync_device(self.device)
                    start = time.perf_counter()
                    fns[name]()
                    sync_device(self.device)
                    if it >= self.warmup:
                        times[name].append(time.perf_counter() - start)
                    bar.update()
        return times


def record_times(results: dict[str, dict[str, Any]], key: str, times: Mapping[str, list[float]],
            probe: MemoryProbe | None = None, fns: Mapping[str, Callable[[], None]] | None = None,
            mem_key: str = "") -> None:
    for name, values in times.items():
        results[name].update({f"{key}_s": statistics.median(values), f"{key}_min_s": min(values),
                              f"{key}_max_s": max(values), f"{key}_all_s": list(values)})
        if probe is not None and fns is not None:
            results[name][mem_key] = probe.measure(fns[name])


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MemoryProbe:
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
def run_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch) -> Tensor:
    images, targets = batch
    model.train()
    losses = model(images, targets)
    loss = sum(losses.values())
    loss.backward()
    optimizer.step()
    # Gradients are freed after the step, not before the next, so a step's peak memory includes them.
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def infer_once(model: nn.Module, images: list[Tensor]) -> None:
    model.eval()
    with torch.no_grad():
        model(images)


def bench_optimizer(model: nn.Module, cfg: Mapping[str, Any], batch_size: int) -> torch.optim.Optimizer:
    """The config's optimizer over ``model``, at the learning rate of the schedule's first iteration."""
    from segkit.engine.optim import BatchSize, build_optimizer, build_scheduler

    optimizer = build_optimizer(model, cfg.get("optimizer") or {"type": "SGD", "lr": 0.01},
                                batch_size=BatchSize(batch_size))
    build_scheduler(optimizer, cfg.get("scheduler"), total_iters=1000, iters_per_epoch=100)  # sets lr(0)
    return optimizer


def empty_entry(model: nn.Module) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    for key in ("train_step", "infer", "throughput_batch"):
        entry.update({f"{key}_s": None, f"{key}_min_s": None, f"{key}_max_s": None, f"{key}_all_s": None})
    entry.update(throughput_img_s=None, peak_mem_mb=None, infer_peak_mem_mb=None, train_loss_finite=None,
                 params_m=sum(p.numel() for p in model.parameters()) / 1e6)
    return entry


def resolve_device(name: str | None) -> torch.device:
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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return "cpu"


def library_versions() -> dict[str, str | None]:
    import segkit

    try:
        import torchvision
        tv: str | None = torchvision.__version__
    except ImportError:
        tv = None
    return {"segkit": segkit.__version__, "torch": torch.__version__, "torchvision": tv,
            "python": platform.python_version()}
