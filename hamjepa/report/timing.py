"""Where a study's time went: its phases' wall time (this invocation's), and inside its runs the parts of each run
(`time/<part>_s`, train/loop.py), summed over every run of the study."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from hamjepa import names

PHASE_PREFIX = "time/phase_"  # a parent run's metric: time/phase_<phase>_s, this invocation's wall seconds
PART_LABELS = {"startup": "start-up", "train": "training", "eval_init": "evaluation at initialisation",
               "eval_objective": "per-epoch objective", "eval_final": "final evaluation", "theory": "theory check",
               "checkpoint": "checkpoints"}


def phase_metric(phase: str) -> str:
    return f"{PHASE_PREFIX}{phase}_s"


def phases_from_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The phases' wall seconds from a parent run's metrics."""
    return {key[len(PHASE_PREFIX):-2]: value for key, value in metrics.items()
            if key.startswith(PHASE_PREFIX) and key.endswith("_s")}


def run_parts(records: Iterable) -> dict[str, float]:
    """Seconds per part (names.TIME_PARTS), summed over the runs (each run's last report holds its totals)."""
    return {part: sum(r.metrics.get(names.time_metric(part), 0.0) for r in records) for part in names.TIME_PARTS}


def lines(phases: Mapping[str, float], parts: Mapping[str, float]) -> list[str]:
    """'Wall time: ...' (phases, with their shares) and 'Inside the runs: ...' (parts, with their shares)."""
    out = []
    wall = sum(phases.values())
    if wall > 0:
        out.append("Wall time (this invocation): " + ", ".join(
            f"{phase} {seconds / 60:.1f} min ({seconds / wall:.0%})" for phase, seconds in phases.items())
            + f"; {wall / 60:.1f} min in all.")
    total = sum(parts.values())
    if total > 0:
        shares = sorted(parts.items(), key=lambda item: -item[1])
        out.append(f"Inside the runs ({total / 60:.1f} run-minutes, every run together): " + ", ".join(
            f"{PART_LABELS[part]} {seconds / total:.0%}" for part, seconds in shares if seconds > 0) + ".")
    return out
