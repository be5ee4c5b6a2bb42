"""Optuna's views of a search, rebuilt from MLflow records: a reopenable SQLite study and Optuna's plots."""

from types import SimpleNamespace

import optuna
from ray import tune

from hamjepa.config import profile
from hamjepa.report.search_views import IMPORTANCE_MIN_COMPLETE, search_views
from hamjepa.report.summary import RunRecord

BASE = profile("quick")
SPACE = {"predictor.dt": tune.loguniform(0.01, 0.2), "predictor.steps": tune.randint(1, 5)}
OBJECTIVE = "val_knn20_top1"


class HistoryClient:
    """The one MlflowClient call the views need: a run's metric history."""

    def __init__(self, histories):
        self.histories = histories

    def get_metric_history(self, run_id, key):
        assert key == OBJECTIVE
        return [SimpleNamespace(step=step, value=value) for step, value in self.histories[run_id].items()]


def _records(n_finished):
    records, histories = [], {}
    rows = [(f"f{i}", "finished", 0.01 + 0.01 * i, 1 + i % 4, [70.0, 71.0 + i, 72.0 + i]) for i in range(n_finished)]
    rows += [("stopped", "stopped", 0.15, 3, [70.0, 60.0]), ("diverged", "diverged", 0.3, 4, [70.0, 0.0]),
             ("failed", "failed", 0.05, 2, [70.0])]
    for name, status, dt, steps, curve in rows:
        metrics = {OBJECTIVE: curve[-1]}
        records.append(RunRecord(name, f"search-{name}", "search", "hamjepa", status, "",
                                 {"predictor.dt": str(dt), "predictor.steps": str(steps), "seed": "0"}, metrics))
        histories[name] = dict(enumerate(curve))
    records.append(RunRecord("c1", "confirm-1", "confirm", "hamjepa", "finished", "", {"seed": "1"}, {}))
    return records, HistoryClient(histories)


def test_the_study_file_holds_every_search_trial_with_its_state_and_curve(tmp_path):
    records, client = _records(3)
    views = search_views(records, SPACE, BASE, client, OBJECTIVE, "study-x", tmp_path)
    study = optuna.load_study(study_name="study-x", storage=f"sqlite:///{views.database}")
    trials = {t.user_attrs["mlflow_run_id"]: t for t in study.get_trials()}
    assert set(trials) == {"f0", "f1", "f2", "stopped", "diverged", "failed"}  # search trials only
    State = optuna.trial.TrialState
    assert trials["f2"].state == State.COMPLETE and trials["f2"].value == 74.0
    assert trials["f2"].params == {"predictor.dt": 0.03, "predictor.steps": 3}
    assert trials["f2"].intermediate_values == {0: 70.0, 1: 73.0, 2: 74.0}
    assert trials["stopped"].state == State.PRUNED and trials["stopped"].intermediate_values == {0: 70.0, 1: 60.0}
    assert trials["diverged"].state == State.COMPLETE and trials["diverged"].value == 0.0
    assert trials["diverged"].params["predictor.dt"] == 0.3  # outside the searched range: the range is widened
    assert trials["failed"].state == State.FAIL
    names = sorted(p.name for p in views.plots)
    assert names == ["optuna_intermediate_values.png", "optuna_optimization_history.png",
                     "optuna_parallel_coordinate.png", "optuna_slice.png"]
    assert all(p.stat().st_size > 5000 for p in views.plots)
    assert any(f"at least {IMPORTANCE_MIN_COMPLETE} complete" in note for note in views.notes)
    # rebuilt, not appended to: a second build gives the same study
    again = search_views(records, SPACE, BASE, client, OBJECTIVE, "study-x", tmp_path)
    assert len(optuna.load_study(study_name="study-x", storage=f"sqlite:///{again.database}").trials) == 6


def test_importance_and_contour_appear_with_enough_complete_trials(tmp_path):
    records, client = _records(IMPORTANCE_MIN_COMPLETE + 1)
    views = search_views(records, SPACE, BASE, client, OBJECTIVE, "study-y", tmp_path)
    names = {p.name for p in views.plots}
    assert {"optuna_param_importances.png", "optuna_contour.png"} <= names and not views.notes
