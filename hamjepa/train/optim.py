"""AdamW with a per-iteration linear warm-up then cosine decay (docs/method.md §5)."""

from __future__ import annotations

import math

import torch
from torch import nn

from hamjepa.config import OptimConfig


def lr_multiplier(iteration: int, iters_per_epoch: int, cfg: OptimConfig) -> float:
    """Factor on cfg.lr at a 0-based iteration.

    Warm-up: linear from warmup_start_ratio to 1 over warmup_epochs epochs; then cosine from 1 down to
    final_lr_ratio at the last iteration of the run.
    """
    warmup = cfg.warmup_epochs * iters_per_epoch
    total = cfg.epochs * iters_per_epoch
    if iteration < warmup:
        return cfg.warmup_start_ratio + (1.0 - cfg.warmup_start_ratio) * iteration / warmup
    progress = min(1.0, (iteration - warmup) / max(1, total - warmup - 1))
    return cfg.final_lr_ratio + (1.0 - cfg.final_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, iters_per_epoch: int,
                    cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per iteration (its state_dict is what a checkpoint needs)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_multiplier(it, iters_per_epoch, cfg))
