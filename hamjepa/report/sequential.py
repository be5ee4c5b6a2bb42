"""Seeds until resolved (`--seeds auto[:MAX]`): paired seeds added in looks, stopping as soon as the primary is
resolved, at a per-look level calibrated so that the study's overall false-positive rate stays at 5%.

Looking at the data after 3, 6 and 10 seeds and stopping at the first look whose 95% interval excludes 0 would
declare a difference that is not there 12% of the time (simulated, normal differences), not 5%. Like
Pocock's group-sequential design, every look uses the same, stricter level alpha': the probability, under no true
difference, that *any* look's two-sided paired t-test rejects at alpha' is 5%. alpha' is the 5% quantile of the
smallest p-value over the looks in studies simulated with no difference (paired differences i.i.d. normal; the t
statistic is scale-free, so the variance does not matter): exact for normal differences up to the simulation's
error, which at CALIBRATION_STUDIES studies is about 0.1 percentage point on the 5%. docs/method.md §11.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

OVERALL_ALPHA = 0.05
FIRST_LOOKS = (3, 6, 10)  # seeds at each look; beyond 10, a look every LOOK_STEP seeds
LOOK_STEP = 5
DEFAULT_MAX = 10
CALIBRATION_STUDIES = 200_000
CALIBRATION_SEED = 0  # the level is a function of the looks alone: a resumed study uses the same one


def looks(most: int) -> tuple[int, ...]:
    """The numbers of paired seeds at which a sequential study looks, up to `most` (which is always the last)."""
    if most < 2:
        raise ValueError(f"a sequential study needs at least 2 paired seeds, got {most}.")
    steps = [n for n in FIRST_LOOKS if n < most]
    while steps and steps[-1] + LOOK_STEP < most and steps[-1] >= FIRST_LOOKS[-1]:
        steps.append(steps[-1] + LOOK_STEP)
    return (*[n for n in steps if n >= 2], most)


def min_p_values(schedule: Sequence[int], studies: int, seed: int) -> np.ndarray:
    """The smallest two-sided one-sample t-test p-value over the looks of `studies` simulated studies with no true
    difference (standard normal paired differences, seeded)."""
    from scipy.stats import t

    rng = np.random.default_rng(seed)
    differences = rng.standard_normal((studies, schedule[-1]))
    smallest = np.ones(studies)
    for n in schedule:
        sample = differences[:, :n]
        statistic = sample.mean(1) / (sample.std(1, ddof=1) / math.sqrt(n))
        smallest = np.minimum(smallest, 2 * t.sf(np.abs(statistic), n - 1))
    return smallest


@functools.cache
def per_look_alpha(schedule: tuple[int, ...], overall: float = OVERALL_ALPHA,
                   studies: int = CALIBRATION_STUDIES, seed: int = CALIBRATION_SEED) -> float:
    """alpha' for every look of `schedule` such that P(any look rejects | no difference) = `overall`."""
    if len(schedule) == 1:
        return overall
    return float(np.quantile(min_p_values(schedule, studies, seed), overall))


def false_positive_rate(schedule: tuple[int, ...], alpha: float, studies: int, seed: int) -> float:
    """The share of simulated no-difference studies in which some look rejects at `alpha`."""
    return float((min_p_values(schedule, studies, seed) <= alpha).mean())
