"""The study's report: only paired confirmation runs are compared, with intervals, gains and verdicts."""

import csv
import io
import math

import pytest

from hamjepa import names
from hamjepa.config import profile
from hamjepa.report.paired import estimate
from hamjepa.report.summary import (
    CSV_COLUMNS,
    RunRecord,
    summarize,
    to_csv,
    to_markdown,
)

BASE = profile("quick")
KEYS = ["predictor.dt"]


def _run(phase, method, seed, final, initial, status="finished", dt="0.05", k=20):
    """A run whose four compared metrics are all `final` (and `initial` at epoch 0)."""
    metrics = {}
    for _, metric in names.comparison_metrics(k):
        metrics[metric] = final
        metrics[names.init(metric)] = initial
    params = {"seed": str(seed), "eval.knn_k": str(k), "predictor.dt": dt, "method": method}
    return RunRecord(f"{phase}-{method}-{seed}", f"{phase}-{method}-{seed}", phase, method, status, "", params, metrics)


def _records():
    return [
        _run("search", "hamjepa", 0, 99.0, 70.0, dt="0.07"),  # selected on validation: must not be compared
        _run("search", "hamjepa", 0, 60.0, 70.0, dt="0.01"),
        _run("search", "hamjepa", 0, 50.0, 70.0, status="stopped"),
        _run("compare", "hamjepa", 1, 75.0, 70.0), _run("compare", "hamjepa", 2, 76.5, 71.0),
        _run("compare", "hamjepa", 3, 75.0, 69.0),
        _run("compare", "sigreg", 1, 73.0, 70.0), _run("compare", "sigreg", 2, 74.0, 71.0),
        _run("compare", "sigreg", 3, 73.5, 69.0),
        _run("compare", "sigreg", 4, 90.0, 70.0),  # no HamJEPA partner on seed 4: not paired, not compared
    ]


def test_only_paired_confirmation_runs_are_compared_and_the_selected_trial_is_shown_apart():
    summary = summarize(_records(), KEYS, BASE)
    assert summary.selected.params["predictor.dt"] == "0.07"
    row = summary.rows[0]
    assert row.metric == "val_knn20_top1" and row.seeds == [1, 2, 3]
    assert row.hamjepa.mean == pytest.approx(75.5) and row.sigreg.mean == pytest.approx(73.5)
    expected = estimate([75.0 - 73.0, 76.5 - 74.0, 75.0 - 73.5])  # paired seed by seed
    got = (row.delta.mean, row.delta.low, row.delta.high)
    assert got == pytest.approx((expected.mean, expected.low, expected.high))
    assert row.gains["HamJEPA"].mean == pytest.approx(5.5) and row.gains["SIGReg"].mean == pytest.approx(3.5)
    assert row.gains["HamJEPA"].above_zero and row.gains["SIGReg"].above_zero
    assert row.verdict == "HamJEPA ahead"
    text = to_markdown(summary)
    assert "99.00" in text and "Selected on validation" in text and "not in the comparison" in text
    assert "seeds 1, 2, 3 (n = 3)" in text and "Protocol: fashion_mnist" in text
    assert "1 stopped early" in text and "Verdict (test split): kNN@20: HamJEPA ahead" in text


def test_csv_has_one_row_per_metric_with_the_interval_columns():
    rows = list(csv.DictReader(io.StringIO(to_csv(summarize(_records(), KEYS, BASE)))))
    assert list(rows[0]) == CSV_COLUMNS
    assert [r["metric"] for r in rows] == [m for _, m in names.comparison_metrics(20)]
    assert rows[0]["n"] == "3" and float(rows[0]["delta_ci_low"]) < float(rows[0]["delta"]) < float(
        rows[0]["delta_ci_high"])


def test_parent_metrics_name_the_deltas_and_their_intervals():
    metrics = summarize(_records(), KEYS, BASE).parent_metrics()
    for name in ("delta_test_knn20_top1", "delta_test_knn20_top1_ci_low", "delta_test_knn20_top1_ci_high",
                 "gain_hamjepa_test_linprobe_top1_ci_low", "gain_sigreg_val_knn20_top1"):
        assert name in metrics and math.isfinite(metrics[name])


def test_runs_that_did_not_learn_are_not_ranked():
    records = [_run("compare", "hamjepa", s, 70.0 + s, 70.0 + s + (0.5 if s % 2 else -0.5)) for s in (1, 2, 3)]
    records += [_run("compare", "sigreg", s, 60.0, 59.0 + 0.1 * s) for s in (1, 2, 3)]
    row = summarize(records, KEYS, BASE).rows[2]
    assert row.delta.above_zero  # HamJEPA's numbers are higher...
    assert row.verdict.startswith("not ranked: HamJEPA did not learn measurably")  # ...but it did not learn


def test_one_seed_says_there_is_no_interval():
    records = [_run("compare", "hamjepa", 1, 75.0, 70.0), _run("compare", "sigreg", 1, 73.0, 70.0)]
    summary = summarize(records, KEYS, BASE)
    text = to_markdown(summary)
    assert "+2.00 (n=1, no interval)" in text and "n = 1: no interval, nothing resolved" in text
    assert "No HamJEPA trial completed all epochs" in text
    row = list(csv.DictReader(io.StringIO(to_csv(summary))))[0]
    assert row["delta"] == "2.0000" and row["delta_ci_low"] == "" and row["hamjepa_std"] == ""


def test_metric_names_follow_the_configured_k():
    base = profile("quick", {"eval.knn_k": 10})
    records = [_run("compare", "hamjepa", s, 75.0 + s, 70.0, k=10) for s in (1, 2)]
    records += [_run("compare", "sigreg", s, 73.0, 70.0, k=10) for s in (1, 2)]
    summary = summarize(records, KEYS, base)
    assert [row.metric for row in summary.rows] == ["val_knn10_top1", "val_linprobe_top1", "test_knn10_top1",
                                                    "test_linprobe_top1"]
    assert summary.rows[0].seeds == [1, 2] and "val kNN@10" in to_markdown(summary)
    assert names.objective(10) in names.final_accuracies("hamjepa", 10)
    assert all(r.complete for r in records)
