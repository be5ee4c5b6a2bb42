"""A study: Ray Tune + Optuna over HamJEPA configurations, SIGReg baselines, all logged to MLflow.

Phases, each a Tune experiment under <storage>/<study>/<invocation id>/<phase>:
1. search    HamJEPA trials proposed by Optuna (TPE, seeded, the paper's defaults first), early-stopped
             by ASHA on `epoch` unless switched off. Objective: val_knn20_top1 (validation split).
2. confirm   the best configuration retrained on the remaining seeds, so both sides have `seeds` runs.
3. baseline  SIGReg, one run per seed, same protocol.
4. ablation  optional MLP-HJEPA runs (the best configuration with the leapfrog replaced).

Every trial is a Tune function trainable (the "driver") that runs one Ray Train TorchTrainer named after
the trial, so a retried or resumed driver continues that run from its checkpoint. MLflow logging lives
in a Tune callback in this process: one parent run per invocation, one child run per trial, found again
by key on resume, never duplicated and never left RUNNING.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune import Callback

from . import storage
from .config import Config, ConfigError, from_dict
from .report import OBJECTIVE
from .run import DRIVER_RESOURCE
from .tracking import METHOD_TAG, ROLE_TAG, RunLogger, experiment_id
from .training import Resources, make_trainer

# Metrics of ours in a Tune result (Tune adds its own bookkeeping keys, which MLflow does not need).
_OUR_PREFIXES = ("epoch", "train/", "val_", "test_", "effective_rank", "participation_ratio", "diverged",
                 "failed", "resumed_from_epoch", "nodes", "device")
PHASE_TAG = "hamjepa.phase"
TRIAL_TAG = "hamjepa.trial_id"
STATUS_TAG = "hamjepa.status"
REASON_TAG = "hamjepa.reason"


@dataclass(frozen=True)
class StudySettings:
    """Everything a study invocation needs besides its search space; validated before Ray starts."""

    name: str
    base: Config
    num_samples: int = 6
    seeds: int = 2  # SIGReg baseline seeds; the best HamJEPA configuration is retrained to match
    ablation: str = ""  # "" or "mlp"
    early_stopping: bool = True
    resources: Resources = field(default_factory=Resources)
    max_concurrent: int = 0  # 0 = as many trials as the cluster's resources allow
    tracking_uri: str = ""
    experiment: str = ""
    storage_path: str = ""  # "" = $HAMJEPA_STORAGE_PATH or ./ray_results
    seed: int = 0  # Optuna's sampler seed
    resume: bool = False
    searches: bool = True  # False for fixed runs (reproduce_paper): no objective, so no validation split needed

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ConfigError(f"--num-samples = {self.num_samples} is invalid: must be an integer >= 1.")
        if self.seeds < 0:
            raise ConfigError(f"--baseline-seeds = {self.seeds} is invalid: must be an integer >= 0.")
        if self.ablation not in ("", "mlp"):
            raise ConfigError(f"--ablation = {self.ablation!r} is invalid: the only ablation is 'mlp'.")
        if self.max_concurrent < 0:
            raise ConfigError(f"--max-concurrent = {self.max_concurrent} is invalid: must be >= 0 (0 = automatic).")
        if self.searches and self.base.data.val_fraction <= 0:
            raise ConfigError("config field 'data.val_fraction' = 0 is invalid for a study: the objective is "
                              "measured on the validation split, so it must be in (0, 1).")
        self.resources.validate(self.base)

    @property
    def experiment_name(self) -> str:
        return self.experiment or f"hamjepa-{self.name}"


# -- search spaces are data ---------------------------------------------------------------------------

def validate_search_space(space: Mapping[str, Any], base: Config) -> None:
    """Every key must be a config field, and the base config must accept a value from each domain."""
    for key, domain in space.items():
        sample = domain.sample() if hasattr(domain, "sample") else domain
        base.override({key: sample})  # raises ConfigError naming an unknown or invalid key


def defaults_point(space: Mapping[str, Any], base: Config) -> dict[str, Any]:
    """The base config's values of the searched keys: Optuna evaluates the paper's defaults first."""
    flat = base.flatten()
    return {key: flat[key] for key in space}


# -- the trial driver ---------------------------------------------------------------------------------

def trial_driver(overrides: dict[str, Any], *, base: dict[str, Any], resources: Resources,
                 storage_path: str, study_id: str) -> None:
    """Tune trainable: one TorchTrainer run of base + overrides, its reports forwarded to Tune.

    A run that fails beyond its worker restarts is reported as `failed` with a finite worst-case objective
    (Optuna refuses NaN), so the study records it and goes on.
    """
    from ray import tune
    from ray.train import TrainingFailedError
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = from_dict(base).override(overrides)
    trial_id = tune.get_context().get_trial_id()
    trainer = make_trainer(cfg, resources, name=f"{study_id}-{trial_id}", storage_path=storage_path,
                           max_failures=1, callbacks=[TuneReportCallback()])
    try:
        trainer.fit()
    except TrainingFailedError as error:
        reason = str(error).strip().splitlines()[-1][:300] if str(error).strip() else type(error).__name__
        tune.report({"epoch": cfg.optim.epochs, "failed": 1, "failure_reason": reason, OBJECTIVE: 0.0})


# -- MLflow logging from Tune -------------------------------------------------------------------------

def _ours(result: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k.startswith(_OUR_PREFIXES) or k.endswith("_reason")}


class MLflowTrialCallback(Callback):
    """One nested MLflow run per trial (key = study id + trial id), logged idempotently from Tune."""

    def __init__(self, settings: StudySettings, parent_run_id: str, study_id: str, phase: str,
                 base_overrides: Mapping[str, Any] | None = None):
        self.settings, self.parent_run_id, self.study_id, self.phase = settings, parent_run_id, study_id, phase
        self.base_overrides = dict(base_overrides or {})
        self.loggers: dict[str, RunLogger] = {}
        self.last: dict[str, dict[str, Any]] = {}

    def trial_config(self, trial) -> Config:
        return self.settings.base.override({**self.base_overrides, **trial.config})

    def _logger(self, trial) -> RunLogger:
        if trial.trial_id not in self.loggers:
            cfg = self.trial_config(trial)
            logger = RunLogger(self.settings.tracking_uri, self.settings.experiment_name,
                               key=f"{self.study_id}/{trial.trial_id}",
                               run_name=f"{self.phase}-{cfg.method}-{trial.trial_id}", parent_run_id=self.parent_run_id,
                               tags={ROLE_TAG: "trial", METHOD_TAG: cfg.method, PHASE_TAG: self.phase,
                                     TRIAL_TAG: trial.trial_id})
            logger.start()
            logger.log_params(cfg.flatten())
            logger.log_text(cfg.to_yaml(), "config.yaml")
            self.loggers[trial.trial_id] = logger
        return self.loggers[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._logger(trial).set_tags({STATUS_TAG: "running"})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        metrics = _ours(result)
        self.last[trial.trial_id] = metrics
        if "epoch" in metrics:
            self._logger(trial).log_epoch(metrics)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = self.last.get(trial.trial_id) or _ours(trial.last_result or {})
        status, reason = trial_outcome(last, self.trial_config(trial).optim.epochs)
        self._close(trial, status, reason)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, "failed", _error_reason(trial))

    def _close(self, trial, status: str, reason: str) -> None:
        logger = self._logger(trial)
        logger.set_tags({STATUS_TAG: status, **({REASON_TAG: reason} if reason else {})})
        logger.finish("FINISHED" if status in ("finished", "stopped") else "FAILED")


def _error_reason(trial) -> str:
    """The last line of a trial's error, read from its error file when Tune kept one."""
    path = getattr(trial, "error_file", None)
    text = Path(path).read_text(errors="replace") if path and Path(path).is_file() else ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else "the trial raised an error"


