"""The study's report: only paired confirmation runs are compared, with intervals, gains and verdicts."""

import csv
import io
import math

import pytest

from hamjepa import names
from hamjepa.config import profile
from hamjepa.report.paired import estimate, welch_difference
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
    assert row.role == "selection split" and row.verdict == ""  # the split the search chose on: no verdict
    primary = summary.primary_row
    assert primary.metric == "test_knn20_top1" and primary.verdict.startswith("HamJEPA ahead on test kNN@20 by +")
    assert [r.role for r in summary.rows] == ["selection split", "selection split", "primary", "secondary"]
    text = to_markdown(summary)
    assert "99.00" in text and "HamJEPA selected on validation" in text and "not in the comparison" in text
    assert "seeds 1, 2, 3 (n = 3)" in text and "Protocol: fashion_mnist" in text
    assert "1 stopped early" in text
    assert "Verdict (primary, declared before the study: test kNN@20): HamJEPA ahead on test kNN@20 by +" in text
    assert text.count("HamJEPA ahead") == 2  # the verdict word: once in the table's primary row, once in the line


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
    assert row.delta.above_zero and row.role == "primary"  # HamJEPA's numbers are higher...
    assert row.verdict.startswith("HamJEPA ahead on test kNN@20 by +")  # ...ranked on the primary regardless,
    assert row.verdict.endswith("HamJEPA's gain over initialisation not resolved")  # and qualified


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


# -- the decision rule -------------------------------------------------------------------------------------

def test_secondaries_get_holm_adjusted_p_values_and_no_verdict_word():
    from hamjepa.report.paired import holm, p_value

    summary = summarize(_records(), KEYS, BASE)
    secondary = [row for row in summary.rows if row.role == "secondary"]
    assert [row.metric for row in secondary] == ["test_linprobe_top1"] and secondary[0].verdict == ""
    assert secondary[0].p_holm == pytest.approx(holm([p_value(secondary[0].delta)])[0])
    declared = summarize(_records(), KEYS, BASE, primary="test_linprobe_top1")  # another primary, declared
    assert declared.primary_row.metric == "test_linprobe_top1"
    assert [row.metric for row in declared.rows if row.role == "secondary"] == ["test_knn20_top1"]
    rows = list(csv.DictReader(io.StringIO(to_csv(declared))))
    assert [r["role"] for r in rows] == ["selection split", "selection split", "secondary", "primary"]
    assert rows[2]["p_holm"] != "" and rows[3]["verdict"].startswith("HamJEPA ahead")


def test_an_unresolved_primary_states_what_the_design_detects_and_the_seeds_it_would_take():
    from hamjepa.report.paired import min_detectable_difference, seeds_to_resolve

    records = [_run("compare", "hamjepa", s, 75.0 + d, 70.0) for s, d in ((1, 1.0), (2, -0.5), (3, 0.8))]
    records += [_run("compare", "sigreg", s, 75.0, 70.0) for s in (1, 2, 3)]
    summary = summarize(records, KEYS, BASE)
    primary = summary.primary_row
    detectable = min_detectable_difference(primary.delta.std, 3)
    assert primary.verdict.startswith("not resolved at n = 3 on test kNN@20")
    assert f"this design detects differences >= {detectable:.2f} points" in primary.verdict
    text = to_markdown(summary)
    needed = seeds_to_resolve(primary.delta.mean, primary.delta.std)
    assert f"at 80% power would take about {needed} paired seeds" in text
    assert summary.parent_metrics()["detectable_test_knn20_top1"] == pytest.approx(detectable)


def test_diverged_runs_are_counted_said_first_and_their_seeds_left_out_of_the_pairs():
    records = [_run("compare", "hamjepa", s, 75.0 + s, 70.0) for s in (1, 2)]
    records += [_run("compare", "sigreg", s, 73.0, 70.0) for s in (1, 2, 3)]
    diverged = _run("compare", "hamjepa", 3, 0.0, 70.0, status="diverged")
    diverged.reason = "epoch 2: non-finite loss"
    records.append(diverged)
    summary = summarize(records, KEYS, BASE, tuned="Tuning: stated first.")
    assert summary.primary_row.seeds == [1, 2]
    text = to_markdown(summary)
    lines = text.splitlines()
    assert lines[0] == "Tuning: stated first." and lines[1].startswith("Not compared, did not finish: ")
    assert "(diverged: epoch 2: non-finite loss)" in lines[1]
    assert "on 2 of 3 seeds (HamJEPA 2 finished, 1 diverged, 0 failed; SIGReg 3 finished, 0 diverged, 0 failed)" in text


def test_a_nan_metric_unpairs_its_seed_instead_of_reaching_the_statistics():
    records = [_run("compare", "hamjepa", s, 75.0 + s, 70.0) for s in (1, 2, 3)]
    records += [_run("compare", "sigreg", s, 73.0, 70.0) for s in (1, 2, 3)]
    records[0].metrics["test_knn20_top1"] = math.nan
    primary = summarize(records, KEYS, BASE).primary_row
    assert primary.seeds == [2, 3] and math.isfinite(primary.delta.mean) and primary.delta.dropped == 0


def _reference(values, methods=("hamjepa", "sigreg")):
    return {method: {metric: list(values) for _, metric in names.comparison_metrics(20)} for method in methods}


def test_gains_are_measured_against_the_initialisation_reference_by_welch_when_there_is_one():
    """With a reference, a gain is the final mean minus the reference mean with a 90% Welch interval (its lower
    end: the one-sided 5% test), not final minus the same run's epoch 0; the legend says which."""
    reference = [72.0, 74.0, 73.0, 75.0, 71.0, 73.5, 72.5, 74.5, 73.0, 72.0]
    summary = summarize(_records(), KEYS, BASE, reference=_reference(reference))
    primary = summary.primary_row
    finals = [75.0, 76.5, 75.0]
    expected = welch_difference(finals, reference, 0.90)
    gain = primary.gains["HamJEPA"]
    assert (gain.mean, gain.low, gain.high) == pytest.approx((expected.mean, expected.low, expected.high))
    assert gain.mean == pytest.approx(sum(finals) / 3 - sum(reference) / 10) and gain.above_zero
    assert not primary.gains["SIGReg"].above_zero  # 73.5 against 73.05: not resolved above the reference
    assert primary.verdict.endswith("SIGReg's gain over initialisation not resolved")
    text = to_markdown(summary)
    assert "the mean of 10 encoders at initialisation" in text and "90% Welch interval" in text
    plain = to_markdown(summarize(_records(), KEYS, BASE))
    assert "no initialisation reference" in plain and "Welch" not in plain


def test_a_reference_that_lacks_a_method_or_a_metric_falls_back_to_the_runs_own_initialisation():
    summary = summarize(_records(), KEYS, BASE, reference=_reference([60.0, 61.0], methods=("hamjepa",)))
    row = summary.primary_row
    assert row.gains["HamJEPA"].mean == pytest.approx(75.5 - 60.5)  # against the reference
    assert row.gains["SIGReg"].mean == pytest.approx(3.5)  # against its runs' own epoch 0 (73.5 - 70.0)
