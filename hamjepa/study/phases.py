"""Running one phase of a study as a Tune experiment: where the trial drivers are placed, how many trials fit the
cluster at once, Tune's console table, and the line a phase starts with.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from hamjepa import names, storage
from hamjepa.errors import UserError
from hamjepa.methods import spec
from hamjepa.study.driver import MLflowTrialCallback, trial_driver
from hamjepa.study.settings import ARM, CELL, StudySettings
from hamjepa.train.launch import DRIVER_MEMORY_BYTES, DRIVER_RESOURCE

# -- running a phase ----------------------------------------------------------------------------------

def cluster_capacity() -> dict[str, float]:
    """The most the cluster can offer: an autoscaling cluster's maximum (from its launcher config, the way Ray
    Train checks it), else what it has now. A GPU cluster scaling from zero has no GPU until trials ask."""
    import ray
    from ray._private.state import state

    try:
        most = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # noqa: BLE001 - a private API: without it we plan with what is there now
        most = {}
    now = ray.cluster_resources()
    return {key: max(now.get(key, 0.0), most.get(key, 0.0)) for key in {*now, *most}}


def driver_resources(capacity: Mapping[str, float]) -> dict[str, float]:
    """What one trial driver holds. Not a CPU: on a small machine a driver per trial would take the cores its own
    Train workers need (Tune refuses {"CPU": 0}, and a CPU fraction still costs a whole trial's slot on 2 cores).
    So a driver holds one unit of the custom resource `trial_driver` where the cluster offers it (cluster/aws.yaml's
    head does, which keeps drivers off the GPU workers the autoscaler removes), and otherwise a small slice of the
    `memory` resource every Ray node has: any cluster runs a study as it is, `ray start --head` without flags."""
    if capacity.get(DRIVER_RESOURCE, 0) >= 1:
        return {DRIVER_RESOURCE: 1}
    return {"memory": DRIVER_MEMORY_BYTES}


def cluster_concurrency(settings: StudySettings, total: Mapping[str, float] | None = None) -> int:
    """How many trials fit at once: workers' CPUs (and GPUs) against the cluster's capacity."""
    total = cluster_capacity() if total is None else total
    r = settings.resources
    fits = int(total.get("CPU", 0) // (r.workers * r.cpus_per_worker))
    if r.gpus_per_worker > 0:
        fits = min(fits, int(total.get("GPU", 0) // (r.workers * r.gpus_per_worker)))
    if fits < 1:
        raise UserError(f"one trial needs {r.workers} x {r.cpus_per_worker} CPUs and {r.workers} x "
                        f"{r.gpus_per_worker} GPUs but the cluster has at most {total.get('CPU', 0):g} CPUs and "
                        f"{total.get('GPU', 0):g} GPUs; lower --workers or the per-worker resources.")
    return min(fits, settings.max_concurrent) if settings.max_concurrent else fits


def run_phase(settings: StudySettings, phase: str, param_space: dict[str, Any], study_dir: str, study_id: str,
              parent_run_id: str, num_samples: int = 1, search_alg=None, scheduler=None, tune_name: str = ""):
    """Run (or, when resuming, restore and finish) one Tune experiment named `tune_name` (default: the
    phase); returns its ResultGrid."""
    from ray import tune

    train_folder = storage.join(study_dir, "train")
    capacity = cluster_capacity()
    driver = tune.with_resources(
        tune.with_parameters(trial_driver, base=settings.base, resources=settings.resources,
                             storage_path=train_folder, study_id=study_id, objective=settings.objective,
                             tracking_uri=settings.tracking_uri, experiment=settings.experiment_name),
        driver_resources(capacity),
    )
    callback = MLflowTrialCallback(settings, parent_run_id, study_id, phase, train_folder)
    tune_name = tune_name or phase
    path = storage.join(study_dir, tune_name)
    if not names.every_epoch(settings.objective, settings.base.eval.knn_k):
        # A final-only objective (--objective val_linprobe_top1, without ASHA) is absent from every earlier report;
        # Tune's strict check would stop the study at the first one. The searcher reads it from the last report.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    if not settings.verbose:
        # Tune's newer console ignores a custom reporter (ours, or the one a restored experiment pickled) and prints
        # every result; the classic one honours it.
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    if settings.resume and tune.Tuner.can_restore(path):
        # Tune keeps the experiment's own param_space (it pickled it with the experiment).
        tuner = tune.Tuner.restore(path, trainable=driver, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            driver,
            param_space=param_space,
            # Only a search or a scheduler needs the objective (Tune then requires it in every result).
            tune_config=tune.TuneConfig(metric=settings.objective if search_alg or scheduler else None,
                                        mode="max" if search_alg or scheduler else None, num_samples=num_samples,
                                        search_alg=search_alg, scheduler=scheduler,
                                        max_concurrent_trials=cluster_concurrency(settings, capacity)),
            run_config=tune.RunConfig(name=tune_name, storage_path=study_dir, callbacks=[callback],
                                      failure_config=tune.FailureConfig(max_failures=0),
                                      **_console(settings, param_space)),
        )
    return tuner.fit()


# Seconds between two of Tune's progress tables: a 15-minute study prints about 30, not one per result.
TABLE_EVERY_S = 30


def short_names(keys: list[str]) -> dict[str, str]:
    """Table headers for dotted config keys: the last part (`predictor.dt` -> `dt`) unless two share it."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: short if last.count(short) == 1 else key for key, short in zip(keys, last)}


def _console(settings: StudySettings, param_space: Mapping[str, Any]) -> dict[str, Any]:
    """Tune's console for a phase: unless --verbose, one table every TABLE_EVERY_S with the trial's epoch, the
    objective and its parameters under short names (a compare cell's method and seed); Ray's default else."""
    if settings.verbose:
        return {}
    from ray.tune import CLIReporter

    if CELL in param_space:
        parameters = {f"{CELL}/{ARM}/method": "method", f"{CELL}/seed": "seed"}
    else:
        parameters = short_names(list(param_space))
    metrics = {names.EPOCH: "epoch", settings.objective: settings.objective.removesuffix("_top1")}
    # Tables every time, explicitly: the default follows Tune's global verbosity, which the previous phase lowered.
    reporter = CLIReporter(metric_columns=metrics, parameter_columns=parameters, max_report_frequency=TABLE_EVERY_S,
                           max_column_length=12, print_intermediate_tables=True)
    return {"progress_reporter": reporter, "verbose": 1}


def describe_phase(name: str, param_space: Mapping[str, Any], runs: int, settings: StudySettings) -> str:
    """The line a phase starts with: what it trains and how many runs."""
    base = settings.base
    scale = (f"{base.optim.epochs} epochs on {base.data.subset or 'all'} {base.data.dataset} images, "
             f"{settings.resources.workers} worker(s) each")
    if CELL in param_space:
        cells = param_space[CELL]["grid_search"]
        methods = sorted({cell[ARM]["method"] for cell in cells})
        seeds = sorted({cell["seed"] for cell in cells})
        return (f"{len(cells)} of {runs} runs to go ({', '.join(methods)} on seeds {', '.join(map(str, seeds))}), "
                f"{scale}.")
    searched = ", ".join(short_names(list(param_space)).values())
    label = spec(base.method).label
    return f"up to {runs} {label} trials proposed by Optuna over {searched}, seed {base.seed}, {scale}."
