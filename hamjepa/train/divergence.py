"""Divergence: when a run stops being worth training, and what it reports instead of NaN.

A diverged run ends early and reports finite worst-case values (0% accuracy), because Optuna refuses
NaN objectives (the trial then stays RUNNING forever) and ASHA never stops a NaN trial.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

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


WATCHED = ("loss", "q_energy", "p_energy")  # what the divergence rule reads of a step (energies: HamJEPA only)


def watched_values(loss: torch.Tensor, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The step's WATCHED values as one device tensor (3,), 0 for an energy the objective has not; no host sync."""
    zero = torch.zeros((), dtype=torch.float32, device=loss.device)
    return torch.stack([loss.detach().float(), *(stats.get(k, zero).detach().float() for k in WATCHED[1:])])


def diverged_on_device(values: torch.Tensor) -> torch.Tensor:
    """The rule of `divergence_reason` on a (3,) tensor of WATCHED values, as a device bool; no host sync."""
    loss, energies = values[0], values[1:]
    energies_ok = (torch.isfinite(energies) & (energies <= MAX_STATE_ENERGY)).all()
    return ~torch.isfinite(loss) | (loss > MAX_LOSS) | ~energies_ok


def reason_of(values: torch.Tensor) -> str | None:
    """`divergence_reason` of a (3,) tensor of WATCHED values (read on the host: one sync)."""
    loss, q_energy, p_energy = values.tolist()
    return divergence_reason(loss, {"q_energy": q_energy, "p_energy": p_energy})


def check_interval(every: int, total_steps: int) -> int:
    """Steps between reads of the divergence flag: `every`, or (0) 1% of the run's steps, at least 1."""
    return every or max(1, total_steps // 100)


def worst_case(metric_names: list[str]) -> dict[str, float]:
    """Finite worst values for accuracy metrics (percent)."""
    return {name: 0.0 for name in metric_names}
