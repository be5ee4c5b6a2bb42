"""Divergence: when a run stops being worth training, and what it reports instead of NaN.

A diverged run ends early and reports finite worst-case values (0% accuracy), because Optuna refuses
NaN objectives (the trial then stays RUNNING forever) and ASHA never stops a NaN trial.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# |q|^2/d or |p|^2/d beyond this means the state has exploded; the energy budget targets 1.
MAX_STATE_ENERGY = 1e6
# A healthy loss is O(1-10); beyond this the rollout has blown up (e.g. leapfrog past its stability limit
# dt * sqrt(curvature) < 2), even if float32 still holds the number.
MAX_LOSS = 1e6


def divergence_reason(loss: float, stats: Mapping[str, float]) -> str | None:
    """A one-line reason when the step's loss or state says the run diverged, else None."""
    if not math.isfinite(loss):
        return f"non-finite loss ({loss})"
    if loss > MAX_LOSS:
        return f"loss exploded ({loss:.3g} > {MAX_LOSS:.0g})"
    for key in ("q_energy", "p_energy"):
        value = stats.get(key)
        if value is not None and not (math.isfinite(value) and value <= MAX_STATE_ENERGY):
            return f"state exploded ({key} = {value:.3g} > {MAX_STATE_ENERGY:.0g})"
    return None


def worst_case(metric_names: list[str]) -> dict[str, float]:
    """Finite worst values for accuracy metrics (percent)."""
    return {name: 0.0 for name in metric_names}
