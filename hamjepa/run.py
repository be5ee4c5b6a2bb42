"""One logged training run: Ray up, a TorchTrainer, an MLflow run with per-epoch metrics, a summary.

This is what `hamjepa train` does; it checks every input (config, data, tracking store, Ray address)
before any work starts, so a mistake costs one sentence, not a traceback minutes later.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import metrics as names
from .config import Config, ConfigError
from .metrics import RunStatus
from .redact import mask_uri
from .tracking import METHOD_TAG, REASON_TAG, ROLE_TAG, STATUS_TAG, RunLogger, resolve_tracking_uri
from .training import FailureInjection, Resources, make_trainer

DRIVER_RESOURCE = "trial_driver"  # custom resource held by a study's trial drivers (see connect_ray)


def mlflow_epoch_callback(logger: RunLogger):
    """A Ray Train UserCallback (runs in the controller) that logs rank 0's report of every epoch."""
    from ray.train import UserCallback

    class MLflowEpochCallback(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and names.EPOCH in metrics[0]:
                logger.log_epoch(metrics[0])

    return MLflowEpochCallback()


@dataclass
class RunOutcome:
    status: RunStatus
    metrics: dict[str, Any]
    run_id: str
    reason: str = ""


def preflight(cfg: Config) -> None:
    """Fail fast, before Ray starts: the data must be there and large enough for one batch."""
    from .data import load_splits

    splits = load_splits(cfg.data, channels=cfg.encoder.in_channels)
    if len(splits.train) < cfg.optim.batch_size:
        raise ConfigError(f"config field 'optim.batch_size' = {cfg.optim.batch_size} is invalid: the training "
                         f"split has only {len(splits.train)} images; lower it or raise data.subset.")


def connect_ray(address: str | None) -> None:
    """Join a running cluster (`auto`, `ray://...`, `host:port`) or start a local Ray sized to this machine."""
    import ray

    if ray.is_initialized():
        return
    try:
        if address:
            ray.init(address=address)
        else:
            # The dashboard stays on: Ray's State API lives there, and without it stopped trials leak their
            # placement groups (FIELD-NOTES.md). Trial drivers hold a custom resource, not a CPU, so a
            # study's trainers get every core (study.DRIVER_RESOURCE).
            ray.init(resources={DRIVER_RESOURCE: 10_000})
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f"address '{address}'" if address else "a local Ray instance"
        raise ConfigError(f"cannot connect to {where} ({str(error).splitlines()[0]}); check --address, or "
                         "omit it to start a local Ray.") from None


def train_and_log(cfg: Config, resources: Resources, *, experiment: str, run_name: str | None = None,
                  tracking_uri: str | None = None, storage_path: str | None = None, max_failures: int = 2,
                  tags: Mapping[str, str] | None = None, failure: FailureInjection | None = None) -> RunOutcome:
    """Train once under Ray Train and log it as one MLflow run (found again by its name on a rerun)."""
    from ray.train import TrainingFailedError

    uri = resolve_tracking_uri(tracking_uri)
    run_name = run_name or f"{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    logger = RunLogger(uri, experiment, key=run_name, tags={ROLE_TAG: "run", METHOD_TAG: cfg.method, **(tags or {})})
    logger.start()
    logger.log_params(cfg.flatten())
    logger.log_text(cfg.to_yaml(), "config.yaml")
    trainer = make_trainer(cfg, resources, name=run_name, storage_path=storage_path, max_failures=max_failures,
                           callbacks=[mlflow_epoch_callback(logger)], failure=failure)
    try:
        result = trainer.fit()
        # The last report, over everything MLflow logged (the epoch-0 `init/` readouts are only in epoch 0's report).
        metrics = {**logger.client.get_run(logger.run_id).data.metrics, **(result.metrics or {})}
    except TrainingFailedError as error:
        metrics = {names.FAILED: 1, names.FAILURE_REASON: str(error).strip().splitlines()[-1][:500]}
    status, reason = names.classify(metrics, cfg.optim.epochs)
    logger.set_tags({STATUS_TAG: status.value, **({REASON_TAG: reason} if reason else {})})
    logger.finish(status.mlflow_status)
    return RunOutcome(status, metrics if status is not RunStatus.FAILED else {}, logger.run_id, reason)


def summary(cfg: Config, outcome: RunOutcome, tracking_uri: str) -> str:
    """A one-screen summary: status, throughput, and accuracies (percent) per readout."""
    k = cfg.eval.knn_k
    metrics = outcome.metrics
    reason = f" ({outcome.reason})" if outcome.reason else ""
    lines = [f"{cfg.method} on {cfg.data.dataset}: {outcome.status.value}{reason}"]
    if names.EPOCH in metrics:
        lines.append(f"  epochs {metrics[names.EPOCH]}/{cfg.optim.epochs}, final loss "
                     f"{metrics.get(names.TRAIN + 'loss', math.nan):.4f}, "
                     f"{metrics.get(names.IMAGES_PER_S, 0):.0f} images/s, val kNN@{k} (objective) "
                     f"{metrics.get(names.objective(k), math.nan):.2f}")
    columns = [names.accuracy("val", names.knn(k)), names.accuracy("val", "linprobe_top1"),
               names.accuracy("test", names.knn(k)), names.accuracy("test", "linprobe_top1"),
               names.accuracy("test", "linprobe_top5"), "effective_rank"]
    readouts = names.READOUTS[cfg.method]
    if any(f"{columns[2]}_{r}" in metrics for r in readouts):
        lines.append("  readout " + "".join(f"{c.replace('_top1', '').replace('_top5', '@5'):>16s}" for c in columns))
        for r in readouts:
            cells = "".join(f"{metrics.get(f'{c}_{r}', math.nan):16.2f}" for c in columns)
            lines.append(f"  {r:7s} {cells}")
        at_init = names.init(f"{columns[2]}_{readouts[0]}")
        if at_init in metrics:
            lines.append(f"  at initialisation: test kNN@{k} ({readouts[0]}) {metrics[at_init]:.2f}, linear probe "
                         f"{metrics.get(names.init(f'{columns[3]}_{readouts[0]}'), math.nan):.2f}")
    lines.append(f"  MLflow run {outcome.run_id}: mlflow ui --backend-store-uri {mask_uri(tracking_uri)}")
    return "\n".join(lines)
