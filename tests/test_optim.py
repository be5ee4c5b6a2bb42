"""The learning-rate schedule: linear warm-up per iteration, then cosine to final_lr_ratio."""

import pytest
import torch

from hamjepa.config import OptimConfig
from hamjepa.train.optim import build_optimizer, build_scheduler, lr_multiplier


def test_schedule_values():
    cfg = OptimConfig(epochs=10, warmup_epochs=2, warmup_start_ratio=0.01, final_lr_ratio=1e-3)
    iters = 5
    assert lr_multiplier(0, iters, cfg) == pytest.approx(0.01)
    assert lr_multiplier(5, iters, cfg) == pytest.approx(0.01 + 0.99 * 0.5)  # half-way through warm-up
    assert lr_multiplier(10, iters, cfg) == pytest.approx(1.0)  # peak right after warm-up
    assert lr_multiplier(49, iters, cfg) == pytest.approx(1e-3)  # the last iteration
    values = [lr_multiplier(i, iters, cfg) for i in range(10, 50)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # cosine decreases monotonically


def test_scheduler_steps_per_iteration():
    cfg = OptimConfig(lr=1e-3, epochs=2, warmup_epochs=1)
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, iters_per_epoch=4, cfg=cfg)
    lrs = []
    for _ in range(8):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-5) and lrs[4] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-6)
    assert optimizer.param_groups[0]["weight_decay"] == cfg.weight_decay