def trial_outcome(last: Mapping[str, Any], epochs: int) -> tuple[str, str]:
    """(status, reason) of a completed trial from its last result: finished, stopped early, diverged, failed."""
    if last.get("failed"):
        return "failed", str(last.get("failure_reason", ""))
    if last.get("diverged"):
        return "diverged", str(last.get("diverged_reason", ""))
    if int(last.get("epoch", 0)) < epochs:
        return "stopped", f"stopped early by ASHA after epoch {int(last.get('epoch', 0))}"
    return "finished", ""


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


def _cluster_concurrency(settings: StudySettings) -> int:
    """How many trials fit at once: workers' CPUs (and GPUs) against the cluster's capacity."""
    total = cluster_capacity()
    if DRIVER_RESOURCE not in total:
        raise ConfigError(f"the Ray cluster has no '{DRIVER_RESOURCE}' resource for trial drivers; start its head "
                          f"with --resources='{{\"{DRIVER_RESOURCE}\": 1000}}' (cluster/aws.yaml does).")
    r = settings.resources
    fits = int(total.get("CPU", 0) // (r.workers * r.cpus_per_worker))
    if r.gpus_per_worker > 0:
        fits = min(fits, int(total.get("GPU", 0) // (r.workers * r.gpus_per_worker)))
    if fits < 1:
        raise ConfigError(f"one trial needs {r.workers} x {r.cpus_per_worker} CPUs and {r.workers} x "
                          f"{r.gpus_per_worker} GPUs but the cluster has at most {total.get('CPU', 0):g} CPUs and "
                          f"{total.get('GPU', 0):g} GPUs; lower --workers-per-trial or the per-worker resources.")
    return min(fits, settings.max_concurrent) if settings.max_concurrent else fits


def run_phase(settings: StudySettings, phase: str, param_space: dict[str, Any], study_dir: str, study_id: str,
              parent_run_id: str, num_samples: int = 1, search_alg=None, scheduler=None,
              base_overrides: Mapping[str, Any] | None = None):
    """Run (or, when resuming, restore and finish) one Tune experiment; returns its ResultGrid."""
    from ray import tune

    base = settings.base.override(dict(base_overrides or {}))
    driver = tune.with_resources(
        tune.with_parameters(trial_driver, base=base.to_dict(), resources=settings.resources,
                             storage_path=storage.join(study_dir, "train"), study_id=study_id),
        {DRIVER_RESOURCE: 1},
    )
    callback = MLflowTrialCallback(settings, parent_run_id, study_id, phase, base_overrides)
    path = storage.join(study_dir, phase)
    if settings.resume and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=driver, param_space=param_space, resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = tune.Tuner(
            driver,
            param_space=param_space,
            # Only a search or a scheduler needs the objective (Tune then requires it in every result).
            tune_config=tune.TuneConfig(metric=OBJECTIVE if search_alg or scheduler else None,
                                        mode="max" if search_alg or scheduler else None, num_samples=num_samples,
                                        search_alg=search_alg, scheduler=scheduler,
                                        max_concurrent_trials=_cluster_concurrency(settings)),
            run_config=tune.RunConfig(name=phase, storage_path=study_dir, callbacks=[callback],
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    return tuner.fit()


def grid_size(param_space: Mapping[str, Any]) -> int:
    """How many trials a param space of grid searches expands to."""
    return math.prod(len(v["grid_search"]) for v in param_space.values() if isinstance(v, dict) and "grid_search" in v)


# -- one invocation of a study script --------------------------------------------------------------

def _study_identity(settings: StudySettings) -> tuple[str, str]:
    """A new invocation id, or with --resume the latest invocation of this study under the storage path."""
    root = storage.join(storage.resolve(settings.storage_path), settings.name)
    pointer = storage.join(root, "latest.json")
    if settings.resume:
        text = storage.read_text(pointer)
        if text is None:
            raise ConfigError(f"--resume found no earlier run of study '{settings.name}' under '{root}'; "
                              "run it once without --resume, or pass the --storage-path it used.")
        study_id = json.loads(text)["id"]
    else:
        study_id = f"{settings.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        storage.write_text(pointer, json.dumps({"id": study_id}))
    return study_id, storage.join(root, study_id)


@dataclass
class StudyResult:
    study_id: str
    parent_run_id: str
    summary: Any  # what the study's report was built from
    text: str
    interrupted: bool = False


class Invocation:
    """One run of a study script: its id and storage folder, its MLflow parent run, and its phases.

    An interruption shows in two ways: Ctrl-C raising out of Tune, or Tune's first Ctrl-C ending fit()
    normally with the running trials stopped but not completed (our callback never closed their MLflow
    runs) and pending ones never started. Either way the remaining phases are skipped and the parent run is
    closed as KILLED, so `--resume` can pick everything up again.
    """

    def __init__(self, settings: StudySettings, params: Mapping[str, Any]):
        self.settings = settings
        self.study_id, self.folder = _study_identity(settings)
        self.parent = RunLogger(settings.tracking_uri, settings.experiment_name, key=f"study/{self.study_id}",
                                run_name=self.study_id, tags={ROLE_TAG: "study", "hamjepa.study": settings.name})
        self.parent_id = self.parent.start()
        self.experiment_id = experiment_id(self.parent.client, settings.experiment_name)
        self.parent.log_params({**params, "study.workers_per_trial": settings.resources.workers,
                                **settings.base.flatten()})
        self.parent.log_text(settings.base.to_yaml(), "base_config.yaml")
        self.interrupted = False

    def run_phase(self, name: str, param_space: dict[str, Any], expected: int, **kwargs) -> None:
        """Run one phase unless the invocation was interrupted; `expected` = how many trials it should end with."""
        if self.interrupted:
            return
        try:
            run_phase(self.settings, name, param_space, self.folder, self.study_id, self.parent_id, **kwargs)
        except KeyboardInterrupt:
            self.interrupted = True
            return
        runs = [r for r in self.records() if r.phase == name]
        self.interrupted = len(runs) < expected or any(r.status == "running" for r in runs)

    def records(self):
        from .report import collect_runs

        return collect_runs(self.parent.client, self.experiment_id, self.parent_id)

    def finish(self, summary: Any, text: str, artifacts: Mapping[str, str]) -> StudyResult:
        """Close the parent run: KILLED with a resume hint when interrupted, else log `artifacts` and FINISHED."""
        if self.interrupted:
            self.parent.set_tags({STATUS_TAG: "interrupted"})
            self.parent.finish("KILLED")
            text += f"Interrupted: continue with the same command and --resume (study {self.study_id}).\n"
            return StudyResult(self.study_id, self.parent_id, summary, text, interrupted=True)
        self._close_stale_children()
        for name, content in artifacts.items():
            self.parent.log_text(content, name)
        self.parent.set_tags({STATUS_TAG: "finished"})
        self.parent.finish("FINISHED")
        return StudyResult(self.study_id, self.parent_id, summary, text)

    def _close_stale_children(self) -> None:
        """Runs still RUNNING after every phase ended belong to nothing alive: mark them KILLED."""
        client = self.parent.client
        for record in self.records():
            if record.run_status == "RUNNING":
                client.set_tag(record.run_id, STATUS_TAG, "failed")
                client.set_tag(record.run_id, REASON_TAG, "interrupted and not resumed")
                client.set_terminated(record.run_id, status="KILLED")


# -- the search study ---------------------------------------------------------------------------------

def _search_algorithm(settings: StudySettings, space: Mapping[str, Any], study_id: str,
                      initial_points: list[dict[str, Any]]):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    points = [defaults_point(space, settings.base), *initial_points]
    return OptunaSearch(metric=OBJECTIVE, mode="max", points_to_evaluate=points,
                        sampler=optuna.samplers.TPESampler(seed=settings.seed), study_name=study_id)


def _scheduler(settings: StudySettings):
    if not settings.early_stopping:
        return None
    from ray.tune.schedulers import ASHAScheduler

    epochs = settings.base.optim.epochs
    # Driver retries restart Tune's training_iteration, so the time axis is our own `epoch` metric.
    return ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=max(1, epochs // 4), reduction_factor=2)


def run_study(settings: StudySettings, space: Mapping[str, Any],
              initial_points: list[dict[str, Any]] | None = None) -> StudyResult:
    """Search, confirm, baseline and (optionally) ablate; log everything; return the summary.

    Optuna evaluates the base config's values first, then `initial_points` (each must set every searched
    key), then its own proposals.
    """
    from ray import tune

    from .report import objective_plots, summarize, to_csv, to_markdown

    validate_search_space(space, settings.base)
    initial_points = list(initial_points or [])
    for point in initial_points:
        if set(point) != set(space):
            raise ConfigError(f"initial point {point} is invalid: it must set exactly the searched keys "
                              f"{', '.join(space)}.")
        settings.base.override(point)
    study = Invocation(settings, {"study.num_samples": settings.num_samples, "study.seeds": settings.seeds,
                                  "study.early_stopping": settings.early_stopping, "study.seed": settings.seed,
                                  "study.search_keys": ",".join(space)})
    try:
        study.run_phase("search", dict(space), settings.num_samples, num_samples=settings.num_samples,
                        search_alg=_search_algorithm(settings, space, study.study_id, initial_points),
                        scheduler=_scheduler(settings))
        best = summarize(study.records(), list(space)).best
        best_overrides = {k: _typed(settings.base, k, best.params[k]) for k in space} if best else {}
        plan = []
        if best and settings.seeds > 1:
            plan.append(("confirm", {**best_overrides, "seed": tune.grid_search(list(range(1, settings.seeds)))}))
        if settings.seeds > 0:
            plan.append(("baseline", {"method": "sigreg", "seed": tune.grid_search(list(range(settings.seeds)))}))
        if settings.ablation:
            plan.append(("ablation", {**best_overrides, "method": settings.ablation,
                                      "seed": tune.grid_search(list(range(max(1, settings.seeds))))}))
        for name, param_space in plan:
            study.run_phase(name, param_space, grid_size(param_space))
    except KeyboardInterrupt:  # outside a phase (e.g. while the next one is planned): the same as inside
        study.interrupted = True

    records = study.records()
    summary = summarize(records, list(space))
    if not study.interrupted:
        sigreg_objective = next(cells["SIGReg"].mean for label, cells, _ in summary.rows if label == "val kNN@20")
        with tempfile.TemporaryDirectory() as folder:
            for path in objective_plots(records, list(space), Path(folder), baseline=sigreg_objective):
                study.parent.log_artifact(path, "plots")
        for label, _, delta in summary.rows:
            if math.isfinite(delta):
                study.parent.log_metrics({f"delta/{label.replace(' ', '_').replace('@', '')}": delta}, step=0)
        if summary.best:
            study.parent.log_metrics({f"best/{OBJECTIVE}": summary.best.metrics[OBJECTIVE]}, step=0)
    text = to_markdown(summary)
    return study.finish(summary, text, {"summary.md": text, "summary.csv": to_csv(summary)})


def _typed(base: Config, key: str, text: str) -> Any:
    """An MLflow param (a string) back to the config field's type."""
    return base.override({key: text}).flatten()[key]
