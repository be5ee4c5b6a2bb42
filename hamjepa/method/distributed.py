"""Global-batch statistics under data parallelism.

Every batch statistic of the objectives (means, second moments, covariances, Epps-Pulley sums) is a
function of *sums over samples*. Summing those sufficient statistics across workers before finishing
the computation makes a loss on W workers x B/W samples equal the loss on B samples in one process.

The sum is differentiable: its backward all-reduces (sums) the incoming gradient too. Every worker holds
the same loss L, so each worker's local samples receive W * dL/dx; DistributedDataParallel then averages
parameter gradients over W workers, which gives exactly dL/dtheta of the global-batch loss.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.distributed as dist

_local_only = threading.local()


def is_distributed() -> bool:
    if getattr(_local_only, "active", False):
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def local_statistics():
    """Within this block statistics use this worker's samples only (for rank-0-only diagnostics, which
    would otherwise wait forever in a collective the other workers never enter)."""
    previous = getattr(_local_only, "active", False)
    _local_only.active = True
    try:
        yield
    finally:
        _local_only.active = previous


class _AllReduceSums(torch.autograd.Function):
    """Several tensors summed over workers in ONE collective: flattened, concatenated, reduced, split back. Its
    backward reduces the incoming gradients in one collective too."""

    @staticmethod
    def forward(ctx, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.shapes = [t.shape for t in tensors]
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        return _split(flat, ctx.shapes)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor, ...]:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        return _split(flat, ctx.shapes)


def _split(flat: torch.Tensor, shapes) -> tuple[torch.Tensor, ...]:
    sizes = [torch.Size(shape).numel() for shape in shapes]
    return tuple(part.reshape(shape) for part, shape in zip(flat.split(sizes), shapes, strict=True))


def all_reduce_sums(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The sums over all workers of `tensors` (one dtype), in one collective; the tensors themselves in a single
    process. Differentiable. The objectives call it once per dependency level of their statistics."""
    if not is_distributed():
        return tensors
    if len({t.dtype for t in tensors}) > 1:
        raise TypeError(f"all_reduce_sums needs one dtype, got {sorted(str(t.dtype) for t in tensors)}.")
    return _AllReduceSums.apply(*tensors)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over all workers (identity in a single process); differentiable."""
    return all_reduce_sums(tensor)[0]


def world_size() -> int:
    """Workers whose samples make the global batch (1 in a single process or inside `local_statistics`)."""
    return dist.get_world_size() if is_distributed() else 1


def global_count(n: int) -> int:
    """Samples in the global batch, given this worker's n: n x the world size, with no collective and no host sync.

    Every worker holds the same number of samples per step: the global batch divides evenly among the workers
    (Resources.check_batch) and the sampler drops the last incomplete batch (data/feeds.py).
    """
    return n * world_size()


def global_mean(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Mean over `dim` across the global batch: all-reduced sum / global count."""
    return all_reduce_sum(x.sum(dim)) / global_count(x.shape[dim])
