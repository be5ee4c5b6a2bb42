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
    THEORY_PLOT,
    RunRecord,
    knn_probe_points,
    summarize,
    theory_plots,
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


# -- the theory check ----------------------------------------------------------------------------------------

def _theory_run(method, seed, rho, gap, iso=5000.0, probe=80.0, knn=75.0):
    """A complete paired run carrying the theory metrics (the same on every readout) and per-readout accuracies."""
    run = _run("compare", method, seed, 75.0, 70.0)
    for readout in names.readouts(method):
        run.metrics.update({names.theory("rho_probe", readout): rho, names.theory("entropy_gap", readout): gap,
                            names.theory("entropy_gap_iso", readout): iso,
                            names.accuracy("test", "linprobe_top1", readout): probe,
                            names.accuracy("test", names.knn(20), readout): knn})
    return run


def _theory_records(sigreg_gaps, hamjepa_gaps=(1000.0, 1100.0, 1050.0), rho=40.0):
    return ([_theory_run("hamjepa", s, rho, gap) for s, gap in zip((1, 2, 3), hamjepa_gaps, strict=True)]
            + [_theory_run("sigreg", s, rho + 10.0, gap) for s, gap in zip((1, 2, 3), sigreg_gaps, strict=True)])


def test_theory_table_pairs_the_runs_by_seed_and_says_the_prediction_held():
    records = _theory_records(sigreg_gaps=(1200.0, 1400.0, 1250.0))
    records.append(_theory_run("sigreg", 4, 40.0, 10.0))  # no HamJEPA partner on seed 4: not paired
    summary = summarize(records, KEYS, BASE)
    rows = {row.metric: row for row in summary.theory}
    assert set(rows) == {names.theory(kind, r) for kind in names.THEORY for r in ("qp", "q")}
    gap = rows["entropy_gap_qp"]
    assert gap.seeds == [1, 2, 3] and gap.sigreg.mean == pytest.approx(1283.333333)
    expected = estimate([1000.0 - 1200.0, 1100.0 - 1400.0, 1050.0 - 1250.0])
    got = (gap.delta.mean, gap.delta.low, gap.delta.high)
    assert got == pytest.approx((expected.mean, expected.low, expected.high))
    assert rows["rho_probe_q"].delta.mean == pytest.approx(-10.0)
    text = to_markdown(summary)
    assert "| quantity | readout | HamJEPA | SIGReg | HamJEPA - SIGReg |" in text
    assert "| entropy gap to (c/D) H^-1 (nats) | qp | 1050.00 +/- 50.00 | 1283.33 +/- 104.08 | -233.33 [" in text
    assert "Theory check (qp readout): the paper's prediction" in text
    assert "where rho is large) held: HamJEPA - SIGReg entropy gap -233.33 [" in text
    metrics = summary.parent_metrics()
    assert metrics["delta_entropy_gap_qp"] == pytest.approx(expected.mean)
    assert metrics["delta_rho_probe_q_ci_low"] == pytest.approx(-10.0)  # zero spread: the interval is a point


@pytest.mark.parametrize("sigreg_gaps, hamjepa_gaps, rho, says", [
    ((900.0, 1000.0, 950.0), (1000.0, 1100.0, 1050.0), 40.0, "did not hold: SIGReg's covariance is the closer one"),
    ((1100.0, 1000.0, 1050.0), (1000.0, 1100.0, 1050.0), 40.0, "is not resolved at n = 3"),
    ((1200.0, 1400.0, 1250.0), (1000.0, 1100.0, 1050.0), 1.5, "is not tested: with rho 1.5 (HamJEPA)"),
])
def test_theory_sentence_reads_the_paired_interval(sigreg_gaps, hamjepa_gaps, rho, says):
    text = to_markdown(summarize(_theory_records(sigreg_gaps, hamjepa_gaps, rho), KEYS, BASE))
    assert says in text


def test_theory_check_without_an_interval_or_without_metrics_is_not_resolved():
    one = [_theory_run("hamjepa", 1, 40.0, 1000.0), _theory_run("sigreg", 1, 40.0, 1200.0)]
    assert "is not resolved: n = 1, no interval." in to_markdown(summarize(one, KEYS, BASE))
    text = to_markdown(summarize(_records(), KEYS, BASE))  # runs logged before the theory metrics existed
    assert "no paired runs carry the theory metrics" in text and "| quantity | readout |" not in text
    assert not any(key.startswith("delta_rho") for key in summarize(_records(), KEYS, BASE).parent_metrics())


def test_theory_plot_shows_the_probe_minus_knn_difference_of_every_complete_run_against_rho(tmp_path):
    records = [_theory_run("hamjepa", 1, 40.0, 1000.0, probe=82.0, knn=75.0),
               _theory_run("sigreg", 1, 300.0, 1200.0, probe=70.0, knn=72.5),
               _theory_run("sigreg", 2, 300.0, 1200.0)]
    records[2].status = "diverged"  # not complete: not drawn
    points = knn_probe_points(records, BASE)
    assert sorted(points) == sorted([("hamjepa", r, 40.0, 7.0) for r in ("q", "p", "qp")]
                                    + [("sigreg", r, 300.0, -2.5) for r in ("qp", "q", "p")])
    paths = theory_plots(records, BASE, tmp_path)
    assert paths == [str(tmp_path / THEORY_PLOT)]
    with open(paths[0], "rb") as image:
        assert image.read(8) == b"\x89PNG\r\n\x1a\n"
    assert theory_plots(_records(), BASE, tmp_path / "none") == []  # no run carries rho: nothing drawn
