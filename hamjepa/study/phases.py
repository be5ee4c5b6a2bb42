"""A study: Ray Tune + Optuna over HamJEPA configurations, SIGReg baselines, all logged to MLflow.

Phases, each a Tune experiment under <storage>/<study>/<invocation id>/<phase>:
1. search    HamJEPA trials proposed by Optuna (TPE, seeded, the paper's defaults first), early-stopped
             by ASHA on `epoch` unless switched off, all on the base seed. Objective: val_knn{k}_top1
             (validation split). Optuna is told how each trial really ended (FullTrialOptunaSearch).
2. compare   one grid of arms x fresh seeds (never the search's seed): the selected configuration, SIGReg
             and optionally MLP-HJEPA (the selected configuration with the leapfrog replaced). Each seed
             gives every arm the same data split, sample order, augmentation stream and encoder
             initialisation, so the comparison is paired by seed. One grid, not a phase per arm, so the
             runs pack onto the workers (3 seeds x 2 arms on 2 cores: 3 rounds, not 4).
The selected search trial itself is never compared: it won on validation, which biases it upwards.

Every trial is a Tune function trainable (the "driver") that runs one Ray Train TorchTrainer named after
the trial, so a retried or resumed driver continues that run from its checkpoint. MLflow logging lives
in a Tune callback in this process: one parent run per invocation, one child run per trial, found again
by key on resume, never duplicated and never left RUNNING.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from hamjepa import metrics as names
from hamjepa import provenance, storage
from hamjepa.config import Config, ConfigError
from hamjepa.errors import UserError
from hamjepa.methods import ABLATIONS, BASELINE, Method
from hamjepa.metrics import RunStatus
from hamjepa.redact import mask_text, mask_uri
from hamjepa.report.summary import COMPARE
from hamjepa.tracking import (
    DATASET_TAG,
    METHOD_TAG,
    PHASE_TAG,
    REASON_TAG,
    ROLE_TAG,
    STATUS_TAG,
    TRIAL_TAG,
    RunLogger,
    experiment_id,
)
from hamjepa.train.launch import DRIVER_RESOURCE
from hamjepa.train.loop import make_trainer
from hamjepa.train.resources import Resources

# How a trial's end reaches Optuna, written once. A trial ASHA stopped is PRUNED (Optuna records its last
# intermediate value, and TPE never ranks a truncated value against full-length ones); a diverged trial is
# a COMPLETE trial with the worst value (the configuration's fault: TPE learns to avoid its region); a
# failed one (an error not of the configuration's making) is FAIL and teaches TPE nothing.
OPTUNA_STATES = {
    RunStatus.FINISHED: optuna.trial.TrialState.COMPLETE,
    RunStatus.STOPPED: optuna.trial.TrialState.PRUNED,
    RunStatus.DIVERGED: optuna.trial.TrialState.COMPLETE,
    RunStatus.FAILED: optuna.trial.TrialState.FAIL,
    RunStatus.RUNNING: optuna.trial.TrialState.FAIL,
}


def optuna_outcome(status: RunStatus, value: float | None,
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


@dataclass(frozen=True)
class StudySettings:
    """Everything a study invocation needs besides its search space; validated before Ray starts."""

    name: str
    base: Config
    num_samples: int = 6
    seeds: int = 3  # paired seeds per side: the selected HamJEPA configuration and SIGReg on each
    ablation: str = ""  # "" or one of methods.ABLATIONS
    early_stopping: bool = True
    resources: Resources = field(default_factory=Resources)
    max_concurrent: int = 0  # 0 = as many trials as the cluster's resources allow
    tracking_uri: str = ""
    experiment: str = ""
    storage_path: str = ""  # "" = $HAMJEPA_STORAGE_PATH or ./ray_results
    seed: int = 0  # Optuna's sampler seed
    resume: str = ""  # "" = a new study; "latest" = this study's latest invocation; else a study id
    verbose: bool = False  # Ray's own console output (workers' logs, Tune's full tables) instead of ours
    searches: bool = True  # False for fixed runs (reproduce_paper): no objective, so no validation split needed

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise UserError(f"--num-samples = {self.num_samples} is invalid: must be an integer >= 1.")
        if self.seeds < 0:
            raise UserError(f"--seeds = {self.seeds} is invalid: must be an integer >= 0 (0 = search only).")
        if self.ablation not in ("", *ABLATIONS):
            raise UserError(f"--ablation = {self.ablation!r} is invalid: must be one of {', '.join(ABLATIONS)}.")
        if self.max_concurrent < 0:
            raise UserError(f"--max-concurrent = {self.max_concurrent} is invalid: must be >= 0 (0 = automatic).")
        if self.searches and self.base.data.val_fraction <= 0:
            raise ConfigError("config field 'data.val_fraction' = 0 is invalid for a study: the objective is "
                              "measured on the validation split, so it must be in (0, 1).")
        self.resources.check_batch(self.base)

    @property
    def experiment_name(self) -> str:
        return self.experiment or f"hamjepa-{self.name}"

    @property
    def objective(self) -> str:
        return names.objective(self.base.eval.knn_k)

    @property
    def paired_seeds(self) -> list[int]:
        """Fresh seeds for the paired comparison: never the base seed, which every search trial used."""
        return [self.base.seed + 1 + i for i in range(self.seeds)]


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


# A compare-phase trial's config: {"cell": {"arm": {overrides of one arm}, "seed": s}}. One grid over
# cells (not arms x seeds), so a resumed study can run exactly the cells that have not ended.
CELL, ARM = "cell", "arm"


def flat_overrides(trial_config: Mapping[str, Any]) -> dict[str, Any]:
    """A Tune trial's config as dotted config overrides (a compare cell's arm and seed lifted to the top)."""
    cell = trial_config.get(CELL, {})
    rest = {k: v for k, v in trial_config.items() if k != CELL}
    return {**cell.get(ARM, {}), **({"seed": cell["seed"]} if "seed" in cell else {}), **rest}


def config_of_trial(base: Config, tune_config: Mapping[str, Any]) -> Config:
    """The config a Tune trial trains: the study's base with the trial's overrides (validated by Config).

    The trial's driver and the MLflow callback each derive it from the same two values, so they agree.
    """
    return base.override(flat_overrides(tune_config))


def cell_key(method: str, seed: int) -> str:
    return f"{method}-seed{seed}"


def run_key(trial_config: Mapping[str, Any], trial_id: str) -> str:
    """A trial's stable name: a cell's method and seed (the same in every invocation that runs it, so a
    resumed cell continues its checkpoint and its MLflow run), else Tune's trial id."""
    cell = trial_config.get(CELL)
    return cell_key(cell[ARM]["method"], cell["seed"]) if cell else trial_id


