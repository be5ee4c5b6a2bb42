"""Paired statistics: t-intervals against hand-computed, textbook and scipy values, n = 1, identical pairs, verdicts."""

import math

import pytest
from scipy import stats

from hamjepa.report.paired import estimate, paired_differences, verdict

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
    learned = {"HamJEPA": estimate([1.0, 1.1, 1.2]), "SIGReg": estimate([1.0, 1.1, 1.2])}
    assert verdict(same, learned) == "no difference resolved at n = 3"
    shifted = estimate(paired_differences([71.0, 72.0], [70.0, 71.0]))  # +1 on every seed
    assert shifted.low == shifted.high == 1.0 and shifted.above_zero


def test_unequal_pairs_are_refused():
    with pytest.raises(ValueError, match="equal lengths"):
        paired_differences([1.0], [1.0, 2.0])


def test_verdicts():
    learned = {"HamJEPA": estimate([2.0, 3.0, 2.5]), "SIGReg": estimate([1.0, 1.5, 2.0])}
    assert verdict(estimate([1.0, 1.2, 0.9]), learned) == "HamJEPA ahead"
    assert verdict(estimate([-1.0, -1.2, -0.9]), learned) == "SIGReg ahead"
    assert verdict(estimate([1.0, -1.2, 0.9]), learned) == "no difference resolved at n = 3"
    flat = {"HamJEPA": estimate([2.0, 3.0, 2.5]), "SIGReg": estimate([-1.0, 0.5, 0.2])}
    # a clear difference is still not ranked when one side did not learn measurably
    message = verdict(estimate([1.0, 1.2, 0.9]), flat)
    assert message.startswith("not ranked") and "SIGReg did not learn" in message and "HamJEPA" not in message
    assert verdict(estimate([1.0]), learned) == "n = 1: no interval, nothing resolved"
    assert verdict(estimate([]), learned) == "no paired runs"
