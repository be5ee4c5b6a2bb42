"""A search study from start to summary: search (Optuna over HamJEPA), select on validation, compare the selected
configuration with SIGReg on fresh paired seeds, evaluate the initialisation reference, summarise from MLflow.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna

from hamjepa import storage
from hamjepa.errors import UserError
from hamjepa.redact import mask_uri
from hamjepa.report.summary import BASELINE_SEARCH, COMPARE, select_trial, summarize, typed_param
from hamjepa.study.invocation import Invocation, StudyResult
from hamjepa.study.reference import run_reference
from hamjepa.study.search import asha_scheduler, baseline_space, close_orphans, rdb_storage, search_algorithm
from hamjepa.study.settings import StudySettings, comparison_cells, search_params
from hamjepa.study.space import SearchSpace

OPTUNA_FILE = "optuna.db"  # the live Optuna study, in the study's folder unless --optuna-storage says otherwise


def optuna_storage_url(settings: StudySettings, folder: str, study_id: str) -> str:
    """--optuna-storage, else SQLite in the study's folder; a study kept in a bucket (s3://) keeps its Optuna file
    on this machine, under ~/.cache/hamjepa/optuna/<study id>/ (SQLite needs a local file)."""
    if settings.optuna_storage:
        return settings.optuna_storage
    local = folder if not storage.is_uri(folder) else str(Path.home() / ".cache" / "hamjepa" / "optuna" / study_id)
    Path(local).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(local) / OPTUNA_FILE}"


def run_study(settings: StudySettings, space: SearchSpace,
              initial_points: list[dict[str, Any]] | None = None) -> StudyResult:
    """Search, then the paired comparison (selected HamJEPA, SIGReg, optional ablation); log; summarise.

    Optuna evaluates the base config's values first, then `initial_points` (each must set every searched
    key), then its own proposals. A resumed study skips a phase whose runs have all ended.
    """
    initial_points = list(initial_points or [])
    space.check(settings.base)
    for point in initial_points:
        if set(point) != set(space):
            raise UserError(f"initial point {point} is invalid: it must set exactly the searched keys "
                            f"{', '.join(space)}.")
        settings.base.override(point)
    with Invocation(settings, search_params(settings, space)) as study:
        url = optuna_storage_url(settings, study.folder, study.study_id)
        print(f"[{study.study_id}] the search, live: optuna-dashboard {mask_uri(url)}", flush=True)
        try:
            _search_then_compare(study, space, url, initial_points)
        except KeyboardInterrupt:  # outside a phase (e.g. while the next one is planned): the same as inside
            study.interrupted = True
        result = _summarise(study, space)
    result.optuna_study = _load_optuna_study(url, study.study_id)
    result.optuna_storage = url
    return result


def _load_optuna_study(url: str, name: str) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=name, storage=rdb_storage(url))
    except KeyError:  # interrupted before the search's first trial
        return None


def _search(study: Invocation, name: str, space: SearchSpace, settings: StudySettings, url: str, optuna_name: str,
            initial_points: list[dict[str, Any]]) -> None:
    """One search phase; once it has ended, Optuna trials no Tune trial will tell any more are closed as FAIL."""
    if study.phase_done(name, settings.num_samples):
        return
    domains = space.tune()
    study.run_phase(name, domains, settings.num_samples, settings=settings, num_samples=settings.num_samples,
                    search_alg=search_algorithm(settings, domains, optuna_name, initial_points, url),
                    scheduler=asha_scheduler(settings))
    if not study.interrupted:
        optuna_study = _load_optuna_study(url, optuna_name)
        if optuna_study is not None:
            close_orphans(optuna_study, "its Tune trial ended without telling it")


def _search_then_compare(study: Invocation, space: SearchSpace, url: str, initial_points) -> None:
    settings = study.settings
    _search(study, "search", space, settings, url, study.study_id, initial_points)
    if settings.tune_baseline:
        # The same budget, scheduler and selection rule as HamJEPA's search; its own Optuna study.
        _search(study, BASELINE_SEARCH, baseline_space(), settings.baseline(), url, f"{study.study_id}-baseline", [])
    if study.interrupted:
        return
    records = study.records()
    selected = _selected(records, settings, "search", space)
    tuned_baseline = _selected(records, settings, BASELINE_SEARCH, baseline_space()) if settings.tune_baseline else None
    _compare(study, space, selected, tuned_baseline)
    run_reference(study)


def _compare(study: Invocation, space: Mapping[str, Any], selected, tuned_baseline) -> None:
    """The paired comparison: all seeds at once, or (--seeds auto) look by look until the primary is resolved at
    the sequential design's per-look level."""
    settings = study.settings
    schedule = settings.looks
    for look in schedule:
        name = COMPARE if len(schedule) == 1 else f"{COMPARE}-look{look}"
        study.run_cells(COMPARE, comparison_cells(settings, selected, tuned_baseline, seeds=look), tune_name=name)
        if study.interrupted or look == schedule[-1]:
            return
        primary = summarize(study.records(), list(space), settings.base, settings.primary_metric,
                            looks=schedule, objective=settings.objective).primary_row
        if primary.delta.above_zero or primary.delta.below_zero:
            print(f"[{study.study_id}] resolved at look n = {look}: {primary.verdict}", flush=True)
            return


def _selected(records, settings: StudySettings, phase: str, space: Mapping[str, Any]) -> dict[str, Any] | None:
    """The searched values of a search phase's selected trial (best validation objective), typed; None if none."""
    chosen = select_trial(records, settings.objective, phase)
    return {k: typed_param(settings.base, k, chosen.params[k]) for k in space} if chosen else None


def _summarise(study: Invocation, space: SearchSpace) -> StudyResult:
    """The study's summary (and, once complete, Optuna's views of the search) logged on the parent run."""
    from hamjepa.report import theory
    from hamjepa.report.reference import load_reference
    from hamjepa.report.search_views import search_views
    from hamjepa.report.summary import summarize, to_csv, to_markdown
    from hamjepa.report.timing import phase_metric

    settings = study.settings
    records = study.records()
    summary = summarize(records, list(space), settings.base, settings.primary_metric, settings.tuning,
                        looks=settings.looks if settings.sequential else (),
                        reference=load_reference(study.parent.client, records, settings.base),
                        phase_seconds=study.phase_seconds, objective=settings.objective)
    if not study.interrupted:
        # Optuna's own views of the search, and the search as an Optuna study file, rebuilt from MLflow.
        with tempfile.TemporaryDirectory() as folder:
            views = search_views(records, space.tune(), settings.base, study.parent.client, settings.objective,
                                 study.study_id, Path(folder))
            study.parent.log_artifact(views.database)
            for path in [*views.plots, *theory.plots(records, Path(folder))]:
                study.parent.log_artifact(path, "plots")
        summary.notes = views.notes
        study.parent.log_metrics({**summary.parent_metrics(),
                                  **{phase_metric(p): s for p, s in study.phase_seconds.items()}}, step=0)
    text = to_markdown(summary)
    return study.finish(summary, text, {"summary.md": text, "summary.csv": to_csv(summary)})
