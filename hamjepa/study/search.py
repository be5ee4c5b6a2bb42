"""The search's sampler and scheduler: Optuna's TPE through Ray Tune, told how each trial really ended, and ASHA
on our own `epoch` metric.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

from hamjepa import names
from hamjepa.names import RunState
from hamjepa.report.search_views import optuna_outcome
from hamjepa.study.settings import StudySettings, defaults_point


class FullTrialOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch, telling Optuna how each trial really ended (OPTUNA_STATES).

    Ray 2.60's OptunaSearch tells every trial that ended without an error COMPLETE with its last value, so a
    trial ASHA stopped after one epoch would be ranked by TPE against trials that trained every epoch.
    Intermediate values are keyed by our `epoch` (0 = initialisation), not by Tune's training_iteration,
    which restarts when a trial's driver is retried.
    """

    def __init__(self, *args, epochs: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.epochs = epochs
        self._reported: dict[str, set[int]] = {}  # Ray reports at least once: a replayed epoch is told once

    @property
    def study(self) -> optuna.Study:
        return self._ot_study

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials or self.metric not in result or names.EPOCH not in result:
            return
        epoch, reported = int(result[names.EPOCH]), self._reported.setdefault(trial_id, set())
        value = float(result[self.metric])
        if epoch not in reported and math.isfinite(value):
            self._ot_trials[trial_id].report(value, epoch)
            reported.add(epoch)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        if result:  # Tune hands the last report (the one ASHA stopped on, or the final one) only to this method
            self.on_trial_result(trial_id, result)
        status = RunState.FAILED if error or not result else names.classify(result, self.epochs)[0]
        state, value = optuna_outcome(status, result.get(self.metric) if result else None, {})
        # tell() takes no value but a COMPLETE one: a PRUNED trial gets its last intermediate value from Optuna.
        self._ot_study.tell(self._ot_trials[trial_id], value, state=state)
        self._completed_trials.add(trial_id)


# -- the search study ---------------------------------------------------------------------------------

def baseline_space() -> dict[str, Any]:
    """SIGReg's own knobs, searched with --tune-baseline (docs/method.md §4): its weight lambda, on a log scale
    about the default 0.02, and the number of random slicing directions, about the default 64."""
    from ray import tune

    return {"sigreg.weight": tune.loguniform(0.005, 0.1), "sigreg.num_directions": tune.choice([16, 32, 64, 128, 256])}


def search_algorithm(settings: StudySettings, space: Mapping[str, Any], study_id: str,
                      initial_points: list[dict[str, Any]]) -> FullTrialOptunaSearch:
    points = [defaults_point(space, settings.base), *initial_points]
    return FullTrialOptunaSearch(metric=settings.objective, mode="max", points_to_evaluate=points,
                                 sampler=optuna.samplers.TPESampler(seed=settings.seed), study_name=study_id,
                                 epochs=settings.base.optim.epochs)


# ASHA's rungs: the first after a quarter of the epochs (earlier, a trial's objective is mostly its
# initialisation), and half the trials continue at each rung.
ASHA_FIRST_RUNG_DIVISOR = 4
ASHA_KEEP_ONE_IN = 2


def asha_scheduler(settings: StudySettings):
    if not settings.early_stopping:
        return None
    from ray.tune.schedulers import ASHAScheduler

    epochs = settings.base.optim.epochs
    # Driver retries restart Tune's training_iteration, so the time axis is our own `epoch` metric.
    return ASHAScheduler(time_attr=names.EPOCH, max_t=epochs, grace_period=max(1, epochs // ASHA_FIRST_RUNG_DIVISOR),
                         reduction_factor=ASHA_KEEP_ONE_IN)
