"""What a study says about the theory: the paired verdict that can fail, the gap-accuracy correlation, the plot."""

import math

import pytest
from test_report import BASE, KEYS, _records, _run

from hamjepa import names
from hamjepa.report import theory
from hamjepa.report.paired import estimate
from hamjepa.report.summary import summarize, to_markdown

GAP = names.theory("gap_within", "qp")
PROBE = names.accuracy("test", "linprobe_top1", "qp")


def _theory_run(method, seed, gap, probe=80.0, phase="compare", rho=2.0):
    """A complete run carrying the theory metrics on every readout and the test linear probe of qp."""
    run = _run(phase, method, seed, 75.0, 70.0)
    for readout in names.readouts(method):
        run.metrics.update({names.theory("rho", readout): rho, names.theory("gap_within", readout): gap,
                            names.theory("gap_total", readout): gap + 5.0,
                            names.theory("signal_fraction", readout): 0.3})
    run.metrics[PROBE] = probe
    return run


def _paired(sigreg_gaps, hamjepa_gaps=(10.0, 11.0, 10.5)):
    return ([_theory_run("hamjepa", s, gap) for s, gap in zip((1, 2, 3), hamjepa_gaps, strict=True)]
            + [_theory_run("sigreg", s, gap) for s, gap in zip((1, 2, 3), sigreg_gaps, strict=True)])


def test_the_paired_table_pairs_by_seed_on_the_whole_state_and_says_held():
    records = _paired(sigreg_gaps=(12.0, 14.0, 12.5))
    records.append(_theory_run("sigreg", 4, 1.0))  # no HamJEPA partner on seed 4: not paired
    summary = summarize(records, KEYS, BASE)
    rows = {row.metric: row for row in summary.theory}
    assert set(rows) == {names.theory(kind, "qp") for kind in names.THEORY}
    gap = rows[GAP]
    expected = estimate([10.0 - 12.0, 11.0 - 14.0, 10.5 - 12.5])
    assert gap.seeds == [1, 2, 3]
    assert (gap.delta.mean, gap.delta.low, gap.delta.high) == pytest.approx(
        (expected.mean, expected.low, expected.high))
    text = to_markdown(summary)
    assert "| within-class entropy gap (nats), primary | qp | 10.5 +/- 0.5 | 12.83 +/- 1.04 | -2.33 [" in text
    assert "undefined (n = 7: one of the two does not vary" in text  # every probe at 80%: no ranks to correlate
    assert "Theory check (qp readout): the paper's prediction" in text and ") held: HamJEPA - SIGReg -2.33 [" in text
    assert summary.parent_metrics()[f"delta_{GAP}"] == pytest.approx(expected.mean)


@pytest.mark.parametrize("sigreg_gaps, says", [
    ((8.0, 9.0, 8.5), "is contradicted: HamJEPA - SIGReg +2.00"),  # SIGReg's gap smaller on every seed
    ((11.0, 10.0, 10.5), "is not resolved at n = 3"),
])
def test_the_verdict_can_say_contradicted_or_not_resolved(sigreg_gaps, says):
    assert says in to_markdown(summarize(_paired(sigreg_gaps), KEYS, BASE))


def test_no_rho_size_condition_gates_the_verdict():
    """The old check said "not tested" when rho was small; the range check has no such escape."""
    records = [_theory_run("hamjepa", s, 10.0 + s, rho=1.01) for s in (1, 2, 3)]
    records += [_theory_run("sigreg", s, 20.0 + s, rho=1.01) for s in (1, 2, 3)]
    assert ") held: HamJEPA - SIGReg -10.00" in to_markdown(summarize(records, KEYS, BASE))


def test_without_an_interval_or_metrics_nothing_is_claimed():
    one = [_theory_run("hamjepa", 1, 10.0), _theory_run("sigreg", 1, 12.0)]
    assert "is not resolved: n = 1, no interval." in to_markdown(summarize(one, KEYS, BASE))
    text = to_markdown(summarize(_records(), KEYS, BASE))  # runs without the theory metrics
    assert "no paired runs carry the theory metrics" in text and "| quantity | readout |" not in text
    assert "Spearman's correlation" in text and "not measured (n = 0" in text


def test_spearman_against_scipy_and_ties():
    from scipy.stats import spearmanr

    x, y = [3.0, 1.0, 2.0, 5.0, 4.0, 4.0], [10.0, 30.0, 20.0, 1.0, 2.0, 3.0]
    assert theory.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert math.isnan(theory.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))  # a constant side has no ranks


def test_the_correlation_interval_brackets_a_strong_negative_relation_and_is_reproducible():
    gaps = [float(i) for i in range(12)]
    probes = [90.0 - 2.0 * g + (0.5 if i % 2 else -0.5) for i, g in enumerate(gaps)]
    value = theory.correlation(gaps, probes)
    assert value.n == 12 and value.rho < -0.9 and value.low <= value.rho <= value.high < 0
    assert theory.correlation(gaps, probes) == value  # seeded bootstrap: a rebuilt report prints the same
    assert math.isnan(theory.correlation(gaps[:3], probes[:3]).rho)  # too few runs


def test_the_correlation_runs_over_every_finished_run_of_both_phases_and_reaches_the_parent():
    records = _paired(sigreg_gaps=(12.0, 14.0, 12.5))
    records += [_theory_run("hamjepa", 0, 5.0 + i, probe=85.0 - i, phase="search") for i in range(4)]
    stopped = _theory_run("hamjepa", 0, 100.0, probe=0.0, phase="search")
    stopped.status = "stopped"  # not finished: left out
    records.append(stopped)
    points = theory.gap_accuracy_points(records)
    assert len(points) == 10 and {p[1] for p in points} == {"search", "compare"}
    summary = summarize(records, KEYS, BASE)
    assert summary.correlation.n == 10
    metrics = summary.parent_metrics()
    assert metrics["theory_spearman_n"] == 10 and metrics["theory_spearman"] == pytest.approx(summary.correlation.rho)
    assert "across every finished run: " in to_markdown(summary) and "over n = 10 runs" in to_markdown(summary)


def test_the_plot_draws_gap_against_accuracy_and_nothing_without_metrics(tmp_path):
    records = _paired(sigreg_gaps=(12.0, 14.0, 12.5))
    paths = theory.plots(records, tmp_path)
    assert paths == [str(tmp_path / theory.PLOT)]
    with open(paths[0], "rb") as image:
        assert image.read(8) == b"\x89PNG\r\n\x1a\n"
    assert theory.plots(_records(), tmp_path / "none") == []
