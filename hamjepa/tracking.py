"""MLflow: experiments, idempotent runs, params, per-epoch metrics, artifacts (docs/design.md "MLflow layout").

Everything goes through `MlflowClient` with explicit run ids (no fluent "active run" state), so the same
code logs from the CLI, from a Ray Train controller callback and from a Tune callback. Runs are found
again by a `hamjepa.key` tag (a training run's name, a Tune trial id), so a resumed or retried run reuses
its MLflow run instead of creating a duplicate, and metrics already logged for an epoch are not logged
twice (Ray reports at least once).
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

# The URI checks need no MLflow import, so the CLI runs them before loading it; re-exported here.
from hamjepa.checks import check_tracking_uri, resolve_tracking_uri  # noqa: F401
from hamjepa.store_faults import check_present, quiet_store_tracebacks

DATASET_DIGEST_CHARS = 36  # MLflow stores a dataset digest of at most 36 characters
KEY_TAG = "hamjepa.key"
ROLE_TAG = "hamjepa.role"
METHOD_TAG = "hamjepa.method"
PHASE_TAG = "hamjepa.phase"
TRIAL_TAG = "hamjepa.trial_id"
STATUS_TAG = "hamjepa.status"  # a names.RunState value
REASON_TAG = "hamjepa.reason"
VERDICT_TAG = "hamjepa.verdict"  # a search study's parent run: the primary metric's verdict
DATASET_TAG = "hamjepa.dataset"  # the dataset input's name (log_dataset)
PARENT_TAG = "mlflow.parentRunId"
_BATCH = 100  # MLflow's limit on params per log_batch call
_METRICS_PER_BATCH = 1000  # MLflow's limit on metrics per log_batch call
PARAM_CHARS, TAG_CHARS = 6000, 5000  # MLflow's longest param and tag values (characters); longer ones are cut


# MLflow 3's UI opens an experiment on the view its kind names (the experiment tag below); without it, it infers
# the kind and may open the GenAI overview (traces, latency, tokens). Ours are model-training experiments: the
# value is the UI's own for "Model training" (ExperimentKind.CUSTOM_MODEL_DEVELOPMENT in mlflow/server/js).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


ARTIFACTS_FOLDER = "mlartifacts"  # beside a SQLite store: <store's folder>/mlartifacts/<experiment>/


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store (`<folder of mlflow.db>/mlartifacts/
    <experiment name, made folder-safe>`), so the store's folder holds everything and copying it copies everything;
    None elsewhere, so a server (or database) keeps its own artifact root. Without it MLflow would write to
    ./mlruns/ of whatever folder the command ran in, whatever the store (docs/design.md "MLflow layout")."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    store = Path(tracking_uri[len("sqlite:///"):].split("?", 1)[0])
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return (store.parent / ARTIFACTS_FOLDER / folder).as_uri()


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment's id, created (or restored) as a model-training experiment; an existing experiment without
    a kind gets ours, one whose kind a user chose keeps it. A new one keeps its artifacts at `artifact_location`;
    an existing one keeps the location it was created with (MLflow cannot move it)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri, name),
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def find_run(client: MlflowClient, exp_id: str, key: str):
    """The run tagged hamjepa.key = key in the experiment, or None."""
    runs = client.search_runs([exp_id], filter_string=f"tags.`{KEY_TAG}` = '{key}'", max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


class RunLogger:
    """One MLflow run, found again by its key; logs params, per-epoch metrics and artifacts idempotently.

    Picklable (the client is made on first use), so it can travel to a Ray Train controller.
    """

    def __init__(self, tracking_uri: str, experiment: str, key: str, run_name: str | None = None,
                 tags: Mapping[str, str] | None = None, parent_run_id: str | None = None):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.key = key
        self.run_name = run_name or key
        self.tags = dict(tags or {})
        self.parent_run_id = parent_run_id
        self.run_id: str | None = None
        self._last_epoch: int | None = None
        self._client: MlflowClient | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def start(self) -> str:
        """Create the run, or reopen the one with this key; returns its id."""
        exp_id = experiment_id(self.client, self.experiment)
        existing = find_run(self.client, exp_id, self.key)
        if existing is not None:
            self.run_id = existing.info.run_id
            if existing.info.status != "RUNNING":
                self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {KEY_TAG: self.key, **self.tags}
            if self.parent_run_id:
                tags[PARENT_TAG] = self.parent_run_id
            self.run_id = self.client.create_run(exp_id, run_name=self.run_name, tags=tags).info.run_id
        return self.run_id

    def _ensure_started(self) -> str:
        if self.run_id is None:
            return self.start()
        check_present(self.tracking_uri)  # a SQLite store deleted under a started run is a fault, never a new store
        return self.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        run_id = self._ensure_started()
        logged = self.client.get_run(run_id).data.params
        items = [Param(k, str(v)[:PARAM_CHARS]) for k, v in params.items() if k not in logged]
        for start in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, params=items[start:start + _BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        run_id = self._ensure_started()
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:TAG_CHARS]) for k, v in tags.items()])

    def delete_tag(self, name: str) -> None:
        """Remove tag `name` where the run has it (MLflow raises for a tag that is not there)."""
        run_id = self._ensure_started()
        if name in self.client.get_run(run_id).data.tags:
            self.client.delete_tag(run_id, name)

    def last_logged_epoch(self) -> int:
        if self._last_epoch is None:
            history = self.client.get_metric_history(self._ensure_started(), "epoch")
            self._last_epoch = max((int(m.value) for m in history), default=-1)  # epoch 0 = initialisation
        return self._last_epoch

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Numeric, finite metrics at `step`; strings become tags, the rest is skipped."""
        run_id = self._ensure_started()
        timestamp = _now_ms()
        numeric = [Metric(k, float(v), timestamp, step) for k, v in metrics.items()
                   if _is_number(v) and math.isfinite(float(v))]
        for start in range(0, len(numeric), _METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=numeric[start:start + _METRICS_PER_BATCH])
        strings = {f"hamjepa.{k}": v for k, v in metrics.items() if isinstance(v, str)}
        if strings:
            self.set_tags(strings)

    def log_epoch(self, metrics: Mapping[str, Any]) -> bool:
        """Log one epoch's report (step = its `epoch`) unless that epoch is already logged."""
        epoch = int(metrics["epoch"])
        if epoch <= self.last_logged_epoch():
            return False
        self.log_metrics(metrics, step=epoch)
        if "data_digest" in metrics:  # epoch 0 says which data the run saw (names.DATA)
            self.log_dataset(self.tags.get(DATASET_TAG, "data"), str(metrics["data_digest"]),
                             {"splits": str(metrics.get("data_sizes", ""))})
        self._last_epoch = epoch
        return True

    def log_dataset(self, name: str, digest: str, profile: Mapping[str, str]) -> None:
        """The run's training data as an MLflow dataset input (the UI's Dataset column): name, the split's
        digest, its sizes."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest[:DATASET_DIGEST_CHARS], source_type="local",
                          source=json.dumps({"dataset": name}), profile=json.dumps(dict(profile)))
        self.client.log_inputs(self._ensure_started(), datasets=[
            DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self._ensure_started(), text, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self._ensure_started(), str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        """Close the run as FINISHED, FAILED or KILLED (never left RUNNING)."""
        RunStatus.from_string(status)  # validates the name
        self.client.set_terminated(self._ensure_started(), status=status)


class SystemMetrics:
    """MLflow's own system metrics (CPU, memory, disk, network, and GPU where NVIDIA's library finds one) of this
    process's node, logged to one run while a block runs: `with SystemMetrics(uri, experiment, key): ...`.

    The run is found by its key in a background thread, so the block need not wait for whoever creates it (a
    study's trial driver starts while the MLflow callback, in the study's process, creates its child run). A
    retried block continues the run's steps. Metrics are MLflow's, `system/...`. They describe the node of the
    process that launched the run: the machine itself on one machine; on a cluster, the trial driver's node, which
    may not be where its workers train (docs/design.md "MLflow layout")."""

    FIND_TIMEOUT_S = 120  # the run's creator is another process that may be slow to start on a busy machine

    def __init__(self, tracking_uri: str, experiment: str, key: str, sampling_interval_s: float = 10.0):
        self.tracking_uri, self.experiment, self.key = tracking_uri, experiment, key
        self.sampling_interval_s = sampling_interval_s
        self._stop = threading.Event()
        self._monitor = None
        self._thread = threading.Thread(target=self._start, daemon=True, name="hamjepa-system-metrics")

    def _start(self) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        client = MlflowClient(self.tracking_uri)
        deadline = time.monotonic() + self.FIND_TIMEOUT_S
        while not self._stop.is_set() and time.monotonic() < deadline:
            experiment = client.get_experiment_by_name(self.experiment)
            run = find_run(client, experiment.experiment_id, self.key) if experiment else None
            if run is not None:
                self._monitor = SystemMetricsMonitor(run.info.run_id, sampling_interval=self.sampling_interval_s,
                                                     resume_logging=True, tracking_uri=self.tracking_uri)
                self._monitor.start()
                return
            self._stop.wait(1.0)

    def __enter__(self) -> SystemMetrics:
        # The monitor logs each write the store refuses too; these metrics are a nicety, and a store that refuses
        # writes is reported once, in a sentence, by the run's own logging (store_faults.py).
        logging.getLogger("mlflow.system_metrics").setLevel(logging.CRITICAL)
        quiet_store_tracebacks()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._monitor is not None:
            self._monitor.finish()
        return False


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) or _is_numpy_number(value)


def _is_numpy_number(value: Any) -> bool:
    return type(value).__module__ == "numpy" and hasattr(value, "dtype") and value.dtype.kind in "iuf"


def _now_ms() -> int:
    return int(time.time() * 1000)
