"""What PyTorch Lightning adds to a training step: `segkit train`'s loop against a plain PyTorch loop.

Both loops train the same config's model (same seed, same weights at the start) on the same data
loader (the config's ``data.train`` with its workers, batch size and transforms), with the optimizer
and learning-rate schedule ``segkit train`` builds. The Lightning side is ``segkit.engine.train``
itself, with everything a run has (loggers, the iteration timer, the learning-rate monitor, the
non-finite-loss checks, ``last.ckpt`` at the end of the epoch), validation switched off. Each side
runs ``--steps`` iterations, ``--rounds`` times, alternating, and the time between the ends of
consecutive iterations is recorded (data loading included); the first ``--skip`` iterations of each
run (worker start-up, allocator warm-up) are left out. Reports the median iteration of each side
and the ratio Lightning / plain.

Usage:
    .venv/bin/python tools/lightning_overhead.py [configs/quickstart.yaml] [--steps 60] [--rounds 2]
        [--skip 10] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from typing import Any

import pytorch_lightning as pl
import torch

import segkit
from segkit.engine import runner
from segkit.engine.datamodule import build_datamodule
from segkit.engine.optim import build_optimizer, build_scheduler


class _StepClock(pl.Callback):
    """Records the time at the end of every training iteration."""

    def __init__(self, ends: list[float]) -> None:
        self.ends = ends

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ends.append(time.perf_counter())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.ends.append(time.perf_counter())


def _config(path: str, steps: int, work_dir: str) -> Any:
    return segkit.load_config(path, [
        "trainer.max_epochs=1", f"trainer.limit_train_batches={steps}", "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", f"work_dir={work_dir}",
        "trainer.num_sanity_val_steps=0",
    ])


def lightning_run(path: str, steps: int) -> list[float]:
    ends: list[float] = []
    with tempfile.TemporaryDirectory() as work_dir:
        cfg = _config(path, steps, work_dir)
        original = runner._engine_callbacks

        def with_clock(*args: Any, **kwargs: Any) -> list[pl.Callback]:
            return [*original(*args, **kwargs), _StepClock(ends)]

        runner._engine_callbacks = with_clock
        try:
            runner.train(cfg)
        finally:
            runner._engine_callbacks = original
    return [b - a for a, b in zip(ends, ends[1:])]


def plain_run(path: str, steps: int) -> list[float]:
    with tempfile.TemporaryDirectory() as work_dir:
        cfg = _config(path, steps, work_dir)
    seed = int(cfg.get("seed", 0))
    pl.seed_everything(seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    datamodule.seed = seed
    datamodule.setup("fit")
    model = segkit.build_model(cfg).train()
    optimizer = build_optimizer(model, cfg.get("optimizer") or {"type": "SGD", "lr": 0.01})
    scheduler = build_scheduler(optimizer, cfg.get("scheduler"), total_iters=steps, iters_per_epoch=steps)
    ends = [time.perf_counter()]
    for index, (images, targets) in enumerate(datamodule.train_dataloader()):
        if index == steps:
            break
        losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        float(loss.detach())  # the loss is read every step, as the progress bar and logger do
        ends.append(time.perf_counter())
    return [b - a for a, b in zip(ends, ends[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default="configs/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    times: dict[str, list[float]] = {"lightning": [], "plain": []}
    for round_index in range(args.rounds):
        order = ("lightning", "plain") if round_index % 2 == 0 else ("plain", "lightning")
        for side in order:
            run = lightning_run if side == "lightning" else plain_run
            times[side].extend(run(args.config, args.steps)[args.skip:])
    result: dict[str, Any] = {"config": args.config, "threads": args.threads, "steps": args.steps,
                              "rounds": args.rounds, "skip": args.skip, "torch": torch.__version__,
                              "lightning": pl.__version__}
    print(f"{'loop':<10} {'median s':>9} {'mean s':>8} {'iterations':>11}")
    for side, values in times.items():
        result[side] = {"median_s": statistics.median(values), "mean_s": statistics.fmean(values),
                        "iterations": len(values)}
        print(f"{side:<10} {statistics.median(values):9.4f} {statistics.fmean(values):8.4f} {len(values):11d}")
    result["ratio_median"] = result["lightning"]["median_s"] / result["plain"]["median_s"]
    result["ratio_mean"] = result["lightning"]["mean_s"] / result["plain"]["mean_s"]
    print(f"Lightning / plain: median {result['ratio_median']:.3f}, mean {result['ratio_mean']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
