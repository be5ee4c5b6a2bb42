"""Launching one logged training run: checks before Ray, Ray up, a TorchTrainer, an MLflow run with per-epoch
metrics, a summary. (`train.loop` is the loop the workers run; `study` launches many runs through Tune.)

This is what `hamjepa train` does; it checks every input (config, data, tracking store, Ray address)
before any work starts, so a mistake costs one sentence, not a traceback minutes later.
"""

from __future__ import annotations

import math
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hamjepa import names, provenance, storage
from hamjepa.checks import resolve_ray_address, resolve_tracking_uri
from hamjepa.config import Config, ConfigError
from hamjepa.errors import UserError
from hamjepa.names import RunState
from hamjepa.redact import mask_uri
from hamjepa.store_faults import REFUSED, Guarded, quiet_store_tracebacks
from hamjepa.tracking import DATASET_TAG, METHOD_TAG, ROLE_TAG, RunLogger, SystemMetrics
from hamjepa.train import run_record
from hamjepa.train.loop import QUIET_WORKERS, make_trainer
from hamjepa.train.resources import Resources
from hamjepa.train.run_record import RunRecord

# A study's trial drivers hold one unit of this custom resource where a cluster offers it (cluster/aws.yaml's head),
# else DRIVER_MEMORY_BYTES of Ray's `memory` resource, which every node has (study.phases.driver_resources).
DRIVER_RESOURCE = "trial_driver"
DRIVER_MEMORY_BYTES = 256 * 1024**2  # about what a driver process (Tune trainable + Train controller client) uses


def progress_line(metrics: Mapping[str, Any], epochs: int) -> str:
    """One epoch's report as a console line: where the run is, its loss, its objective, its speed."""
    parts = [f"epoch {int(metrics[names.EPOCH])}/{epochs}"]
    loss = metrics.get(names.TRAIN + "loss")
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    parts += [f"{key} {value:.2f}" for key, value in metrics.items() if key.startswith("val_knn") and "_" not in
              key.removeprefix("val_knn").removesuffix("_top1")]
    if names.IMAGES_PER_S in metrics:
        parts.append(f"{metrics[names.IMAGES_PER_S]:.0f} images/s")
    if names.DATA_WAIT_FRACTION in metrics:
        parts.append(f"data wait {100 * metrics[names.DATA_WAIT_FRACTION]:.1f}%")
    if metrics.get(names.DIVERGED):
        parts.append(f"diverged: {metrics.get(names.DIVERGED_REASON, '')}")
    return "  ".join(parts)


def mlflow_epoch_callback(logger: RunLogger, epochs: int):
    """A Ray Train UserCallback (runs in the controller) that logs rank 0's report of every epoch, and prints
    a progress line for each new one. A store that refuses a write costs a warning, never the run (store_faults.py):
    the epoch is retried with the next report and written from the checkpoint at the end (run_record.py)."""
    from ray.train import UserCallback

    guarded = Guarded(logger.tracking_uri)

    class MLflowEpochCallback(UserCallback):
        shown = -1  # the last epoch with a progress line (a resumed run replays the epochs before it)

        def after_report(self, run_context, metrics, checkpoint):
            if not (metrics and names.EPOCH in metrics[0]):
                return
            logged = guarded(logger.log_epoch, metrics[0])
            epoch = int(metrics[0][names.EPOCH])
            if logged is True or (logged is REFUSED and epoch > self.shown):
                self.shown = epoch
                print(progress_line(metrics[0], epochs), flush=True)  # the console's progress, once per epoch

    return MLflowEpochCallback()


@dataclass
class RunOutcome:
    status: RunState
    metrics: dict[str, Any]
    run_id: str
    reason: str = ""
    unrecorded: str = ""  # why MLflow does not hold the run's whole record, and where it is instead (one sentence)


