"""Moving evaluation state between processes.

Evaluation under DDP must equal single-process evaluation: every process keeps the results of the
images its sampler gave it, the states are gathered, one process merges them (dropping the
sampler's padding duplicates), scores them and broadcasts the numbers. Without an initialised
``torch.distributed`` process group these functions act as for a single process, so the same code
runs everywhere.

With the NCCL backend, the current CUDA device must be set (Lightning does so), because objects
travel through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch.distributed as dist

if TYPE_CHECKING:
    from segkit.evaluation.base import Evaluator

__all__ = ["all_gather_objects", "broadcast_object", "evaluate_distributed", "get_rank", "get_world_size", "is_distributed"]


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Rank of this process (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order, on every process; ``[obj]`` without a group."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Process ``src``'s ``obj`` (picklable) on every process; ``obj`` itself without a group.

    Every process must call it; the value passed by the others is ignored.
    """
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def evaluate_distributed(evaluator: Evaluator, *, src: int = 0) -> dict[str, float]:
    """Gather ``evaluator.state()`` from every process, merge and evaluate on ``src``, broadcast.

    Every process must call it and gets the same metrics. If evaluation fails on ``src``, it
    raises there and a ``RuntimeError`` carrying the message is raised on the other processes, so
    none waits forever.

    Example:
        >>> metrics = evaluate_distributed(evaluator)  # after evaluator.process(...) on each rank
    """
    states = all_gather_objects(evaluator.state())
    payload: tuple[dict[str, float] | None, str | None] = (None, None)
    error: Exception | None = None
    if get_rank() == src:
        try:
            evaluator.merge(states)
            payload = ({k: float(v) for k, v in evaluator.evaluate().items()}, None)
        except Exception as exc:  # noqa: BLE001 - re-raised below after telling the other ranks
            error = exc
            payload = (None, f"{type(exc).__name__}: {exc}")
    metrics, message = broadcast_object(payload, src=src)
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"evaluation failed on rank {src}: {message}")
    return cast("dict[str, float]", metrics)
