"""The search's sampler and scheduler: Optuna's TPE through Ray Tune, told how each trial really ended, its study
kept live in an RDB storage, and ASHA on our own `epoch` metric.

Live: the Optuna study is written to an RDB storage while trials run (default `optuna.db` in the study's folder,
`--optuna-storage URL` for another), so `optuna-dashboard <url>` in a second shell watches the search, with real
start and end times (Optuna's `ask` when Tune creates a trial, `tell` when it ends). A resumed study continues the
same Optuna study: Tune restores the searcher it pickled (which holds the storage's URL and the Optuna trials it
asked), so every Tune trial keeps its Optuna trial; a searcher that starts over on an existing study enqueues no
first point twice and closes the trials nobody owns any more as FAIL (`_setup_study`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

from hamjepa import names
from hamjepa.names import RunState
from hamjepa.report.search_views import optuna_outcome
from hamjepa.study.settings import StudySettings, defaults_point
from hamjepa.study.space import SearchSpace

# SQLite waits this long for a reader's lock (optuna-dashboard in another process) before failing a write.
SQLITE_LOCK_TIMEOUT_S = 60


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

    def _setup_study(self, mode) -> None:
        """Create, or load, the Optuna study. Loading one that has trials means this searcher starts over on a study
        an earlier invocation began: its first points are in it already, and its unfinished trials belong to no
        Tune trial any more."""
        resumed = self._storage is not None and bool(_trials_in(self._storage, self._study_name))
        if resumed:
            self._points_to_evaluate = []
        super()._setup_study(mode)
        if resumed:
            close_orphans(self._ot_study, "interrupted; the resumed search started over without it")

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

BASELINE_SPACE_FILE = Path(__file__).with_name("sigreg_space.yaml")


def baseline_space() -> SearchSpace:
    """SIGReg's own knobs, searched with --tune-baseline (docs/method.md §4), as data: sigreg_space.yaml."""
    return SearchSpace.from_file(BASELINE_SPACE_FILE)


def rdb_storage(url: str) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage (Ray's OptunaSearch takes the object, not a URL); a SQLite file waits for readers."""
    kwargs = {"connect_args": {"timeout": SQLITE_LOCK_TIMEOUT_S}} if url.startswith("sqlite:") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def _trials_in(storage: optuna.storages.BaseStorage, name: str) -> list:
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    except KeyError:  # no such study yet
        return []


def close_orphans(study: optuna.Study, reason: str) -> int:
    """Mark the study's RUNNING trials FAIL (no Tune trial will tell them); returns how many."""
    orphans = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in orphans:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    if orphans:
        print(f"Optuna study '{study.study_name}': {len(orphans)} trial(s) marked FAIL: {reason}.", flush=True)
    return len(orphans)


def search_algorithm(settings: StudySettings, space: Mapping[str, Any], study_name: str,
                     initial_points: list[dict[str, Any]], storage_url: str) -> FullTrialOptunaSearch:
    """TPE (seeded) over `space`, the base config's values first, its study `study_name` kept at `storage_url`."""
    points = [defaults_point(space, settings.base), *initial_points]
    return FullTrialOptunaSearch(metric=settings.objective, mode="max", points_to_evaluate=points,
                                 sampler=optuna.samplers.TPESampler(seed=settings.seed), study_name=study_name,
                                 storage=rdb_storage(storage_url), epochs=settings.base.optim.epochs)


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