def first_line(error: BaseException, limit: int = names.REASON_CHARS) -> str:
    """An error as one short line for a run's reason tag, credentials masked."""
    text = str(error).strip()
    return mask_text(f"{type(error).__name__}: {text.splitlines()[0][:limit]}" if text else type(error).__name__)


# -- the trial driver ---------------------------------------------------------------------------------

def trial_driver(overrides: dict[str, Any], *, base: Config, resources: Resources,
                 storage_path: str, study_id: str) -> None:
    """Tune trainable: one TorchTrainer run of base + overrides, its reports forwarded to Tune.

    A run that fails beyond its worker restarts is reported as `failed` with a finite worst-case objective
    (Optuna refuses NaN), so the study records it and goes on.
    """
    from ray import tune
    from ray.train import TrainingFailedError
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = config_of_trial(base, overrides)
    resources.check_batch(cfg)  # a searched optim.batch_size must split among the workers too (a failed trial)
    key = run_key(overrides, tune.get_context().get_trial_id())
    trainer = make_trainer(cfg, resources, name=f"{study_id}-{key}", storage_path=storage_path,
                           max_failures=1, callbacks=[TuneReportCallback()])
    try:
        trainer.fit()
    except TrainingFailedError as error:
        tune.report({names.EPOCH: cfg.optim.epochs, names.FAILED: 1, names.FAILURE_REASON: names.failure_reason(error),
                     names.objective(cfg.eval.knn_k): 0.0})


# -- MLflow logging from Tune -------------------------------------------------------------------------

