"""Reopen a study from MLflow alone: `hamjepa report` rebuilds its summary, `hamjepa studies` lists them.

Nothing here reads Ray's or Tune's state: a study's parent run (tag hamjepa.role = study) says what was planned
(its params: `study.num_samples`, `study.paired_seeds`, `study.search_keys`, `study.seeds`, and the base config),
its children (mlflow.parentRunId) say what ran and how each ended, and the summary is rebuilt with the same
functions the study used (report.summarize / to_markdown, or reproduce.build_table / to_markdown for the paper's
table). What a complete study contains comes from study.settings.comparison_cells and cell_key, so an interrupted
study's report can name the runs that are missing (never started) or cut (KILLED, or left RUNNING).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mlflow.tracking import MlflowClient

from hamjepa import names
from hamjepa.config import Config, build_config
from hamjepa.errors import UserError
from hamjepa.methods import ABLATIONS
from hamjepa.redact import mask_uri
from hamjepa.report.reference import REFERENCE, load_reference
from hamjepa.report.sequential import looks
from hamjepa.report.summary import (
    BASELINE_SEARCH,
    COMPARE,
    RunRecord,
    collect_runs,
    select_trial,
    summarize,
    to_markdown,
)
from hamjepa.report.timing import phases_from_metrics
from hamjepa.tracking import REASON_TAG, ROLE_TAG

STUDY_NAME_TAG = "hamjepa.study"  # the study script's name (energy_budget, reproduce_paper, ...)
SEARCH, REPRODUCE = "search", "reproduce"
CUT = ("KILLED", "RUNNING")  # MLflow statuses of a run that did not end (interrupted, or its process died)
STATUS_WORDS = {"FINISHED": "finished", "KILLED": "interrupted", "FAILED": "failed", "RUNNING": "running"}
UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
# MLflow 3.17's UI opens every experiment in its GenAI view (Overview: traces, latency, tokens) unless the URL or
# the user's last toggle says otherwise: with its GenAI / Model training switch on (the default), it reads the
# view from this URL parameter, else from the browser's storage, and ignores the experiment's kind tag.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def runs_url(tracking_uri: str, experiment_id: str) -> str:
    """The MLflow UI's runs table of an experiment in its Model training view (hash-routed:
    #/experiments/<id>/runs?workflowType=machine_learning); a tracking server is its own UI, a local store is
    served by `mlflow ui` at UI_ADDRESS."""
    server = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else UI_ADDRESS
    return f"{mask_uri(server)}/#/experiments/{experiment_id}/runs?{MODEL_TRAINING_VIEW}"


# -- the studies in a store ---------------------------------------------------------------------------

@dataclass
class StudyRun:
    """A study's parent run: what was planned (params) and how the invocation ended (status)."""

    run_id: str
    study_id: str
    name: str
    experiment_id: str
    experiment: str
    started_ms: int
    status: str  # MLflow's: FINISHED | KILLED | FAILED | RUNNING
    params: dict[str, str]
    reason: str = ""  # why it failed (hamjepa.reason), where it did

    @property
    def kind(self) -> str:
        """`reproduce` for the paper's fixed runs (studies/reproduce_paper.py), else `search`."""
        return REPRODUCE if "study.methods" in self.params or self.name == "reproduce_paper" else SEARCH

    @property
    def started(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(self.started_ms / 1000)) if self.started_ms else "-"

    @property
    def status_word(self) -> str:
        return STATUS_WORDS.get(self.status, self.status.lower())


def find_studies(client: MlflowClient, experiment: str | None = None) -> list[StudyRun]:
    """Every study's parent run in the store (or in one experiment), newest first."""
    experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    if experiment is not None:
        experiments = {k: v for k, v in experiments.items() if v == experiment}
        if not experiments:
            raise UserError(f"--experiment '{experiment}' is not in this tracking store; `hamjepa studies` lists "
                            "the studies of every experiment.")
    if not experiments:
        return []
    runs = client.search_runs(list(experiments), filter_string=f"tags.`{ROLE_TAG}` = 'study'", max_results=5000,
                              order_by=["attributes.start_time DESC"])
    return [StudyRun(run.info.run_id, run.info.run_name, run.data.tags.get(STUDY_NAME_TAG, ""),
                     run.info.experiment_id, experiments[run.info.experiment_id], run.info.start_time or 0,
                     run.info.status, dict(run.data.params), run.data.tags.get(REASON_TAG, ""))
            for run in runs]


