"""Paired statistics: t-intervals against hand-computed, textbook and scipy values, n = 1, identical pairs, verdicts."""

import math
import random

import pytest
from scipy import stats

from hamjepa.report.paired import (
    estimate,
    holm,
    min_detectable_difference,
    p_value,
    paired_differences,
    primary_verdict,
    seeds_to_resolve,
    welch_difference,
)

T_975_DOF2 = 4.302652729911275  # Student t quantile, 97.5%, 2 degrees of freedom (tables)
T_975_DOF1 = 12.706204736174703


def test_t_interval_matches_hand_computation():
    value = estimate([1.0, 2.0, 3.0])  # mean 2, sample std 1
    half = T_975_DOF2 * 1.0 / math.sqrt(3)
    assert (value.n, value.mean, value.std) == (3, 2.0, 1.0)
    assert value.low == pytest.approx(2.0 - half, abs=1e-9) and value.high == pytest.approx(2.0 + half, abs=1e-9)
    assert value.low == pytest.approx(-0.48414, abs=1e-5)  # not resolved above zero
    assert not value.above_zero and not value.below_zero
    assert value.text(signed=True) == "+2.00 [-0.48, +4.48]"


def test_two_pairs_use_one_degree_of_freedom():
    value = estimate(paired_differences([71.0, 69.0], [68.0, 68.5]))  # differences 3.0 and 0.5
    assert value.mean == pytest.approx(1.75)
    sd = math.sqrt(((3.0 - 1.75) ** 2 + (0.5 - 1.75) ** 2) / 1)
    assert value.high - value.mean == pytest.approx(T_975_DOF1 * sd / math.sqrt(2))


# Student's sleep data (Cushny and Peebles 1905; R's `sleep`): extra hours of sleep of 10 patients on two drugs.
SLEEP_DRUG_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_DRUG_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def test_paired_interval_reproduces_the_textbook_sleep_data_result():
    """R: t.test(extra ~ group, data = sleep, paired = TRUE): mean difference -1.58, t = -4.0621, df = 9,
    95 percent confidence interval -2.4598858 -0.7001142."""
    value = estimate(paired_differences(SLEEP_DRUG_2, SLEEP_DRUG_1))
    assert value.n == 10 and value.mean == pytest.approx(1.58, abs=1e-12)
    assert value.std == pytest.approx(1.2299955, abs=1e-7)
    assert (value.low, value.high) == pytest.approx((0.7001142, 2.4598858), abs=1e-7)
    assert value.mean / (value.std / math.sqrt(value.n)) == pytest.approx(4.0621, abs=1e-4)
    assert value.above_zero and value.text(signed=True) == "+1.58 [+0.70, +2.46]"
    reverse = estimate(paired_differences(SLEEP_DRUG_1, SLEEP_DRUG_2))
    assert (reverse.low, reverse.high) == pytest.approx((-2.4598858, -0.7001142), abs=1e-7)
    assert reverse.below_zero and not reverse.above_zero


@pytest.mark.parametrize("confidence", [0.8, 0.95, 0.99])
@pytest.mark.parametrize("values", [[0.3, -1.2, 2.5, 0.9], [10.0, 10.5], [-3.0, -2.9, -3.4, -2.2, -3.1, -2.8]])
def test_intervals_agree_with_scipys_one_sample_t_test(values, confidence):
    value = estimate(values, confidence=confidence)
    interval = stats.ttest_1samp(values, 0.0).confidence_interval(confidence_level=confidence)
    assert (value.low, value.high) == pytest.approx((interval.low, interval.high), rel=1e-10, abs=1e-12)
    assert value.std / math.sqrt(len(values)) == pytest.approx(stats.sem(values), rel=1e-12)


def test_one_value_has_no_interval():
    value = estimate([4.2])
    assert value.n == 1 and value.mean == 4.2 and math.isnan(value.std) and not value.has_interval
    assert value.text() == "4.20 (n=1, no interval)"
    assert not value.above_zero
    assert estimate([]).text() == "-"


def test_identical_pairs_give_a_zero_width_interval():
    same = estimate(paired_differences([70.0, 71.0, 72.0], [70.0, 71.0, 72.0]))
    assert (same.mean, same.std, same.low, same.high) == (0.0, 0.0, 0.0, 0.0)
    assert primary_verdict(same, "test kNN@20", "HamJEPA", "SIGReg").startswith("not resolved at n = 3")
    assert p_value(same) == 1.0 and min_detectable_difference(same.std, same.n) == 0.0
    shifted = estimate(paired_differences([71.0, 72.0], [70.0, 71.0]))  # +1 on every seed
    assert shifted.low == shifted.high == 1.0 and shifted.above_zero
    assert p_value(shifted) == 0.0  # every pair agrees: nothing could be more certain
    assert primary_verdict(shifted, "test kNN@20", "HamJEPA", "SIGReg") == (
        "HamJEPA ahead on test kNN@20 by +1.00 [+1.00, +1.00]")


def test_unequal_pairs_are_refused():
    with pytest.raises(ValueError, match="equal lengths"):
        paired_differences([1.0], [1.0, 2.0])