def _our_metrics(result: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if names.is_ours(k)}


class MLflowTrialCallback(Callback):
    """One nested MLflow run per trial (key = study id + trial id), logged idempotently from Tune."""

    def __init__(self, settings: StudySettings, parent_run_id: str, study_id: str, phase: str, train_folder: str):
        self.settings, self.parent_run_id, self.study_id, self.phase = settings, parent_run_id, study_id, phase
        self.train_folder = train_folder  # where the trials' Ray Train runs keep their checkpoints
        self.loggers: dict[str, RunLogger] = {}
        self.configs: dict[str, Config] = {}
        self.last: dict[str, dict[str, Any]] = {}

    def trial_config(self, trial) -> Config:
        if trial.trial_id not in self.configs:
            self.configs[trial.trial_id] = config_of_trial(self.settings.base, trial.config)
        return self.configs[trial.trial_id]

    def _logger(self, trial) -> RunLogger:
        if trial.trial_id not in self.loggers:
            cfg = self.trial_config(trial)
            key = run_key(trial.config, trial.trial_id)
            name = f"{self.phase}-{key}" if CELL in trial.config else f"{self.phase}-{cfg.method}-{key}"
            logger = RunLogger(self.settings.tracking_uri, self.settings.experiment_name,
                               key=f"{self.study_id}/{key}", run_name=name, parent_run_id=self.parent_run_id,
                               tags={ROLE_TAG: "trial", METHOD_TAG: cfg.method, PHASE_TAG: self.phase,
                                     TRIAL_TAG: key, DATASET_TAG: cfg.data.dataset, **provenance.tags()})
            logger.start()
            logger.log_params(cfg.flatten())
            logger.log_text(cfg.to_yaml(), "config.yaml")
            self.loggers[trial.trial_id] = logger
        return self.loggers[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._logger(trial).set_tags({STATUS_TAG: RunStatus.RUNNING.value})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        metrics = _our_metrics(result)
        if metrics.get(names.FAILED):  # the driver's placeholder objective (Tune needs one) is not a result
            metrics.pop(self.settings.objective, None)
        self.last[trial.trial_id] = metrics
        if names.EPOCH in metrics:
            self._logger(trial).log_epoch(metrics)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = self.last.get(trial.trial_id) or _our_metrics(trial.last_result or {})
        self._close(trial, *names.classify(last, self.trial_config(trial).optim.epochs))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, RunStatus.FAILED, _error_reason(trial))

    def _close(self, trial, status: RunStatus, reason: str) -> None:
        logger = self._logger(trial)
        if status == RunStatus.FINISHED and CELL in trial.config:  # a compared run: its encoder, for reuse
            from hamjepa.train.encoder_artifact import log_encoder

            key = run_key(trial.config, trial.trial_id)
            log_encoder(logger, storage.join(self.train_folder, f"{self.study_id}-{key}"), self.trial_config(trial))
        logger.set_tags({STATUS_TAG: status.value, **({REASON_TAG: reason} if reason else {})})
        logger.finish(status.mlflow_status)


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
        status = RunStatus.FAILED if error or not result else names.classify(result, self.epochs)[0]
        state, value = optuna_outcome(status, result.get(self.metric) if result else None, {})
        # tell() takes no value but a COMPLETE one: a PRUNED trial gets its last intermediate value from Optuna.
        self._ot_study.tell(self._ot_trials[trial_id], value, state=state)
        self._completed_trials.add(trial_id)