def no_study(where: str) -> UserError:
    return UserError(f"the tracking store {where} holds no study; run one first, or pass the --tracking-uri (and "
                     "--experiment) it logged to.")


def pick_study(studies: Sequence[StudyRun], study_id: str | None, where: str) -> StudyRun:
    """The study with this id (or parent run id), else the newest; one sentence when there is none."""
    if not studies:
        raise no_study(where)
    if study_id is None:
        return studies[0]
    for study in studies:
        if study_id in (study.study_id, study.run_id):
            return study
    raise UserError(f"--study '{study_id}' is not a study in the tracking store {where}; `hamjepa studies` "
                    "lists the ones it holds.")


def base_config(params: Mapping[str, str]) -> Config:
    """The study's base config from its parent run's params (MLflow keeps every value as a string; an older
    version's key names are read under today's, silently)."""
    defaults = Config().flatten()
    overrides: dict[str, object] = {}
    for key, text in params.items():
        if key not in defaults:
            continue
        if isinstance(defaults[key], str):
            overrides[key] = json.dumps(text)  # a quoted YAML string: "" stays "", "true" stays a word
        else:
            overrides[key] = None if text == "None" else text
    return build_config(None, None, overrides)


# -- what is missing --------------------------------------------------------------------------------------

@dataclass
class Gaps:
    """The runs of a study that are not there: never started (`missing`, by name where the plan names them) or
    cut short (`cut`: name -> MLflow status)."""

    planned: dict[str, int] = field(default_factory=dict)  # phase -> runs planned
    missing: dict[str, list[str]] = field(default_factory=dict)  # phase -> names (search: unnamed, "")
    cut: dict[str, dict[str, str]] = field(default_factory=dict)  # phase -> {run name: status}

    @property
    def complete(self) -> bool:
        return not any(self.missing.values()) and not any(self.cut.values())

    def sentence(self) -> str:
        """E.g. "2 of 4 compare runs missing: sigreg-seed2, hamjepa-seed2; 1 search trial cut (KILLED)"."""
        parts = []
        for phase, planned in self.planned.items():
            noun = "trial" if phase in (SEARCH, BASELINE_SEARCH) else "run"
            missing, cut = self.missing.get(phase, []), self.cut.get(phase, {})
            if missing:
                listed = ", ".join(m for m in missing if m)
                parts.append(f"{len(missing)} of {planned} {phase} {_plural(noun, planned)} "
                             f"{'missing: ' + listed if listed else 'never started'}")
            if cut:
                statuses = sorted(set(cut.values()))
                counts = ", ".join(f"{sum(s == status for s in cut.values())} {status}" for status in statuses)
                how = statuses[0] if len(statuses) == 1 else counts
                listed = f": {', '.join(cut)}" if phase not in (SEARCH, BASELINE_SEARCH) else ""
                parts.append(f"{len(cut)} {phase} {_plural(noun, len(cut))} cut ({how}){listed}")
        return "; ".join(parts)


def _plural(noun: str, count: int) -> str:
    return noun if count == 1 else noun + "s"


def _cut(records: Sequence[RunRecord], key) -> dict[str, str]:
    return {key(r): r.run_status for r in records if r.run_status in CUT}


