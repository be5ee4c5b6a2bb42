"""What Optuna is told: each trial's end mapped once (FullTrialOptunaSearch), checked on a real Optuna study."""

import math

import optuna
import pytest
from ray import tune

from hamjepa.names import RunState, classify
from hamjepa.report.search_views import OPTUNA_STATES, optuna_outcome
from hamjepa.study.search import FullTrialOptunaSearch

OBJECTIVE = "val_knn20_top1"
State = optuna.trial.TrialState


@pytest.fixture
def searcher():
    search = FullTrialOptunaSearch(space={"predictor.dt": tune.loguniform(0.01, 0.2)}, metric=OBJECTIVE, mode="max",
                                   sampler=optuna.samplers.TPESampler(seed=0), epochs=3)
    return search


def _play(searcher, trial_id, values, last_extra=None, error=False, replay=()):
    """Suggest a trial, report `values` for epochs 0.., then complete it with the last report (+ extra keys)."""
    assert searcher.suggest(trial_id) is not None
    result = None
    for epoch, value in enumerate(values):
        result = {"epoch": epoch, OBJECTIVE: value, "training_iteration": epoch + 1}
        if epoch < len(values) - 1:  # Tune hands the last report to on_trial_complete only
            searcher.on_trial_result(trial_id, result)
        if epoch in replay:  # Ray reports at least once: a replayed epoch must not be told twice
            searcher.on_trial_result(trial_id, result)
    if last_extra:
        result = {**result, **last_extra}
    searcher.on_trial_complete(trial_id, None if error else result, error=error)


def test_each_ending_reaches_optuna_in_its_own_state(searcher):
    _play(searcher, "finished", [70.0, 71.0, 72.0, 73.5], replay=(1,))
    _play(searcher, "stopped", [70.0, 65.0])  # ASHA stopped it after epoch 1 of 3
    _play(searcher, "diverged", [70.0, 0.0], last_extra={"diverged": 1})
    _play(searcher, "failed", [70.0, 0.0, 0.0, 0.0], last_extra={"failed": 1})
    _play(searcher, "errored", [70.0], error=True)
    _play(searcher, "nan", [70.0, 71.0, 72.0, float("nan")])
    trials = searcher.study.get_trials(deepcopy=False)
    assert len(trials) == 6
    finished, stopped, diverged, failed, errored, nan = trials
    assert finished.state == State.COMPLETE and finished.value == 73.5
    assert finished.intermediate_values == {0: 70.0, 1: 71.0, 2: 72.0, 3: 73.5}  # keyed by epoch, each once
    # a truncated trial is PRUNED: TPE never ranks its epoch-1 value against full-length ones
    assert stopped.state == State.PRUNED and stopped.intermediate_values == {0: 70.0, 1: 65.0}
    assert diverged.state == State.COMPLETE and diverged.value == 0.0  # the worst value: TPE avoids its region
    assert failed.state == State.FAIL and errored.state == State.FAIL
    assert nan.state == State.FAIL  # no NaN ever reaches Optuna as a value
    assert all(t.value is None or math.isfinite(t.value) for t in trials)


def test_the_mapping_covers_every_status_once():
    assert set(OPTUNA_STATES) == set(RunState)
    assert OPTUNA_STATES[RunState.STOPPED] == State.PRUNED and OPTUNA_STATES[RunState.FINISHED] == State.COMPLETE


@pytest.mark.parametrize("last,status", [
    ({"epoch": 3}, RunState.FINISHED),
    ({"epoch": 1}, RunState.STOPPED),
    ({"epoch": 0}, RunState.STOPPED),
    ({"epoch": 2, "diverged": 1, "diverged_reason": "epoch 2: non-finite loss (nan)"}, RunState.DIVERGED),
    ({"epoch": 3, "failed": 1, "failure_reason": "worker died"}, RunState.FAILED),
])
def test_one_classifier_of_run_endings(last, status):
    found, reason = classify(last, epochs=3)
    assert found == status
    assert (reason == "") == (status == RunState.FINISHED)
    assert found.mlflow_status == ("FINISHED" if status in (RunState.FINISHED, RunState.STOPPED) else "FAILED")


@pytest.mark.parametrize("status,value,intermediate,expected", [
    (RunState.FINISHED, 73.5, {0: 70.0, 3: 73.5}, (State.COMPLETE, 73.5)),
    (RunState.STOPPED, 65.0, {0: 70.0, 1: 65.0}, (State.PRUNED, 65.0)),  # its last intermediate value
    (RunState.STOPPED, 65.0, {}, (State.PRUNED, None)),  # the live search: tell() takes it from the trial
    (RunState.DIVERGED, 0.0, {0: 70.0}, (State.COMPLETE, 0.0)),
    (RunState.FINISHED, float("nan"), {0: 70.0}, (State.FAIL, None)),
    (RunState.FINISHED, None, {}, (State.FAIL, None)),
    (RunState.FAILED, 0.0, {0: 70.0}, (State.FAIL, None)),
])
def test_one_outcome_for_the_live_search_and_the_rebuilt_study(status, value, intermediate, expected):
    assert optuna_outcome(status, value, intermediate) == expected
