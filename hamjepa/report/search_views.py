"""The search as Optuna sees it, rebuilt from MLflow: a SQLite Optuna study and Optuna's own plots.

The study is built after the search phase from MLflow's records (every search trial: its parameters, its
state and value under optuna_outcome below, its objective, and its per-epoch objective as intermediate values), so no
SQLite file is written while trials run concurrently, and a resumed or interrupted study rebuilds the same
file. `optuna.load_study(study_name=<study id>, storage="sqlite:///optuna.db")` and `optuna-dashboard
sqlite:///optuna.db` open it. The plots are `optuna.visualization.matplotlib`'s.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from mlflow.tracking import MlflowClient

from hamjepa.config import Config
from hamjepa.names import RunState
from hamjepa.report.summary import RunRecord

# fANOVA importance on fewer complete trials ranks noise; below this the views say so instead of drawing it.
IMPORTANCE_MIN_COMPLETE = 8


# How a trial's end reaches Optuna, written once. A trial ASHA stopped is PRUNED (Optuna records its last
# intermediate value, and TPE never ranks a truncated value against full-length ones); a diverged trial is
# a COMPLETE trial with the worst value (the configuration's fault: TPE learns to avoid its region); a
# failed one (an error not of the configuration's making) is FAIL and teaches TPE nothing.
OPTUNA_STATES = {
    RunState.FINISHED: optuna.trial.TrialState.COMPLETE,
    RunState.STOPPED: optuna.trial.TrialState.PRUNED,
    RunState.DIVERGED: optuna.trial.TrialState.COMPLETE,
    RunState.FAILED: optuna.trial.TrialState.FAIL,
    RunState.RUNNING: optuna.trial.TrialState.FAIL,
}


def optuna_outcome(status: RunState, value: float | None,
                   intermediate: Mapping[int, float]) -> tuple[optuna.trial.TrialState, float | None]:
    """(state, value) Optuna records for a trial that ended with `status` and final objective `value`.

    The value is the objective of a COMPLETE trial and the last intermediate value of a PRUNED one (what
    `Study.tell` records by itself), else None; a COMPLETE trial without a finite objective is FAIL, because
    Optuna refuses NaN. The live search (FullTrialOptunaSearch) and the rebuilt study file (search_views) both
    go through here, so they cannot disagree.
    """
    state = OPTUNA_STATES[status]
    if state == optuna.trial.TrialState.PRUNED:
        return state, intermediate[max(intermediate)] if intermediate else None
    if state == optuna.trial.TrialState.COMPLETE:
        if value is None or not math.isfinite(value):
            return optuna.trial.TrialState.FAIL, None
        return state, float(value)
    return state, None


@dataclass
class SearchViews:
    database: Path
    plots: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def distributions_of(space: Mapping[str, Any], base: Config) -> dict[str, optuna.distributions.BaseDistribution]:
    """Optuna distributions of a Tune search space (fixed values become one-point categoricals)."""
    from ray.tune.search.optuna import OptunaSearch

    converted = OptunaSearch.convert_search_space(dict(space)) if space else {}
    flat = base.flatten()
    return {key: converted.get(key, optuna.distributions.CategoricalDistribution([flat[key]])) for key in space}


def _covering(distribution, values: Sequence[Any]):
    """The distribution widened to contain `values` (an initial point may lie outside the searched range)."""
    if isinstance(distribution, optuna.distributions.FloatDistribution) and values:
        low, high = min(distribution.low, *values), max(distribution.high, *values)
        return optuna.distributions.FloatDistribution(low, high, log=distribution.log and low > 0)
    if isinstance(distribution, optuna.distributions.IntDistribution) and values:
        return optuna.distributions.IntDistribution(min(distribution.low, *values), max(distribution.high, *values),
                                                    log=distribution.log)
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        extra = [v for v in values if v not in distribution.choices]
        return optuna.distributions.CategoricalDistribution([*distribution.choices, *dict.fromkeys(extra)])
    return distribution


def build_study(records: Sequence[RunRecord], space: Mapping[str, Any], base: Config, client: MlflowClient,
                objective: str, name: str, path: Path) -> optuna.Study:
    """A fresh SQLite Optuna study at `path` holding every search trial of `records`."""
    from hamjepa.report.summary import typed_param

    search = sorted((r for r in records if r.phase == "search"), key=lambda r: r.name)
    params = [{key: typed_param(base, key, r.params[key]) for key in space if key in r.params} for r in search]
    distributions = {key: _covering(d, [p[key] for p in params if key in p])
                     for key, d in distributions_of(space, base).items()}
    path.unlink(missing_ok=True)
    study = optuna.create_study(storage=f"sqlite:///{path}", study_name=name, direction="maximize")
    for record, values in zip(search, params):
        status = RunState(record.status) if record.status in set(RunState) else RunState.RUNNING
        intermediate = {int(m.step): m.value for m in client.get_metric_history(record.run_id, objective)
                        if math.isfinite(m.value)}
        state, value = optuna_outcome(status, record.metrics.get(objective), intermediate)
        study.add_trial(optuna.trial.create_trial(
            params=values, distributions={k: distributions[k] for k in values}, value=value, state=state,
            intermediate_values=intermediate, user_attrs={"mlflow_run_id": record.run_id, "status": str(status)}))
    return study


def draw(study: optuna.Study, folder: Path) -> tuple[list[Path], list[str]]:
    """Optuna's views of the search as PNGs; notes say what was not drawn and why."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as views

    folder.mkdir(parents=True, exist_ok=True)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    plots: list[Path] = []
    notes: list[str] = []
    drawings = [("optimization_history", views.plot_optimization_history, {}),
                ("intermediate_values", views.plot_intermediate_values, {}),
                ("parallel_coordinate", views.plot_parallel_coordinate, {}),
                ("slice", views.plot_slice, {})]
    if len(complete) >= IMPORTANCE_MIN_COMPLETE:
        importances = optuna.importance.get_param_importances(study)
        drawings.append(("param_importances", views.plot_param_importances, {}))
        top = list(importances)[:2]
        if len(top) == 2:
            drawings.append(("contour", views.plot_contour, {"params": top}))
    else:
        notes.append(f"Hyperparameter importance and the contour of the two most important parameters need at least "
                     f"{IMPORTANCE_MIN_COMPLETE} complete search trials; this search has {len(complete)}, so they "
                     "are not drawn (they would rank noise).")
    if not complete:
        return plots, notes + ["No search trial completed, so Optuna's views are not drawn."]
    for name, plot, kwargs in drawings:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib views experimental
            axes = plot(study, **kwargs)
            figure = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
            figure.set_size_inches(max(figure.get_size_inches()[0], 7), max(figure.get_size_inches()[1], 4.5))
            figure.tight_layout()
        path = folder / f"optuna_{name}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        plots.append(path)
    return plots, notes


def search_views(records: Sequence[RunRecord], space: Mapping[str, Any], base: Config, client: MlflowClient,
                 objective: str, name: str, folder: Path) -> SearchViews:
    """The Optuna study file and its plots, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    study = build_study(records, space, base, client, objective, name, folder / "optuna.db")
    plots, notes = draw(study, folder / "plots")
    return SearchViews(folder / "optuna.db", plots, notes)