def search_gaps(study: StudyRun, records: Sequence[RunRecord], base: Config) -> Gaps:
    """A search study's gaps: search trials against study.num_samples, compare cells against comparison_cells."""
    from hamjepa.study.settings import CELL, StudySettings, cell_key, comparison_cells, run_key

    gaps = Gaps()
    search = [r for r in records if r.phase == SEARCH]
    trials = int(study.params.get("study.num_samples", len(search)))
    searches = [SEARCH, BASELINE_SEARCH] if study.params.get("study.tune_baseline") == "True" else [SEARCH]
    for phase in searches:
        ran = [r for r in records if r.phase == phase]
        gaps.planned[phase] = trials
        gaps.missing[phase] = [""] * max(0, trials - len(ran))
        gaps.cut[phase] = _cut(ran, lambda r: r.name)
    paired = [int(s) for s in study.params.get("study.paired_seeds", "").split(",") if s.strip()]
    if not paired:
        return gaps
    compared = [r for r in records if r.phase == COMPARE]
    search_whole = not any(gaps.missing[p] or gaps.cut[p] for p in searches)
    # A search that did not end may still select a configuration: the plan then includes the HamJEPA arm.
    objective = study.params.get("study.objective") or names.objective(base.eval.knn_k)
    selected = {} if select_trial(records, objective) or not search_whole else None
    ablation = study.params.get("study.ablation") or next(
        (method.value for method in ABLATIONS if any(r.method == method for r in compared)), "")
    settings = StudySettings(name=study.name or "study", base=base, num_samples=max(1, trials), seeds=len(paired),
                             ablation=ablation, sequential=study.params.get("study.sequential") == "True")
    cells = comparison_cells(settings, selected, seeds=_planned_seeds(study, settings, compared, records, base))
    planned = [run_key({CELL: cell}, "") for cell in cells]
    present = {cell_key(r.method, r.seed) for r in compared}
    gaps.planned[COMPARE] = len(planned)
    gaps.missing[COMPARE] = [key for key in planned if key not in present]
    gaps.cut[COMPARE] = _cut(compared, lambda r: cell_key(r.method, r.seed))
    if int(study.params.get("study.reference", 0)):  # one run of untrained encoders, after the comparison
        reference = [r for r in records if r.phase == REFERENCE]
        gaps.planned[REFERENCE] = 1
        gaps.missing[REFERENCE] = [] if reference else [REFERENCE]
        gaps.cut[REFERENCE] = _cut(reference, lambda r: r.name)
    return gaps


def _planned_seeds(study: StudyRun, settings, compared: Sequence[RunRecord], records, base: Config) -> int:
    """How many paired seeds the comparison plans: all of them, or for a sequential study the look it has reached
    (the next one when every run of the current look ended and the primary is not resolved there)."""
    schedule = settings.looks
    if len(schedule) == 1:
        return schedule[0]
    first_seed = settings.paired_seeds[0]
    reached = max((r.seed - first_seed + 1 for r in compared), default=0)
    look = next((n for n in schedule if n >= reached), schedule[-1])
    ended = all(r.run_status in ("FINISHED", "FAILED") for r in compared)
    if not ended or len(compared) < look * 2 or look == schedule[-1]:
        return look
    primary = summarize(records, [], base, study.params.get("study.primary", ""), looks=schedule).primary_row
    resolved = primary is not None and (primary.delta.above_zero or primary.delta.below_zero)
    return look if resolved else schedule[schedule.index(look) + 1]


def reproduce_gaps(study: StudyRun, records: Sequence[RunRecord]) -> Gaps:
    """The paper's fixed runs: every method of study.methods on seeds 0 .. study.seeds - 1."""
    from hamjepa.study.reproduce import REPRODUCED
    from hamjepa.study.settings import cell_key

    methods = [m for m in study.params.get("study.methods", ",".join(REPRODUCED)).split(",") if m]
    seeds = int(study.params.get("study.seeds", 0))
    planned = [cell_key(method, seed) for seed in range(seeds) for method in methods]
    runs = [r for r in records if r.phase == REPRODUCE]
    present = {cell_key(r.method, r.seed) for r in runs}
    return Gaps({REPRODUCE: len(planned)}, {REPRODUCE: [key for key in planned if key not in present]},
                {REPRODUCE: _cut(runs, lambda r: cell_key(r.method, r.seed))})


# -- the report ---------------------------------------------------------------------------------------

@dataclass
class Reopened:
    study: StudyRun
    records: list[RunRecord]
    summary_text: str  # what the study printed (summary.md / paper_table.md), rebuilt
    verdict: str  # the summary's one-line answer
    gaps: Gaps

    @property
    def trial_runs(self) -> list[RunRecord]:
        """The study's training runs (not its initialisation reference, which trains nothing)."""
        return [r for r in self.records if r.phase != REFERENCE]


