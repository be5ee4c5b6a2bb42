"""When a run counts as diverged, and what it reports instead of NaN (no Ray: the decision alone)."""

import math

import pytest

from hamjepa.train.divergence import MAX_LOSS, MAX_STATE_ENERGY, divergence_reason, worst_case


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