def preflight(cfg: Config, resources: Resources | None = None) -> None:
    """Fail fast, before Ray starts: the batch must split among the workers, and the data must be there,
    readable, and large enough for what the run does."""
    from hamjepa.data.splits import check_image_files, load_splits

    if resources is not None:
        resources.check_batch(cfg)

    splits = load_splits(cfg.data, channels=cfg.encoder.in_channels)
    check_image_files(splits)
    if len(splits.train) < cfg.optim.batch_size:
        raise ConfigError(f"config field 'optim.batch_size' = {cfg.optim.batch_size} is invalid: the training "
                         f"split has only {len(splits.train)} images; lower it or raise data.subset.")
    if len(splits.train) < cfg.eval.knn_k:
        raise ConfigError(f"config field 'eval.knn_k' = {cfg.eval.knn_k} is invalid: the training split has only "
                          f"{len(splits.train)} images to take neighbours from.")
    if len(splits.test) == 0:
        raise UserError(f"dataset '{cfg.data.dataset}' has an empty test split; the run could not be evaluated.")


def connect_ray(address: str | None, verbose: bool = False, worker_logs: bool = True) -> None:
    """Join a running cluster (`auto`, `ray://...`, `host:port`) or start a local Ray sized to this machine.

    Unless `verbose`, Ray's own info messages are off and the workers keep Ray Train's per-report and
    per-checkpoint logging to themselves; `worker_logs` False (a study, whose console is Tune's table) also
    stops forwarding the workers' output to this console. Errors still reach the user through Tune and MLflow.
    """
    import logging

    import ray

    if ray.is_initialized():
        return
    address = resolve_ray_address(address)
    if not address:
        _refuse_a_second_local_ray()
    quiet = {} if verbose else {"logging_level": logging.WARNING, "log_to_driver": worker_logs,
                                "runtime_env": {"env_vars": {QUIET_WORKERS: "1"}}}
    quiet_logs(verbose)
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            # The dashboard stays on: Ray's State API lives there, and without it stopped trials leak their
            # placement groups (docs/design.md "Pitfalls we measured"). No custom resource: a local Ray is like any
            # cluster, and trial drivers hold a slice of memory, not a CPU (DRIVER_MEMORY_BYTES).
            ray.init(**quiet)
    except Exception as error:  # noqa: BLE001 - Ray's start-up failures are often bare `Exception`s
        said = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        if address:
            raise UserError(f"cannot connect to Ray at address '{address}' ({said}); check --address (or "
                            "$RAY_ADDRESS), or omit both to start a local Ray.") from None
        # Measured under a load average of 9-13: "The current node timed out during startup", raw, after 90 s.
        load = os.getloadavg()[0]
        raise UserError(f"Ray could not start on this machine ({said}; load average {load:.1f} on {os.cpu_count()} "
                        "cores); try again when the machine is less busy, clear a leftover Ray with `ray stop`, or "
                        "join a running cluster with --address.") from None


def quiet_logs(verbose: bool = False) -> None:
    """Unless `verbose`: this process's share of Ray's info messages, and MLflow's and Optuna's routine ones (store
    creation, "a new study created"); their warnings and errors still show."""
    import logging

    if not verbose:
        for name in ("ray.tune", "ray.train", "mlflow", "optuna"):
            logging.getLogger(name).setLevel(logging.WARNING)
        quiet_store_tracebacks()


def _refuse_a_second_local_ray() -> None:
    """One local Ray per machine. A second instance started beside another run's makes Ray's own components
    (Ray Train's placement-group cleaner) find two clusters and fail, and its trials then wait for workers
    forever; so it is refused before it starts, with the way to share one instead."""
    try:
        from ray._private.services import find_gcs_addresses

        running = find_gcs_addresses()
    except Exception:  # noqa: BLE001 - a private API: without it, start as before
        return
    if running:
        raise UserError(f"another Ray instance is already running on this machine (at {', '.join(sorted(running))}: "
                        "another study or `hamjepa train`?); wait for it to end (`ray stop` if it is a leftover), "
                        "or run both on one shared Ray: `ray start --head`, then pass --address auto to each.")


def check_rerun(tracking_uri: str, experiment: str, run_name: str | None, cfg: Config) -> None:
    """Same name, same config: rerunning a run's name resumes it, so another config under it is refused,
    naming the keys that differ (before Ray starts; a FINISHED run is never reopened by mistake)."""
    if not run_name:
        return
    from mlflow.tracking import MlflowClient

    from hamjepa.tracking import find_run

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    existing = find_run(client, found.experiment_id, run_name) if found is not None else None
    if existing is None:
        return
    now = {k: str(v) for k, v in cfg.flatten().items()}
    before = existing.data.params
    changed = sorted(k for k in now if k in before and before[k] != now[k])
    if changed:
        shown = "; ".join(f"{k} was {before[k]}, now {now[k]}" for k in changed[:5])
        raise UserError(f"--name {run_name} is an existing run of experiment '{experiment}' with another config "
                        f"({shown}); rerunning a name resumes that run, so pick a new --name for this config.")


