"""A run's whole MLflow record, written at its end from the run's own checkpoint, or kept in a recovery file.

The MLflow callback logs each epoch as it is reported, but a store that fails mid-run (store_faults.py) must not
lose what it did not take. The run's checkpoint holds every epoch's report (train/loop.py keeps the history in
it), so at the end of a run its record is written again, idempotently: params, config, every epoch not yet
logged, pictures and encoder, status and reason, and the run is closed. Where the store still refuses, the same
record goes to a recovery file, and `hamjepa recover FILE` writes it once the store is back (docs/design.md
"What happens when things fail").
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

from hamjepa.config import Config
from hamjepa.errors import UserError
from hamjepa.names import RunState
from hamjepa.tracking import REASON_TAG, STATUS_TAG, RunLogger

RECOVERY_PREFIX = "hamjepa-record-"
FORMAT = 1  # a recovery file's format version


@dataclass
class RunRecord:
    """Everything MLflow should hold of one ended run."""

    tracking_uri: str
    experiment: str
    key: str
    run_name: str
    tags: dict[str, str]
    config: dict[str, Any]  # the config tree (Config.to_dict)
    status: str  # a RunState value
    reason: str = ""
    epochs: list[dict[str, Any]] = field(default_factory=list)  # every epoch's report, epoch 0 first
    run_folder: str | None = None  # the Ray Train run's checkpoints: pictures and encoder of a finished run
    parent_run_id: str | None = None

    def logger(self) -> RunLogger:
        return RunLogger(self.tracking_uri, self.experiment, self.key, run_name=self.run_name, tags=self.tags,
                         parent_run_id=self.parent_run_id)


def write(record: RunRecord, logger: RunLogger | None = None) -> None:
    """Write `record` to its store (reopening its run by key, or creating it): raises whatever the store raises."""
    from hamjepa.train.encoder_artifact import log_run_artifacts

    logger = logger or record.logger()
    cfg = Config.from_dict(record.config)
    logger.start()
    logger.log_params(cfg.flatten())
    logger.log_text(cfg.to_yaml(), "config.yaml")
    for metrics in record.epochs:
        logger.log_epoch(metrics)
    status = RunState(record.status)
    if status == RunState.FINISHED and record.run_folder:
        log_run_artifacts(logger, record.run_folder, cfg)
    logger.set_tags({STATUS_TAG: status.value, **({REASON_TAG: record.reason} if record.reason else {})})
    if not record.reason:  # a run a fault had failed, resumed: the old reason no longer holds
        logger.delete_tag(REASON_TAG)
    logger.finish(status.mlflow_status)


def save(record: RunRecord, folders: list[str | None]) -> str:
    """Write `record` as JSON into the first of `folders` (then the system's temporary folder) that takes it;
    returns its path. OSError when none does."""
    name = RECOVERY_PREFIX + re.sub(r"[^A-Za-z0-9._-]+", "_", record.key) + ".json"
    text = json.dumps({"format": FORMAT, **asdict(record)}, indent=1, default=str)
    error: OSError | None = None
    for folder in [*(f for f in folders if f and "://" not in f), tempfile.gettempdir()]:
        path = os.path.join(folder, name)
        try:
            with open(path, "w", encoding="utf-8") as stream:
                stream.write(text)
            return path
        except OSError as failure:
            error = failure
            if os.path.exists(path):  # a torn file would be worse than none
                os.remove(path)
    raise error or OSError("no folder to write the recovery file in")


def load(path: str) -> RunRecord:
    """The record in a recovery file; one sentence for a file that is not one."""
    from hamjepa import paths

    fix = "pass the file named by the run's error line"
    paths.require("recovery file", path, "a regular file", fix)
    try:
        with open(path, encoding="utf-8") as stream:
            data = json.load(stream)
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise ValueError("not a recovery file of this version")
        record = RunRecord(**data)
        RunState(record.status)
        Config.from_dict(record.config)
    except (OSError, ValueError, TypeError) as error:
        raise UserError(f"recovery file '{path}' is not one hamjepa wrote ({str(error).splitlines()[0][:120]}); "
                        f"{fix}.") from None
    return record