def reopen(client: MlflowClient, study: StudyRun) -> Reopened:
    """Rebuild a study's summary, its verdict line and its gaps from MLflow's records."""
    records = collect_runs(client, study.experiment_id, study.run_id)
    base = base_config(study.params)
    if study.kind == REPRODUCE:
        from hamjepa.study.reproduce import build_table
        from hamjepa.study.reproduce import to_markdown as table_markdown

        seeds = int(study.params.get("study.seeds", 0))
        table = build_table(records, base, seeds)
        verdict = table.notes[0] if table.notes else ""
        return Reopened(study, records, table_markdown(table, seeds), verdict, reproduce_gaps(study, records))
    keys = [k for k in study.params.get("study.search_keys", "").split(",") if k]
    from hamjepa.study.settings import tuning_statement

    tuned = (tuning_statement(study.params["study.num_samples"], study.params.get("study.tune_baseline") == "True")
             if "study.num_samples" in study.params else "")
    sequential = study.params.get("study.sequential") == "True"
    schedule = looks(int(study.params.get("study.seeds", 2))) if sequential else ()
    phases = phases_from_metrics(client.get_run(study.run_id).data.metrics)
    summary = summarize(records, keys, base, study.params.get("study.primary", ""), tuned, looks=schedule,
                        reference=load_reference(client, records, base), phase_seconds=phases,
                        objective=study.params.get("study.objective", ""))
    verdict = summary.primary_row.verdict if summary.primary_row else ""
    text = to_markdown(summary)
    return Reopened(study, records, text, verdict, search_gaps(study, records, base))


def report_text(reopened: Reopened, tracking_uri: str) -> str:
    """A header (which study, how it ended, what is missing, where to browse it) and the rebuilt summary."""
    s, gaps = reopened.study, reopened.gaps
    lines = [f"Study {s.study_id} ({s.name or 'unnamed'}; experiment '{s.experiment}', parent run {s.run_id}), "
             f"started {s.started}, {s.status_word}, {len(reopened.trial_runs)} trial runs."]
    if gaps.complete:
        lines.append("Complete: every planned run is there and ended.")
    else:
        lines.append(f"Incomplete: {gaps.sentence()}.")
    lines += _how_it_ended(s)
    lines += [f"Browse it: {runs_url(tracking_uri, s.experiment_id)}", "", reopened.summary_text.rstrip("\n")]
    return "\n".join(lines) + "\n"


def _how_it_ended(study: StudyRun) -> list[str]:
    """What to do about a study that did not finish: the --resume that continues it."""
    resume = f"continue it with the command that started it and --resume {study.study_id}."
    if study.status == "KILLED":
        return [resume[0].upper() + resume[1:]]
    if study.status == "RUNNING":
        return [f"Still running, or its process ended without closing it; in that case {resume}"]
    if study.status == "FAILED":
        return [f"It failed ({study.reason or 'no reason recorded'}); {resume}"]
    return []


def report(tracking_uri: str, study_id: str | None = None, experiment: str | None = None) -> str:
    """`hamjepa report`: the chosen (default: newest) study's rebuilt summary."""
    client = MlflowClient(tracking_uri=tracking_uri)
    study = pick_study(find_studies(client, experiment), study_id, f"'{mask_uri(tracking_uri)}'")
    return report_text(reopen(client, study), tracking_uri)


def studies_table(tracking_uri: str, experiment: str | None = None) -> str:
    """`hamjepa studies`: one row per study, newest first: id, experiment, start, status, trial runs, verdict; "" for
    a store without studies (an empty list is an answer, not an error: a script reading it gets no rows)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    studies = find_studies(client, experiment)
    if not studies:
        return ""
    header = ("study", "experiment", "started", "status", "trials", "verdict")
    rows = [header]
    for study in studies:
        reopened = reopen(client, study)
        rows.append((study.study_id, study.experiment, study.started, study.status_word,
                     str(len(reopened.trial_runs)), reopened.verdict or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]]) for row in rows) + "\n"
