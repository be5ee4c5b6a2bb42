"""One invocation of a study script: its id and folder, what it was started with (so `--resume` continues it or
refuses in one sentence), its MLflow parent run, and its phases; an interruption or error closes every run.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hamjepa import provenance, storage
from hamjepa.errors import UserError
from hamjepa.names import RunState
from hamjepa.redact import mask_uri
from hamjepa.store_faults import Guarded
from hamjepa.study.driver import first_line
from hamjepa.study.phases import describe_phase, run_phase
from hamjepa.study.settings import CELL, STUDY_FLAGS, StudySettings, cell_key, run_key
from hamjepa.study.study_files import parse_identity, parse_pointer
from hamjepa.tracking import (
    REASON_TAG,
    ROLE_TAG,
    STATUS_TAG,
    VERDICT_TAG,
    RunLogger,
    experiment_id,
)

# -- one invocation of a study script --------------------------------------------------------------

LATEST = "latest"  # --resume without an id
POINTER_FILE = "latest.json"  # <storage>/<study name>/latest.json: the newest invocation's id, a convenience
IDENTITY_FILE = "study.json"  # <storage>/<study name>/<study id>/study.json: what the invocation was started with


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
        pointer_path = storage.join(root, POINTER_FILE)
        pointer = storage.read_text(pointer_path)
        if pointer is None:
            raise UserError(f"--resume found no earlier run of study '{name}' under '{mask_uri(root)}'; run it "
                            "once without --resume, or pass the --storage-path it used.")
        study_id = parse_pointer(pointer, pointer_path)
    identity_path = storage.join(root, study_id, IDENTITY_FILE)
    text = storage.read_text(identity_path)
    if text is None:
        raise UserError(f"--resume {study_id} found no such study of '{name}' under '{mask_uri(root)}'; pass an "
                        f"id printed by an earlier run (its folders are under that path), or --resume alone for "
                        "the latest.")
    return parse_identity(text, identity_path, study_id)


def _refuse_changes(study_id: str, started: Mapping[str, str], now: Mapping[str, str]) -> None:
    """A resumed study must continue what it started: the same parameters, or a sentence naming the changes, each
    by the flag that sets it (a config key names itself: --set, --config or --profile set it)."""
    changed = [k for k in [*now, *(k for k in started if k not in now)] if started.get(k) != now.get(k)]
    if changed:
        shown = "; ".join(f"{STUDY_FLAGS.get(k, k)} was {started.get(k, '(unset)')}, now {now.get(k, '(unset)')}"
                          for k in changed[:5])
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        raise UserError(f"--resume {study_id}: this command differs from the one that started the study "
                        f"({shown}{more}); rerun it with the original settings, or start a new study without "
                        "--resume.")


def check_resumable(settings: StudySettings, params: Mapping[str, Any]) -> None:
    """Before Ray starts: one sentence if `settings.resume` names nothing to resume, or a study started with other
    parameters: another config, or other protocol flags (`params`: the study's own, as its runner records them)."""
    if not settings.resume:
        return
    identity = _stored_identity(settings.name, settings.storage_path, settings.resume)
    _refuse_changes(identity["id"], identity["params"], invocation_params(settings, params))


def invocation_params(settings: StudySettings, params: Mapping[str, Any]) -> dict[str, str]:
    """What an invocation records as started with, and a resumed one must match: the study's own `params`, its
    workers per run and its base config, as strings (as MLflow records them, so the two compare exactly)."""
    values = {**params, "study.workers": settings.resources.workers, **settings.base.flatten()}
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
    """What a study returns (to the command line, or to Python through `hamjepa.Study`)."""

    study_id: str
    parent_run_id: str  # the MLflow parent run (its name is the study id)
    summary: Any  # what the study's report was built from (report.summary.StudySummary)
    text: str  # the summary as printed and logged (summary.md)
    interrupted: bool = False
    optuna_study: Any = None  # the search's optuna.Study, loaded from its storage (None before its first trial)
    experiment_id: str = ""
    optuna_storage: str = ""  # the URL of the live Optuna study (optuna-dashboard <url>)

    @property
    def verdict(self) -> str:
        """The primary metric's verdict ("" where no comparison ran), as `hamjepa report` rebuilds it from MLflow."""
        row = getattr(self.summary, "primary_row", None)
        return row.verdict if row else ""

    @property
    def table(self) -> list[dict[str, Any]]:
        """The summary table as data: one dict per metric (the columns of summary.csv, numbers as floats)."""
        from hamjepa.report.summary import to_records

        return to_records(self.summary) if hasattr(self.summary, "rows") else []

    @property
    def selected(self) -> dict[str, Any]:
        """The selected search trial's searched values, typed as the config's ({} where none finished)."""
        if not hasattr(self.summary, "selected_params"):
            return {}
        from hamjepa.report.summary import typed_param

        return {k: typed_param(self.summary.base, k, v) for k, v in self.summary.selected_params().items()}


INTERRUPTED_REASON = "interrupted; --resume continues it"


class Invocation:
    """One run of a study script: its id and storage folder, its MLflow parent run, and its phases.

    An interruption shows in two ways: Ctrl-C raising out of Tune, or Tune's first Ctrl-C ending fit()
    normally with the running trials stopped but not completed (our callback never closed their MLflow
    runs) and pending ones never started. Either way the remaining phases are skipped and the parent run is
    closed as KILLED with every run it cut, so `--resume` can pick everything up again.
    """

    def __init__(self, settings: StudySettings, params: Mapping[str, Any]):
        self.settings = settings
        params = invocation_params(settings, params)
        self.study_id, self.folder = _study_identity(settings, params)
        self.parent = RunLogger(settings.tracking_uri, settings.experiment_name, key=f"study/{self.study_id}",
                                run_name=self.study_id,
                                tags={ROLE_TAG: "study", "hamjepa.study": settings.name, **provenance.tags()})
        self.parent_id = self.parent.start()
        self.experiment_id = experiment_id(self.parent.client, settings.experiment_name)
        self.parent.log_params(params)
        self.parent.log_text(settings.base.to_yaml(), "base_config.yaml")
        self.parent.set_tags({STATUS_TAG: RunState.RUNNING.value})
        self.interrupted = False
        self.phase_seconds: dict[str, float] = {}  # wall time per phase, this invocation (report/timing.py)
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
        # A store that refuses these writes too must not hide the error being handled (store_faults.py).
        Guarded(self.settings.tracking_uri, warn=False)(self._close, reason, status, interrupted)
        return False

    def _close(self, reason: str, status: str, interrupted: bool) -> None:
        self._close_open_children(f"the study stopped: {reason}", status=status)
        self.parent.set_tags({STATUS_TAG: "interrupted" if interrupted else RunState.FAILED.value,
                              REASON_TAG: reason})
        self.parent.finish(status)

    def phase_done(self, name: str, expected: int) -> bool:
        """Whether `name` already has `expected` ended runs (a resumed study skips it)."""
        return len(self.ended(name)) >= expected

    def ended(self, phase: str) -> list:
        """The phase's runs that ended (FINISHED or FAILED in MLflow); KILLED ones were cut short."""
        return [r for r in self.records() if r.phase == phase and r.run_status in ("FINISHED", "FAILED")]

    def run_phase(self, name: str, param_space: dict[str, Any], expected: int, settings: StudySettings | None = None,
                  **kwargs) -> None:
        """Run one phase unless the invocation was interrupted; `expected` = how many trials it should end with.
        `settings`: the phase's own (the baseline's search trains another method), else the invocation's."""
        if self.interrupted:
            return
        settings = settings or self.settings
        print(f"\n[{self.study_id}] {name}: {describe_phase(name, param_space, expected, settings)}", flush=True)
        started = time.perf_counter()
        try:
            run_phase(settings, name, param_space, self.folder, self.study_id, self.parent_id, **kwargs)
        except KeyboardInterrupt:
            self.interrupted = True
            return
        finally:
            self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + time.perf_counter() - started
        runs = [r for r in self.records() if r.phase == name]
        self.interrupted = (len(self.ended(name)) < expected
                            or any(r.run_status == "RUNNING" for r in runs))

    def run_cells(self, phase: str, cells: list[dict[str, Any]], tune_name: str = "") -> None:
        """Run a phase of fixed cells ({"arm": overrides, "seed": s}), only those without an ended run.

        A cell's run is named after its method and seed (`run_key`), so a resumed invocation continues a cut
        cell's checkpoint and MLflow run and never repeats an ended one, whatever Tune had saved.
        """
        from ray import tune

        ended = {cell_key(r.method, r.seed) for r in self.ended(phase)}
        remaining = [cell for cell in cells if run_key({CELL: cell}, "") not in ended]
        if remaining and not self.interrupted:
            # A fresh Tune experiment each invocation: Tune's own restore could lose a cell it had not created.
            # A sequential study's looks are one Tune experiment each (`tune_name`), in one phase.
            name = tune_name or phase
            name = name if not self.settings.resume else f"{name}-resumed-{secrets.token_hex(3)}"
            self.run_phase(phase, {CELL: tune.grid_search(remaining)}, len(cells), tune_name=name)

    def records(self):
        from hamjepa.report.summary import collect_runs

        return collect_runs(self.parent.client, self.experiment_id, self.parent_id)

    def finish(self, summary: Any, text: str, artifacts: Mapping[str, str]) -> StudyResult:
        """Close the parent run: KILLED with a resume hint when interrupted, else log `artifacts` and FINISHED."""
        if self.interrupted:
            # The runs Ctrl-C cut are KILLED with the parent, not left RUNNING as if still training: `hamjepa
            # report` then says "cut", and a resume reopens each one (RunLogger.start) and clears its reason when
            # it finishes (driver.py).
            self._close_open_children(INTERRUPTED_REASON)
            self.parent.set_tags({STATUS_TAG: "interrupted"})
            self.parent.finish("KILLED")
            text += f"Interrupted: continue with the same command and --resume (study {self.study_id}).\n"
            return StudyResult(self.study_id, self.parent_id, summary, text, interrupted=True,
                               experiment_id=self.experiment_id)
        self._close_stale_children()
        for name, content in artifacts.items():
            self.parent.log_text(content, name)
        primary = getattr(summary, "primary_row", None)
        self.parent.set_tags({STATUS_TAG: "finished", **({VERDICT_TAG: primary.verdict} if primary else {})})
        self.parent.finish("FINISHED")
        return StudyResult(self.study_id, self.parent_id, summary, text, experiment_id=self.experiment_id)

    def _close_stale_children(self) -> None:
        """Runs still RUNNING after every phase ended belong to nothing alive."""
        self._close_open_children("interrupted and not resumed")

    def _close_open_children(self, reason: str, status: str = "KILLED") -> None:
        client = self.parent.client
        for record in self.records():
            if record.run_status == "RUNNING":
                client.set_tag(record.run_id, STATUS_TAG, RunState.FAILED.value)
                client.set_tag(record.run_id, REASON_TAG, reason)
                client.set_terminated(record.run_id, status=status)
