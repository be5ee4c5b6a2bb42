"""Seeds until resolved: the looks, the calibrated per-look level, the summary's reading and the study's loop."""

import pytest
from conftest import tiny_config
from test_report import KEYS, _run

from hamjepa.report import sequential
from hamjepa.report.summary import summarize, to_markdown
from hamjepa.study.settings import StudySettings


def test_the_looks_grow_3_6_10_then_by_five_and_end_at_the_maximum():
    assert sequential.looks(10) == (3, 6, 10)
    assert sequential.looks(6) == (3, 6) and sequential.looks(4) == (3, 4) and sequential.looks(3) == (3,)
    assert sequential.looks(22) == (3, 6, 10, 15, 20, 22)
    assert sequential.looks(2) == (2,)
    with pytest.raises(ValueError, match="at least 2"):
        sequential.looks(1)


@pytest.mark.parametrize("most", [6, 10, 20])
def test_the_per_look_level_keeps_the_simulated_false_positive_rate_at_five_percent(most):
    """20,000 fresh simulated studies with no true difference (another seed than the calibration's)."""
    schedule = sequential.looks(most)
    alpha = sequential.per_look_alpha(schedule)
    assert 0.05 / len(schedule) < alpha < 0.05  # stricter than one look, laxer than Bonferroni
    rate = sequential.false_positive_rate(schedule, alpha, studies=20_000, seed=12345)
    assert 0.04 <= rate <= 0.06
    naive = sequential.false_positive_rate(schedule, 0.05, studies=20_000, seed=12345)
    assert naive > 0.075  # looking three or more times at 5% each would not keep the promise


def test_a_single_look_is_the_fixed_design():
    assert sequential.per_look_alpha((5,)) == 0.05


def _records(differences):
    records = [_run("compare", "hamjepa", s, 75.0 + d, 70.0) for s, d in enumerate(differences, start=1)]
    return records + [_run("compare", "sigreg", s, 75.0, 70.0) for s in range(1, len(differences) + 1)]


def test_the_summary_judges_a_sequential_primary_at_the_per_look_level():
    schedule = sequential.looks(10)
    records = _records([1.0, 2.0, 1.5])  # t = 5.2: resolved at 95% (4.30), not at 98.1% (about 7)
    fixed = summarize(records, KEYS, tiny_config()).primary_row
    assert fixed.delta.above_zero
    summary = summarize(records, KEYS, tiny_config(), looks=schedule)
    primary = summary.primary_row
    assert primary.confidence == pytest.approx(1 - sequential.per_look_alpha(schedule))
    assert not primary.delta.above_zero and primary.verdict.startswith("not resolved at n = 3")
    text = to_markdown(summary)
    assert "Sequential design (--seeds auto:10): looks at 3, 6, 10 paired seeds" in text
    assert "at n = 3, not resolved yet" in text


class _Study:
    """An invocation whose compare runs are made up, seed by seed: HamJEPA ahead by `difference(seed)`."""

    def __init__(self, settings, difference):
        self.settings, self.difference, self.interrupted, self.study_id = settings, difference, False, "s"
        self.runs, self.looks = [], []

    def run_cells(self, phase, cells, tune_name=""):
        self.looks.append(tune_name)
        for cell in cells:
            method, seed = cell["arm"]["method"], cell["seed"]
            if not any(r.method == method and r.seed == seed for r in self.runs):
                final = 75.0 + (self.difference(seed) if method == "hamjepa" else 0.0)
                self.runs.append(_run("compare", method, seed, final, 70.0))

    def records(self):
        return list(self.runs)


@pytest.mark.parametrize("difference, looks_run", [
    (lambda seed: 3.0 + 0.1 * seed, ["compare-look3"]),  # clear at the first look: stop
    (lambda seed: (-1) ** seed * 1.0, ["compare-look3", "compare-look6", "compare-look10"]),  # never: run them all
])
def test_the_study_adds_seeds_look_by_look_until_the_primary_is_resolved(difference, looks_run):
    from hamjepa.study.runner import _compare

    settings = StudySettings(name="s", base=tiny_config(), seeds=10, sequential=True)
    study = _Study(settings, difference)
    _compare(study, KEYS, {"predictor.dt": 0.05}, None)
    assert study.looks == looks_run
    seeds = sorted({r.seed for r in study.runs})
    assert seeds == list(range(1, int(looks_run[-1].removeprefix("compare-look")) + 1))


def test_a_fixed_design_runs_its_seeds_in_one_experiment():
    from hamjepa.study.runner import _compare

    study = _Study(StudySettings(name="s", base=tiny_config(), seeds=3), lambda seed: 0.0)
    _compare(study, KEYS, {"predictor.dt": 0.05}, None)
    assert study.looks == ["compare"] and len(study.runs) == 6


def test_seeds_auto_on_the_command_line():
    import argparse

    from hamjepa.cli import _seeds

    assert _seeds("3") == (3, False) and _seeds("auto") == (10, True) and _seeds("auto:6") == (6, True)
    for bad in ("auto:x", "three", "auto6"):
        with pytest.raises(argparse.ArgumentTypeError, match="--seeds"):
            _seeds(bad)
    with pytest.raises(ValueError, match="sequential study needs"):
        StudySettings(name="s", base=tiny_config(), seeds=1, sequential=True)
