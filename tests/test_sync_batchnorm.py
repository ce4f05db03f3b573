"""Synchronised BatchNorm (`model.sync_bn: true`): the CPU layer equals BatchNorm over the whole
batch, the plugin converts and reverts layers, and a 2-process DDP run on the CPU trains with it."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from segkit.engine.sync_batchnorm import CpuSyncBatchNorm, SyncBatchNormPlugin
from tests.conftest import TINY_CONFIG


def _batch_and_weights() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 4, 3, generator=generator) * 3 + 1
    upstream = torch.randn(6, 5, 4, 3, generator=generator)  # d(loss)/d(output)
    weights = {"weight": torch.rand(5, generator=generator) + 0.5, "bias": torch.randn(5, generator=generator)}
    return x, upstream, weights


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    x, upstream, weights = _batch_and_weights()
    part = slice(0, 2) if rank == 0 else slice(2, 6)  # unequal shares: the statistics weight them by count
    bn = CpuSyncBatchNorm(5, momentum=0.3)
    bn.load_state_dict(weights, strict=False)
    local = x[part].clone().requires_grad_()
    out = bn(local)
    (out * upstream[part]).sum().backward()
    for p in bn.parameters():  # gradients summed over processes, as the loss is
        dist.all_reduce(p.grad)
    torch.save({"out": out.detach(), "grad": local.grad, "weight_grad": bn.weight.grad, "bias_grad": bn.bias.grad,
                "running_mean": bn.running_mean, "running_var": bn.running_var},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_cpu_sync_batchnorm_equals_batchnorm_over_the_whole_batch(tmp_path: Path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    x, upstream, weights = _batch_and_weights()
    bn = nn.BatchNorm2d(5, momentum=0.3)
    bn.load_state_dict(weights, strict=False)
    whole = x.clone().requires_grad_()
    out = bn(whole)
    (out * upstream).sum().backward()
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), out.detach())
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]), whole.grad)
    for rank in ranks:
        torch.testing.assert_close(rank["weight_grad"], bn.weight.grad)
        torch.testing.assert_close(rank["bias_grad"], bn.bias.grad)
        torch.testing.assert_close(rank["running_mean"], bn.running_mean)
        torch.testing.assert_close(rank["running_var"], bn.running_var)


def test_plugin_converts_every_batchnorm_and_reverts_with_the_same_tensors():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(4).eval()),
                          nn.GroupNorm(2, 4))
    weight = model[1].weight
    keys = list(model.state_dict())
    plugin = SyncBatchNormPlugin()
    model = plugin.apply(model)
    assert isinstance(model[1], CpuSyncBatchNorm) and isinstance(model[2][0], CpuSyncBatchNorm)
    assert model[1].weight is weight and not model[2][0].training and isinstance(model[3], nn.GroupNorm)
    assert list(model.state_dict()) == keys
    model = plugin.revert(model)
    assert type(model[1]) is nn.BatchNorm2d and type(model[2][0]) is nn.BatchNorm1d and model[1].weight is weight


@pytest.mark.slow  # the synchronised statistics are checked against BatchNorm above; this runs Lightning's DDP
def test_ddp_training_on_the_cpu_with_sync_bn(tmp_path: Path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY_CONFIG.format(root=tmp_path / "data", work_dir=tmp_path / "work"))
    result = subprocess.run(
        [sys.executable, "-m", "segkit.cli", "train", str(cfg), "trainer.devices=2", "trainer.strategy=ddp",
         "model.sync_bn=true", "trainer.max_steps=2", "trainer.limit_val_batches=0",
         "optimizer.auto_scale_lr={base_batch_size: 4}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "BatchNorm layer(s) synchronised across processes (CpuSyncBatchNorm)" in output
    assert "lr 0.003 x 8 / 4 = 0.006 (batch 8 = 4 per process x 2 process(es) x 1 accumulated" in output
    with open(tmp_path / "work" / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert sum(1 for r in rows if r.get("train/loss")) == 2
    assert {float(r["lr-AdamW"]) for r in rows if r.get("lr-AdamW")} == {0.006}
    assert (tmp_path / "work" / "checkpoints" / "last.ckpt").is_file()