def test_the_primary_verdict_names_the_winner_and_its_margin_or_the_detectable_difference():
    ahead = estimate([1.0, 1.2, 0.9])
    assert primary_verdict(ahead, "test kNN@20", "HamJEPA", "SIGReg") == (
        f"HamJEPA ahead on test kNN@20 by {ahead.text(signed=True)}")
    behind = estimate([-1.0, -1.2, -0.9])
    assert primary_verdict(behind, "test kNN@20", "HamJEPA", "SIGReg") == (
        f"SIGReg ahead on test kNN@20 by {-behind.mean:+.2f} [{-behind.high:+.2f}, {-behind.low:+.2f}]")
    mixed = estimate([1.0, -1.2, 0.9])
    detectable = min_detectable_difference(mixed.std, 3)
    assert primary_verdict(mixed, "test kNN@20", "HamJEPA", "SIGReg") == (
        f"not resolved at n = 3 on test kNN@20 (HamJEPA - SIGReg {mixed.text(signed=True)}): this design detects "
        f"differences >= {detectable:.2f} points")
    assert primary_verdict(estimate([1.0]), "x", "A", "B") == "n = 1: no interval, nothing resolved"
    assert primary_verdict(estimate([]), "x", "A", "B") == "no paired runs"
    two = estimate([1.0, 3.0])  # n = 2: an interval, wide (t = 12.7)
    assert two.has_interval and primary_verdict(two, "x", "A", "B").startswith("not resolved at n = 2")


def test_the_minimum_detectable_difference_against_its_closed_form_and_noncentral_t_power():
    from scipy import stats

    for sd, n in ((1.0, 3), (2.5, 6), (0.7, 20)):
        closed = (stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * sd / math.sqrt(n)
        assert min_detectable_difference(sd, n) == pytest.approx(closed, rel=1e-12)
        # what it promises: a paired t-test at 5% detects a true difference of that size with power ~0.8
        noncentrality = closed / (sd / math.sqrt(n))
        critical = stats.t.ppf(0.975, n - 1)
        power = stats.nct.sf(critical, n - 1, noncentrality) + stats.nct.cdf(-critical, n - 1, noncentrality)
        assert 0.75 < power < 0.85
    assert math.isnan(min_detectable_difference(1.0, 1))


def test_seeds_to_resolve_is_the_fewest_whose_detectable_difference_reaches_the_observed_one():
    n = seeds_to_resolve(0.7, 1.0)
    assert min_detectable_difference(1.0, n) <= 0.7 < min_detectable_difference(1.0, n - 1)
    assert seeds_to_resolve(5.0, 1.0) == 3 and seeds_to_resolve(20.0, 1.0) == 2 and seeds_to_resolve(0.0, 1.0) == 1001
    assert seeds_to_resolve(-0.7, 1.0) == n  # the sign does not matter


def test_p_values_match_scipy_and_holm_steps_down_monotonically():
    from scipy import stats

    values = [0.4, 1.1, -0.2, 0.9]
    assert p_value(estimate(values)) == pytest.approx(stats.ttest_1samp(values, 0.0).pvalue, rel=1e-10)
    assert math.isnan(p_value(estimate([1.0])))
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])  # 3 x 0.01; 2 x 0.03; max(0.06, 0.04)
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    adjusted = holm([0.02, math.nan])
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1])  # nan is not counted in the family


def test_non_finite_values_never_reach_the_arithmetic():
    value = estimate([1.0, math.nan, 2.0, math.inf, 3.0])
    assert (value.n, value.mean, value.dropped) == (3, 2.0, 2) and math.isfinite(value.low)
    assert estimate([math.nan]).n == 0 and estimate([math.nan]).dropped == 1


@pytest.mark.parametrize("seed", range(20))
def test_welch_intervals_agree_with_scipys_unequal_variance_t_test(seed):
    """Against scipy's Welch test (ttest_ind, equal_var=False): the interval at 90% and 95% on random samples
    of unequal sizes and spreads; NaN values are left out first."""
    rng = random.Random(seed)
    a = [rng.gauss(80, 0.5) for _ in range(rng.randint(2, 6))]
    b = [rng.gauss(76, 3.0) for _ in range(rng.randint(2, 12))]
    for confidence in (0.90, 0.95):
        got = welch_difference([*a, math.nan], b, confidence)
        expected = stats.ttest_ind(a, b, equal_var=False).confidence_interval(confidence)
        assert (got.low, got.high) == pytest.approx((expected.low, expected.high), rel=1e-10)
        assert got.n == len(a) and got.mean == pytest.approx(sum(a) / len(a) - sum(b) / len(b))


def test_welch_without_two_values_a_side_gives_no_interval_and_without_spread_the_difference():
    assert not welch_difference([80.0], [70.0, 72.0]).has_interval
    assert welch_difference([80.0], [70.0, 72.0]).mean == pytest.approx(9.0)
    assert math.isnan(welch_difference([], [70.0]).mean)
    flat = welch_difference([80.0, 80.0], [70.0, 70.0])
    assert (flat.low, flat.mean, flat.high) == (10.0, 10.0, 10.0) and flat.above_zero
