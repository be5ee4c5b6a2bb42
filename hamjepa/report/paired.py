"""Paired comparisons with confidence intervals: what a study may conclude from n seeds.

Two methods trained on the same seed share the data split, the sample order, the augmentation stream and
(where the architectures agree) the encoder's initialisation, so their difference on that seed cancels
much of the seed's luck. The comparison is therefore the mean of the n per-seed differences, with a
Student-t interval on those differences:

    mean(d) +/- t_{n-1, 1 - alpha/2} * sd(d) / sqrt(n),    d_i = hamjepa_i - sigreg_i,

and likewise a method's gain over its own initialisation (d_i = final_i - initial_i). With n = 1 there is
no interval (nothing estimates the spread); a verdict never ranks what it cannot resolve.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A mean over n values with its sample std and a two-sided t-interval (nan bounds when n < 2)."""

    n: int
    mean: float
    std: float
    low: float
    high: float

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


def t_quantile(probability: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(probability, dof))


def estimate(values: Sequence[float], confidence: float = CONFIDENCE) -> Estimate:
    """Mean, sample std and the t-interval of the mean of `values`."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return Estimate(0, math.nan, math.nan, math.nan, math.nan)
    mean = statistics.fmean(values)
    if n == 1:
        return Estimate(1, mean, math.nan, math.nan, math.nan)
    std = statistics.stdev(values)
    half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return Estimate(n, mean, std, mean - half, mean + half)


def paired_differences(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """a_i - b_i for pairs given in the same (seed) order."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    return [x - y for x, y in zip(a, b)]


def verdict(delta: Estimate, gains: dict[str, Estimate], first: str = "HamJEPA", second: str = "SIGReg") -> str:
    """A plain-words reading of one metric's comparison.

    Learning comes first: when a method's gain over its initialisation is not resolved above zero, its runs
    did not learn measurably at this size and ranking the methods would compare noise.
    """
    if delta.n == 0:
        return "no paired runs"
    if delta.n < 2:
        return "n = 1: no interval, nothing resolved"
    not_learning = [name for name, gain in gains.items() if not gain.above_zero]
    if not_learning:
        who = " and ".join(not_learning)
        return f"not ranked: {who} did not learn measurably at this size (gain over initialisation not above 0)"
    if delta.above_zero:
        return f"{first} ahead"
    if delta.below_zero:
        return f"{second} ahead"
    return f"no difference resolved at n = {delta.n}"
