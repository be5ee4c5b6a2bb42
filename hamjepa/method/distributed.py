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


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over all workers (identity in a single process); differentiable."""
    if not is_distributed():
        return tensor
    return _AllReduceSum.apply(tensor)


def global_count(n: int, device: torch.device) -> int:
    """Number of samples in the global batch, given this worker's n."""
    if not is_distributed():
        return n
    count = torch.tensor([float(n)], device=device, dtype=torch.float64)
    dist.all_reduce(count)
    return int(count.item())


def global_mean(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Mean over `dim` across the global batch: all-reduced sum / all-reduced count."""
    return all_reduce_sum(x.sum(dim)) / global_count(x.shape[dim], x.device)
