"""Paired comparisons with confidence intervals: what a study may conclude from n seeds.

Two methods trained on the same seed share the data split, the sample order, the augmentation stream and
(where the architectures agree) the encoder's initialisation, so their difference on that seed cancels
much of the seed's luck. The comparison is therefore the mean of the n per-seed differences, with a
Student-t interval on those differences:

    mean(d) +/- t_{n-1, 1 - alpha/2} * sd(d) / sqrt(n),    d_i = hamjepa_i - sigreg_i,

and likewise a method's gain over its own initialisation (d_i = final_i - initial_i). With n = 1 there is
no interval (nothing estimates the spread); a verdict never ranks what it cannot resolve.

The decision rule (docs/method.md §10 "The decision rule"): one primary metric, declared before the study, gets
the verdict word from its paired interval; every secondary metric gets a two-sided paired t-test p-value,
Holm-adjusted over the secondaries, and no verdict word. When nothing is resolved the design's minimum
detectable difference (80% power) is stated, and how many paired seeds would resolve the observed difference.
No NaN or inf reaches the arithmetic: `estimate` drops them and counts them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95
POWER = 0.80  # the power at which a design's minimum detectable difference is stated
MAX_SEEDS_TO_RESOLVE = 1000  # beyond this, 'how many seeds would resolve it' answers 'more than 1000'


@dataclass(frozen=True)
class Estimate:
    """A mean over n values with its sample std and a two-sided t-interval (nan bounds when n < 2)."""

    n: int
    mean: float
    std: float
    low: float
    high: float
    dropped: int = 0  # non-finite values left out (a diverged run's NaN never reaches the arithmetic)

    @property
    def has_interval(self) -> bool:
        return self.n >= 2 and math.isfinite(self.low)

    @property
    def above_zero(self) -> bool:
        """Resolved above zero: the whole interval is > 0."""
        return self.has_interval and self.low > 0

    @property
    def below_zero(self) -> bool:
        return self.has_interval and self.high < 0

    def text(self, signed: bool = False) -> str:
        """`+1.23 [+0.40, +2.06]`, or `+1.23 (n=1, no interval)`, or `-` with no values."""
        if self.n == 0:
            return "-"
        fmt = "{:+.2f}" if signed else "{:.2f}"
        if not self.has_interval:
            return fmt.format(self.mean) + (" (n=1, no interval)" if self.n == 1 else "")
        return f"{fmt.format(self.mean)} [{fmt.format(self.low)}, {fmt.format(self.high)}]"


def t_quantile(probability: float, dof: float) -> float:
    from scipy.stats import t

    return float(t.ppf(probability, dof))


def estimate(values: Sequence[float], confidence: float = CONFIDENCE) -> Estimate:
    """Mean, sample std and the t-interval of the mean of the finite `values`; non-finite ones are dropped and
    counted (`Estimate.dropped`), never averaged."""
    finite = [float(v) for v in values if math.isfinite(float(v))]
    dropped = len(values) - len(finite)
    n = len(finite)
    if n == 0:
        return Estimate(0, math.nan, math.nan, math.nan, math.nan, dropped)
    mean = math.fsum(finite) / n
    if n == 1:
        return Estimate(1, mean, math.nan, math.nan, math.nan, dropped)
    std = statistics.stdev(finite)
    half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return Estimate(n, mean, std, mean - half, mean + half, dropped)


def p_value(value: Estimate) -> float:
    """Two-sided p-value of the one-sample t-test of mean 0 for the values behind `value` (paired differences).
    nan below n = 2; with no spread, 0 when the mean is not 0 (every pair agrees) and 1 when it is."""
    if value.n < 2:
        return math.nan
    if value.std == 0:
        return 0.0 if value.mean != 0 else 1.0
    from scipy.stats import t

    statistic = value.mean / (value.std / math.sqrt(value.n))
    return float(2 * t.sf(abs(statistic), value.n - 1))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (same order; nan stays nan and is not counted)."""
    finite = sorted((p, i) for i, p in enumerate(p_values) if math.isfinite(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (len(finite) - rank) * p))  # monotone: never below an earlier one
        adjusted[i] = running
    return adjusted


def min_detectable_difference(std: float, n: int, confidence: float = CONFIDENCE, power: float = POWER) -> float:
    """The smallest true paired difference a two-sided paired t-test at `confidence` detects with `power`, from
    the paired sd over n pairs: (t_{1 - alpha/2, n - 1} + t_{power, n - 1}) * sd / sqrt(n). nan below n = 2."""
    if n < 2 or not math.isfinite(std):
        return math.nan
    return (t_quantile(0.5 + confidence / 2, n - 1) + t_quantile(power, n - 1)) * std / math.sqrt(n)


def seeds_to_resolve(difference: float, std: float, confidence: float = CONFIDENCE, power: float = POWER) -> int:
    """The fewest paired seeds whose minimum detectable difference (at the same paired sd) is <= |difference|;
    MAX_SEEDS_TO_RESOLVE + 1 when none up to that many is (or there is no difference to resolve)."""
    if not (math.isfinite(difference) and math.isfinite(std)) or difference == 0:
        return MAX_SEEDS_TO_RESOLVE + 1
    for n in range(2, MAX_SEEDS_TO_RESOLVE + 1):
        if min_detectable_difference(std, n, confidence, power) <= abs(difference):
            return n
    return MAX_SEEDS_TO_RESOLVE + 1


def welch_difference(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Estimate:
    """mean(a) - mean(b) of two independent samples with Welch's t-interval (Welch-Satterthwaite degrees of
    freedom; no equal-variance assumption), over their finite values. `n` is a's size; no interval unless both
    samples have >= 2 values; `std` is the difference's standard error. With no spread on either side the interval
    is the difference itself."""
    a = [float(v) for v in a if math.isfinite(float(v))]
    b = [float(v) for v in b if math.isfinite(float(v))]
    if not a or not b:
        return Estimate(len(a), math.nan, math.nan, math.nan, math.nan)
    difference = math.fsum(a) / len(a) - math.fsum(b) / len(b)
    if len(a) < 2 or len(b) < 2:
        return Estimate(len(a), difference, math.nan, math.nan, math.nan)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Estimate(len(a), difference, 0.0, difference, difference)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = t_quantile(0.5 + confidence / 2, dof) * se
    return Estimate(len(a), difference, se, difference - half, difference + half)


def paired_differences(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """a_i - b_i for pairs given in the same (seed) order."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    return [x - y for x, y in zip(a, b)]


def primary_verdict(delta: Estimate, label: str, first: str, second: str) -> str:
    """The verdict word of the primary metric, from its paired interval alone: who is ahead and by how much, or
    "not resolved" with the smallest difference this design detects."""
    if delta.n == 0:
        return "no paired runs"
    if delta.n < 2:
        return "n = 1: no interval, nothing resolved"
    if delta.above_zero:
        return f"{first} ahead on {label} by {delta.text(signed=True)}"
    if delta.below_zero:
        return f"{second} ahead on {label} by {(-delta.mean):+.2f} [{-delta.high:+.2f}, {-delta.low:+.2f}]"
    detectable = min_detectable_difference(delta.std, delta.n)
    return (f"not resolved at n = {delta.n} on {label} ({first} - {second} {delta.text(signed=True)}): this design "
            f"detects differences >= {detectable:.2f} points")
