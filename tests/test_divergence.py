"""When a run counts as diverged, and what it reports instead of NaN (no Ray): the rule on the host and on the
device, and when the loop reads it."""

import math

import pytest
import torch

from hamjepa.config import SMOKE_OVERRIDES, profile
from hamjepa.train.divergence import (
    MAX_LOSS,
    MAX_STATE_ENERGY,
    check_interval,
    diverged_on_device,
    divergence_reason,
    reason_of,
    watched_values,
    worst_case,
)
from hamjepa.train.loop import build_worker, train_one_epoch


@pytest.mark.parametrize("loss, stats, says", [
    (math.nan, {}, "non-finite loss (nan)"),
    (math.inf, {}, "non-finite loss (inf)"),
    (-math.inf, {"q_energy": 1.0}, "non-finite loss (-inf)"),
    (2e6, {}, "loss exploded (2e+06 > 1e+06)"),
    (1.0, {"q_energy": 3e6}, "state exploded (q_energy = 3e+06 > 1e+06)"),
    (1.0, {"q_energy": 1.0, "p_energy": math.nan}, "state exploded (p_energy = nan > 1e+06)"),
])
def test_a_diverged_step_names_what_went_wrong(loss, stats, says):
    assert divergence_reason(loss, stats) == says


@pytest.mark.parametrize("loss, stats", [
    (0.0, {}),
    (MAX_LOSS, {"q_energy": MAX_STATE_ENERGY, "p_energy": MAX_STATE_ENERGY}),  # the limits themselves are healthy
    (-5.0, {"q_energy": 0.0}),  # the loss check is one-sided: only an explosion upwards is divergence
    (3.0, {"loss_pred": math.nan}),  # only the loss and the state energies decide
])
def test_a_healthy_step_is_not_diverged(loss, stats):
    assert divergence_reason(loss, stats) is None


def test_a_diverged_run_reports_the_worst_finite_accuracy():
    assert worst_case(["val_knn20_top1", "test_linprobe_top1_q"]) == {"val_knn20_top1": 0.0,
                                                                      "test_linprobe_top1_q": 0.0}


CASES = [(math.nan, {}), (math.inf, {}), (-math.inf, {"q_energy": 1.0}), (2e6, {}), (1.0, {"q_energy": 3e6}),
         (1.0, {"q_energy": 1.0, "p_energy": math.nan}), (0.0, {}), (MAX_LOSS, {"q_energy": MAX_STATE_ENERGY}),
         (-5.0, {"q_energy": 0.0}), (3.0, {"p_energy": -1.0})]


@pytest.mark.parametrize("loss, stats", CASES)
def test_the_device_rule_is_the_host_rule(loss, stats):
    """The on-device flag (no host sync in the step) decides exactly as divergence_reason, and the reason read
    back from the recorded values is the same sentence."""
    values = watched_values(torch.tensor(loss), {k: torch.tensor(v) for k, v in stats.items()})
    host = divergence_reason(loss, stats)
    assert bool(diverged_on_device(values)) is (host is not None)
    assert reason_of(values) == host


def test_the_flag_is_read_every_percent_of_the_run_unless_told():
    assert check_interval(0, 280) == 2 and check_interval(0, 2910) == 29 and check_interval(0, 50) == 1
    assert check_interval(7, 280) == 7


def _diverging(every, monkeypatch):
    """(reason, steps taken) of one epoch made to diverge at its second step (lr 5, no warm-up, no clip)."""
    import hamjepa.train.loop as loop

    flags = []
    rule = loop.diverged_on_device
    monkeypatch.setattr(loop, "diverged_on_device", lambda values: flags.append(rule(values)) or flags[-1])
    cfg = profile("quick", {**SMOKE_OVERRIDES, "data.dataset": "synthetic", "data.subset": 256, "data.val_size": 0,
                            "optim.batch_size": 32, "predictor.dt": 5.0, "optim.lr": 5.0, "optim.warmup_epochs": 0,
                            "optim.grad_clip": 0.0, "compute.divergence_check_every": every})
    worker = build_worker(cfg, 0, 1, "cpu")
    reason = train_one_epoch(worker, worker.model, 1).reason
    return reason, len(flags), [bool(f) for f in flags].index(True)


def test_a_diverging_run_is_stopped_with_the_same_reason_whenever_the_flag_is_read(monkeypatch):
    """Read after every step, every 3, or only at the epoch's end (8 steps): the same run diverges in the same
    epoch at the same step (its second), with the same reason (the first bad step's values, not a later NaN's),
    and stops at the first read after it."""
    reason, steps, first_bad = _diverging(1, monkeypatch)
    assert reason.startswith("loss exploded") and (steps, first_bad) == (2, 1)
    assert _diverging(3, monkeypatch) == (reason, 3, 1)
    assert _diverging(1000, monkeypatch) == (reason, 8, 1)
