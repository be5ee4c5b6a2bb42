"""One Tune trial: its driver (a function trainable that runs one Ray Train TorchTrainer named after the trial,
so a retried or resumed driver continues that run from its checkpoint) and the MLflow callback that logs every
trial as a nested child run, found again by key on resume, never duplicated and never left RUNNING.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray.tune import Callback

from hamjepa import names, provenance, storage
from hamjepa.config import Config
from hamjepa.names import RunState
from hamjepa.redact import mask_text
from hamjepa.store_faults import Guarded
from hamjepa.study.settings import CELL, StudySettings, config_of_trial, run_key
from hamjepa.tracking import (
    DATASET_TAG,
    METHOD_TAG,
    PHASE_TAG,
    REASON_TAG,
    ROLE_TAG,
    STATUS_TAG,
    TRIAL_TAG,
    RunLogger,
    SystemMetrics,
)
from hamjepa.train.loop import make_trainer
from hamjepa.train.resources import Resources


def first_line(error: BaseException, limit: int = names.REASON_CHARS) -> str:
    """An error as one short line for a run's reason tag, credentials masked."""
    text = str(error).strip()
    return mask_text(f"{type(error).__name__}: {text.splitlines()[0][:limit]}" if text else type(error).__name__)


# -- the trial driver ---------------------------------------------------------------------------------

def trial_driver(overrides: dict[str, Any], *, base: Config, resources: Resources, storage_path: str, study_id: str,
                 objective: str, tracking_uri: str, experiment: str) -> None:
    """Tune trainable: one TorchTrainer run of base + overrides, its reports forwarded to Tune, and MLflow's system
    metrics of this node logged to the trial's child run while it trains.

    A run that fails beyond its worker restarts, or that storage could not checkpoint (train/storage_faults.py), is
    reported as `failed` with a finite worst-case `objective` (Optuna refuses NaN), so the study records it and
    goes on.
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
        with SystemMetrics(tracking_uri, experiment, f"{study_id}/{key}"):  # the callback's key for this trial
            failure = trainer.fit().return_value  # a run that ended early without an error to retry (train/loop.py)
    except TrainingFailedError as error:
        failure = {names.FAILED: 1, names.FAILURE_REASON: names.failure_reason(error)}
    if failure:
        tune.report({names.EPOCH: cfg.optim.epochs, **failure, objective: 0.0})


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
        # A store that refuses a write costs a warning, never a trial (store_faults.py); `hamjepa report` then lists
        # the runs it lacks, and a resumed study writes them.
        self.guarded = Guarded(settings.tracking_uri)

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
        self.guarded(lambda: self._logger(trial).set_tags({STATUS_TAG: RunState.RUNNING.value}))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        metrics = _our_metrics(result)
        if metrics.get(names.FAILED):  # the driver's placeholder objective (Tune needs one) is not a result
            metrics.pop(self.settings.objective, None)
        self.last[trial.trial_id] = metrics
        if names.EPOCH in metrics:
            self.guarded(lambda: self._logger(trial).log_epoch(metrics))

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = self.last.get(trial.trial_id) or _our_metrics(trial.last_result or {})
        self._close(trial, *names.classify(last, self.trial_config(trial).optim.epochs))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, RunState.FAILED, _error_reason(trial))

    def _close(self, trial, status: RunState, reason: str) -> None:
        self.guarded(self._write_close, trial, status, reason)

    def _write_close(self, trial, status: RunState, reason: str) -> None:
        logger = self._logger(trial)
        if status == RunState.FINISHED:  # its pictures; a compared run's encoder too, for reuse
            from hamjepa.train.encoder_artifact import log_run_artifacts

            key = run_key(trial.config, trial.trial_id)
            log_run_artifacts(logger, storage.join(self.train_folder, f"{self.study_id}-{key}"),
                              self.trial_config(trial), encoder=CELL in trial.config)
        logger.set_tags({STATUS_TAG: status.value, **({REASON_TAG: reason} if reason else {})})
        if not reason:  # a run an interruption had closed, reopened by --resume: its old reason no longer holds
            logger.delete_tag(REASON_TAG)
        logger.finish(status.mlflow_status)


def _error_reason(trial) -> str:
    """The last line of a trial's error, read from its error file when Tune kept one."""
    path = getattr(trial, "error_file", None)
    text = Path(path).read_text(errors="replace") if path and Path(path).is_file() else ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:names.REASON_CHARS] if lines else "the trial raised an error"