def _error_reason(trial) -> str:
    """The last line of a trial's error, read from its error file when Tune kept one."""
    path = getattr(trial, "error_file", None)
    text = Path(path).read_text(errors="replace") if path and Path(path).is_file() else ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:names.REASON_CHARS] if lines else "the trial raised an error"


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
        raise UserError(f"the Ray cluster has no '{DRIVER_RESOURCE}' resource for trial drivers; start its head "
                        f"with --resources='{{\"{DRIVER_RESOURCE}\": 1000}}' (cluster/aws.yaml does).")
    r = settings.resources
    fits = int(total.get("CPU", 0) // (r.workers * r.cpus_per_worker))
    if r.gpus_per_worker > 0:
        fits = min(fits, int(total.get("GPU", 0) // (r.workers * r.gpus_per_worker)))
    if fits < 1:
        raise UserError(f"one trial needs {r.workers} x {r.cpus_per_worker} CPUs and {r.workers} x "
                        f"{r.gpus_per_worker} GPUs but the cluster has at most {total.get('CPU', 0):g} CPUs and "
                        f"{total.get('GPU', 0):g} GPUs; lower --workers-per-trial or the per-worker resources.")
    return min(fits, settings.max_concurrent) if settings.max_concurrent else fits


def run_phase(settings: StudySettings, phase: str, param_space: dict[str, Any], study_dir: str, study_id: str,
              parent_run_id: str, num_samples: int = 1, search_alg=None, scheduler=None, tune_name: str = ""):
    """Run (or, when resuming, restore and finish) one Tune experiment named `tune_name` (default: the
    phase); returns its ResultGrid."""
    from ray import tune

    train_folder = storage.join(study_dir, "train")
    driver = tune.with_resources(
        tune.with_parameters(trial_driver, base=settings.base, resources=settings.resources,
                             storage_path=train_folder, study_id=study_id),
        {DRIVER_RESOURCE: 1},
    )
    callback = MLflowTrialCallback(settings, parent_run_id, study_id, phase, train_folder)
    tune_name = tune_name or phase
    path = storage.join(study_dir, tune_name)
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
                                        max_concurrent_trials=_cluster_concurrency(settings)),
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


# -- one invocation of a study script --------------------------------------------------------------

LATEST = "latest"  # --resume without an id
POINTER_FILE = "latest.json"  # <storage>/<study name>/latest.json: the newest invocation's id, a convenience
IDENTITY_FILE = "study.json"  # <storage>/<study name>/<study id>/study.json: what the invocation was started with


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
    return f"up to {runs} HamJEPA trials proposed by Optuna over {searched}, seed {base.seed}, {scale}."


def new_study_id(name: str) -> str:
    """Unique even for two launches in the same second: a timestamp to sort by, then a random suffix."""
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _study_root(name: str, storage_path: str) -> str:
    return storage.join(storage.resolve(storage_path), name)


def _stored_identity(name: str, storage_path: str, resume: str) -> dict[str, Any]:
    """What an earlier invocation stored about itself; one sentence when there is none to resume."""
    root = _study_root(name, storage_path)
    study_id = resume
    if resume == LATEST:
        pointer = storage.read_text(storage.join(root, POINTER_FILE))
        if pointer is None:
            raise UserError(f"--resume found no earlier run of study '{name}' under '{mask_uri(root)}'; run it "
                            "once without --resume, or pass the --storage-path it used.")
        study_id = json.loads(pointer)["id"]
    text = storage.read_text(storage.join(root, study_id, IDENTITY_FILE))
    if text is None:
        raise UserError(f"--resume {study_id} found no such study of '{name}' under '{mask_uri(root)}'; pass an "
                        f"id printed by an earlier run (its folders are under that path), or --resume alone for "
                        "the latest.")
    identity = json.loads(text)
    return identity


def _refuse_changes(study_id: str, started: Mapping[str, str], now: Mapping[str, str]) -> None:
    """A resumed study must continue what it started: the same parameters, or a sentence naming the changes."""
    changed = sorted(k for k in {*started, *now} if started.get(k) != now.get(k))
    if changed:
        shown = "; ".join(f"{k} was {started.get(k, '(unset)')}, now {now.get(k, '(unset)')}" for k in changed[:5])
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        raise UserError(f"--resume {study_id}: this command differs from the one that started the study "
                        f"({shown}{more}); rerun it with the original settings, or start a new study without "
                        "--resume.")


def check_resumable(name: str, storage_path: str, resume: str, base: Config | None = None) -> None:
    """Before Ray starts: one sentence if `resume` names nothing to resume, or a study started with another
    config than `base`."""
    if not resume:
        return
    identity = _stored_identity(name, storage_path, resume)
    if base is not None:
        started = {k: v for k, v in identity["params"].items() if not k.startswith("study.")}
        _refuse_changes(identity["id"], started, _as_params(base.flatten()))


def _as_params(values: Mapping[str, Any]) -> dict[str, str]:
    """Values as MLflow records them (strings), so a stored invocation compares with a new one exactly."""
    return {k: str(v) for k, v in values.items()}


def _study_identity(settings: StudySettings, params: Mapping[str, str]) -> tuple[str, str]:
    """(study id, folder): a new invocation, or with --resume an earlier one started with the same `params`.

    Each invocation keeps its own identity file, so a new study never overwrites what an earlier one needs
    to be resumed; `latest.json` only says which is newest, and is replaced atomically.
    """
    root = _study_root(settings.name, settings.storage_path)
    if settings.resume:
        identity = _stored_identity(settings.name, settings.storage_path, settings.resume)
        _refuse_changes(identity["id"], identity["params"], params)
        return identity["id"], storage.join(root, identity["id"])
    study_id = new_study_id(settings.name)
    identity = {"id": study_id, "name": settings.name, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "params": dict(params)}
    storage.write_text(storage.join(root, study_id, IDENTITY_FILE), json.dumps(identity, indent=1))
    storage.write_text(storage.join(root, POINTER_FILE), json.dumps({"id": study_id}), atomic=True)
    return study_id, storage.join(root, study_id)


@dataclass
class StudyResult:
    study_id: str
    parent_run_id: str
    summary: Any  # what the study's report was built from
    text: str
    interrupted: bool = False
    optuna_study: Any = None  # the search's Optuna study (in memory), where the invocation searched
    experiment_id: str = ""


class Invocation:
    """One run of a study script: its id and storage folder, its MLflow parent run, and its phases.

    An interruption shows in two ways: Ctrl-C raising out of Tune, or Tune's first Ctrl-C ending fit()
    normally with the running trials stopped but not completed (our callback never closed their MLflow
    runs) and pending ones never started. Either way the remaining phases are skipped and the parent run is
    closed as KILLED, so `--resume` can pick everything up again.
    """

    def __init__(self, settings: StudySettings, params: Mapping[str, Any]):
        self.settings = settings
        params = _as_params({**params, "study.workers_per_trial": settings.resources.workers,
                             **settings.base.flatten()})
        self.study_id, self.folder = _study_identity(settings, params)
        self.parent = RunLogger(settings.tracking_uri, settings.experiment_name, key=f"study/{self.study_id}",
                                run_name=self.study_id,
                                tags={ROLE_TAG: "study", "hamjepa.study": settings.name, **provenance.tags()})
        self.parent_id = self.parent.start()
        self.experiment_id = experiment_id(self.parent.client, settings.experiment_name)
        self.parent.log_params(params)
        self.parent.log_text(settings.base.to_yaml(), "base_config.yaml")
        self.parent.set_tags({STATUS_TAG: RunStatus.RUNNING.value})
        self.interrupted = False
        if settings.resume:
            self._close_open_children("interrupted; continued by a resumed invocation where its trial is")

    def __enter__(self) -> Invocation:
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        """Any error closes the study's runs, FAILED with the error's first line (KILLED for a Ctrl-C that got
        past the phases, e.g. while summarising): none is left RUNNING."""
        if error is None:
            return False
        interrupted = isinstance(error, KeyboardInterrupt)
        reason = "interrupted" if interrupted else first_line(error)
        status = "KILLED" if interrupted else "FAILED"
        self._close_open_children(f"the study stopped: {reason}", status=status)
        self.parent.set_tags({STATUS_TAG: "interrupted" if interrupted else RunStatus.FAILED.value,
                              REASON_TAG: reason})
        self.parent.finish(status)
        return False

    def phase_done(self, name: str, expected: int) -> bool:
        """Whether `name` already has `expected` ended runs (a resumed study skips it)."""
        return len(self.ended(name)) >= expected

    def ended(self, phase: str) -> list:
        """The phase's runs that ended (FINISHED or FAILED in MLflow); KILLED ones were cut short."""
        return [r for r in self.records() if r.phase == phase and r.run_status in ("FINISHED", "FAILED")]

    def run_phase(self, name: str, param_space: dict[str, Any], expected: int, **kwargs) -> None:
        """Run one phase unless the invocation was interrupted; `expected` = how many trials it should end with."""
        if self.interrupted:
            return
        print(f"\n[{self.study_id}] {name}: {describe_phase(name, param_space, expected, self.settings)}",
              flush=True)
        try:
            run_phase(self.settings, name, param_space, self.folder, self.study_id, self.parent_id, **kwargs)
        except KeyboardInterrupt:
            self.interrupted = True
            return
        runs = [r for r in self.records() if r.phase == name]
        self.interrupted = (len(self.ended(name)) < expected
                            or any(r.run_status == "RUNNING" for r in runs))

    def run_cells(self, phase: str, cells: list[dict[str, Any]]) -> None:
        """Run a phase of fixed cells ({"arm": overrides, "seed": s}), only those without an ended run.

        A cell's run is named after its method and seed (`run_key`), so a resumed invocation continues a cut
        cell's checkpoint and MLflow run and never repeats an ended one, whatever Tune had saved.
        """
        from ray import tune

        ended = {cell_key(r.method, r.seed) for r in self.ended(phase)}
        remaining = [cell for cell in cells if run_key({CELL: cell}, "") not in ended]
        if remaining and not self.interrupted:
            # A fresh Tune experiment each invocation: Tune's own restore could lose a cell it had not created.
            name = phase if not self.settings.resume else f"{phase}-resumed-{secrets.token_hex(3)}"
            self.run_phase(phase, {CELL: tune.grid_search(remaining)}, len(cells), tune_name=name)

    def records(self):
        from hamjepa.report.summary import collect_runs

        return collect_runs(self.parent.client, self.experiment_id, self.parent_id)

    def finish(self, summary: Any, text: str, artifacts: Mapping[str, str]) -> StudyResult:
        """Close the parent run: KILLED with a resume hint when interrupted, else log `artifacts` and FINISHED."""
        if self.interrupted:
            self.parent.set_tags({STATUS_TAG: "interrupted"})
            self.parent.finish("KILLED")
            text += f"Interrupted: continue with the same command and --resume (study {self.study_id}).\n"
            return StudyResult(self.study_id, self.parent_id, summary, text, interrupted=True,
                               experiment_id=self.experiment_id)
        self._close_stale_children()
        for name, content in artifacts.items():
            self.parent.log_text(content, name)
        self.parent.set_tags({STATUS_TAG: "finished"})
        self.parent.finish("FINISHED")
        return StudyResult(self.study_id, self.parent_id, summary, text, experiment_id=self.experiment_id)

    def _close_stale_children(self) -> None:
        """Runs still RUNNING after every phase ended belong to nothing alive."""
        self._close_open_children("interrupted and not resumed")

    def _close_open_children(self, reason: str, status: str = "KILLED") -> None:
        client = self.parent.client
        for record in self.records():
            if record.run_status == "RUNNING":
                client.set_tag(record.run_id, STATUS_TAG, RunStatus.FAILED.value)
                client.set_tag(record.run_id, REASON_TAG, reason)
                client.set_terminated(record.run_id, status=status)


# -- the search study ---------------------------------------------------------------------------------

def _search_algorithm(settings: StudySettings, space: Mapping[str, Any], study_id: str,
                      initial_points: list[dict[str, Any]]) -> FullTrialOptunaSearch:
    points = [defaults_point(space, settings.base), *initial_points]
    return FullTrialOptunaSearch(metric=settings.objective, mode="max", points_to_evaluate=points,
                                 sampler=optuna.samplers.TPESampler(seed=settings.seed), study_name=study_id,
                                 epochs=settings.base.optim.epochs)


# ASHA's rungs: the first after a quarter of the epochs (earlier, a trial's objective is mostly its
# initialisation), and half the trials continue at each rung.
ASHA_FIRST_RUNG_DIVISOR = 4
ASHA_KEEP_ONE_IN = 2


def _scheduler(settings: StudySettings):
    if not settings.early_stopping:
        return None
    from ray.tune.schedulers import ASHAScheduler

    epochs = settings.base.optim.epochs
    # Driver retries restart Tune's training_iteration, so the time axis is our own `epoch` metric.
    return ASHAScheduler(time_attr=names.EPOCH, max_t=epochs, grace_period=max(1, epochs // ASHA_FIRST_RUNG_DIVISOR),
                         reduction_factor=ASHA_KEEP_ONE_IN)


def comparison_cells(settings: StudySettings, selected: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The compare phase's runs: every arm on every paired seed, seed by seed (an interrupted comparison has
    whole pairs first)."""
    arms = [{"method": BASELINE.value}]
    if selected is not None:
        arms.insert(0, {**selected, "method": Method.HAMJEPA.value})
        if settings.ablation:
            arms.append({**selected, "method": settings.ablation})
    return [{ARM: arm, "seed": seed} for seed in settings.paired_seeds for arm in arms]


def run_study(settings: StudySettings, space: Mapping[str, Any],
              initial_points: list[dict[str, Any]] | None = None) -> StudyResult:
    """Search, then the paired comparison (selected HamJEPA, SIGReg, optional ablation); log; summarise.

    Optuna evaluates the base config's values first, then `initial_points` (each must set every searched
    key), then its own proposals. A resumed study skips a phase whose runs have all ended.
    """
    initial_points = list(initial_points or [])
    validate_search_space(space, settings.base)
    for point in initial_points:
        if set(point) != set(space):
            raise UserError(f"initial point {point} is invalid: it must set exactly the searched keys "
                            f"{', '.join(space)}.")
        settings.base.override(point)
    with Invocation(settings, {"study.num_samples": settings.num_samples, "study.seeds": settings.seeds,
                               "study.paired_seeds": ",".join(map(str, settings.paired_seeds)),
                               "study.early_stopping": settings.early_stopping, "study.seed": settings.seed,
                               "study.search_keys": ",".join(space), "study.ablation": settings.ablation}) as study:
        searcher = _search_algorithm(settings, space, study.study_id, initial_points)
        try:
            _search_then_compare(study, space, searcher)
        except KeyboardInterrupt:  # outside a phase (e.g. while the next one is planned): the same as inside
            study.interrupted = True
        result = _summarise(study, space)
    result.optuna_study = searcher.study
    return result


def _search_then_compare(study: Invocation, space: Mapping[str, Any], searcher: FullTrialOptunaSearch) -> None:
    from hamjepa.report.summary import select_trial

    settings = study.settings
    if not study.phase_done("search", settings.num_samples):
        study.run_phase("search", dict(space), settings.num_samples, num_samples=settings.num_samples,
                        search_alg=searcher, scheduler=_scheduler(settings))
    if study.interrupted:
        return
    selected = select_trial(study.records(), settings.objective)
    overrides = {k: typed_param(settings.base, k, selected.params[k]) for k in space} if selected else None
    study.run_cells(COMPARE, comparison_cells(settings, overrides))


def _summarise(study: Invocation, space: Mapping[str, Any]) -> StudyResult:
    """The study's summary (and, once complete, Optuna's views of the search) logged on the parent run."""
    from hamjepa.report.search_views import search_views
    from hamjepa.report.summary import summarize, theory_plots, to_csv, to_markdown

    settings = study.settings
    records = study.records()
    summary = summarize(records, list(space), settings.base)
    if not study.interrupted:
        # Optuna's own views of the search, and the search as an Optuna study file, rebuilt from MLflow.
        with tempfile.TemporaryDirectory() as folder:
            views = search_views(records, space, settings.base, study.parent.client, settings.objective,
                                 study.study_id, Path(folder))
            study.parent.log_artifact(views.database)
            for path in [*views.plots, *theory_plots(records, settings.base, Path(folder))]:
                study.parent.log_artifact(path, "plots")
        summary.notes = views.notes
        study.parent.log_metrics(summary.parent_metrics(), step=0)
    text = to_markdown(summary)
    return study.finish(summary, text, {"summary.md": text, "summary.csv": to_csv(summary)})


def typed_param(base: Config, key: str, text: str) -> Any:
    """An MLflow param (a string) back to the config field's type."""
    return base.override({key: text}).flatten()[key]
