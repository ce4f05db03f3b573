"""The table that ``segkit bench`` prints from the report of :func:`segkit.bench.run_bench`:
times as median [min-max], throughput, peak memory and parameters, with segkit/torchvision ratios
when a reference was compared, then data loading, evaluation, skipped phases and warnings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


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