def train_and_log(cfg: Config, resources: Resources, *, experiment: str, run_name: str | None = None,
                  tracking_uri: str | None = None, storage_path: str | None = None, max_failures: int = 2,
                  tags: Mapping[str, str] | None = None) -> RunOutcome:
    """Train once under Ray Train and log it as one MLflow run (found again by its name on a rerun)."""
    from ray.train import TrainingFailedError

    uri = resolve_tracking_uri(tracking_uri)  # the caller has run check_rerun before Ray started
    run_name = run_name or f"{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    logger = RunLogger(uri, experiment, key=run_name, tags={ROLE_TAG: "run", METHOD_TAG: cfg.method,
                                                            DATASET_TAG: cfg.data.dataset, **provenance.tags(),
                                                            **(tags or {})})
    opening = Guarded(uri, warn=False)
    if opening(_open_run, logger, cfg) is REFUSED:
        raise UserError(f"{opening.faults[-1]}, so nothing was trained; make room or make it writable, then run "
                        "again.")
    trainer = make_trainer(cfg, resources, name=run_name, storage_path=storage_path, max_failures=max_failures,
                           callbacks=[mlflow_epoch_callback(logger, cfg.optim.epochs)])
    try:
        with SystemMetrics(uri, experiment, logger.key):
            result = trainer.fit()
        # A run that ended early without an error to retry (a storage fault) says why in its return value.
        last = {**(result.metrics or {}), **(result.return_value or {})}
    except TrainingFailedError as error:
        last = {names.FAILED: 1, names.FAILURE_REASON: names.failure_reason(error)}
    status, reason = names.classify(last, cfg.optim.epochs)
    run_folder = storage.join(storage.resolve(storage_path), run_name)
    record = RunRecord(uri, experiment, logger.key, logger.run_name, logger.tags, cfg.to_dict(), status.value, reason,
                       epochs=_reported_epochs(run_folder, cfg), run_folder=run_folder)
    # Every epoch's report, merged: epoch 0's `init/` readouts, the last epoch's final ones.
    metrics = {k: v for epoch in record.epochs for k, v in epoch.items()} | last
    outcome = RunOutcome(status, metrics if status is not RunState.FAILED else {}, logger.run_id, reason)
    at_end = Guarded(uri, warn=False)  # the sentence below says it
    if at_end(run_record.write, record, logger) is REFUSED:
        outcome.unrecorded = _unrecorded(record, at_end.faults[-1], [run_folder])
    return outcome


def _open_run(logger: RunLogger, cfg: Config) -> None:
    logger.start()
    logger.log_params(cfg.flatten())
    logger.log_text(cfg.to_yaml(), "config.yaml")


def _reported_epochs(run_folder: str, cfg: Config) -> list[dict[str, Any]]:
    """Every epoch's report, from the run's newest usable checkpoint (none: an empty list)."""
    from hamjepa.train.checkpoints import CheckpointError
    from hamjepa.train.encoder_artifact import newest_state

    try:
        return list(newest_state(run_folder, cfg).get("history", []))
    except (CheckpointError, OSError):
        return []


def _unrecorded(record: RunRecord, fault: str, folders: list[str]) -> str:
    """The sentence for a run whose record the store refused: what failed, and where the record is now."""
    try:
        path = run_record.save(record, folders)
    except OSError as error:
        return (f"{fault}, so the run is not marked {record.status} there, and its record could not be saved either "
                f"({error.strerror or error}); the checkpoints in {record.run_folder} hold it: rerun the same --name "
                "once the store takes writes")
    then = (f"once the store is restored (from its backup), `hamjepa recover {path}` writes it there, or `hamjepa "
            f"recover {path} --tracking-uri <another store>` elsewhere" if "was deleted" in fault else
            f"once the store takes writes, `hamjepa recover {path}` writes it")
    return f"{fault}, so the run is not marked {record.status} there; its record is saved in {path}: {then}"


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
    readouts = names.readouts(cfg.method)
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
