"""A search study from start to summary: search (Optuna over HamJEPA), select on validation, compare the selected
configuration with SIGReg on fresh paired seeds, evaluate the initialisation reference, summarise from MLflow.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hamjepa.errors import UserError
from hamjepa.report.summary import BASELINE_SEARCH, COMPARE, select_trial, summarize, typed_param
from hamjepa.study.invocation import Invocation, StudyResult
from hamjepa.study.reference import run_reference
from hamjepa.study.search import FullTrialOptunaSearch, asha_scheduler, baseline_space, search_algorithm
from hamjepa.study.settings import StudySettings, comparison_cells, validate_search_space


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
                               "study.search_keys": ",".join(space), "study.ablation": settings.ablation,
                               "study.primary": settings.primary_metric,
                               "study.tune_baseline": settings.tune_baseline,
                               "study.sequential": settings.sequential,
                               "study.reference": settings.reference}) as study:
        searcher = search_algorithm(settings, space, study.study_id, initial_points)
        try:
            _search_then_compare(study, space, searcher)
        except KeyboardInterrupt:  # outside a phase (e.g. while the next one is planned): the same as inside
            study.interrupted = True
        result = _summarise(study, space)
    result.optuna_study = searcher.study
    return result


def _search_then_compare(study: Invocation, space: Mapping[str, Any], searcher: FullTrialOptunaSearch) -> None:
    settings = study.settings
    if not study.phase_done("search", settings.num_samples):
        study.run_phase("search", dict(space), settings.num_samples, num_samples=settings.num_samples,
                        search_alg=searcher, scheduler=asha_scheduler(settings))
    baseline = settings.baseline()
    if settings.tune_baseline and not study.phase_done(BASELINE_SEARCH, settings.num_samples):
        # The same budget, scheduler and selection rule as HamJEPA's search; its own Optuna study.
        study.run_phase(BASELINE_SEARCH, baseline_space(), settings.num_samples, settings=baseline,
                        num_samples=settings.num_samples, scheduler=asha_scheduler(baseline),
                        search_alg=search_algorithm(baseline, baseline_space(), f"{study.study_id}-baseline", []))
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
                            looks=schedule).primary_row
        if primary.delta.above_zero or primary.delta.below_zero:
            print(f"[{study.study_id}] resolved at look n = {look}: {primary.verdict}", flush=True)
            return


def _selected(records, settings: StudySettings, phase: str, space: Mapping[str, Any]) -> dict[str, Any] | None:
    """The searched values of a search phase's selected trial (best validation objective), typed; None if none."""
    chosen = select_trial(records, settings.objective, phase)
    return {k: typed_param(settings.base, k, chosen.params[k]) for k in space} if chosen else None


def _summarise(study: Invocation, space: Mapping[str, Any]) -> StudyResult:
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
                        phase_seconds=study.phase_seconds)
    if not study.interrupted:
        # Optuna's own views of the search, and the search as an Optuna study file, rebuilt from MLflow.
        with tempfile.TemporaryDirectory() as folder:
            views = search_views(records, space, settings.base, study.parent.client, settings.objective,
                                 study.study_id, Path(folder))
            study.parent.log_artifact(views.database)
            for path in [*views.plots, *theory.plots(records, Path(folder))]:
                study.parent.log_artifact(path, "plots")
        summary.notes = views.notes
        study.parent.log_metrics({**summary.parent_metrics(),
                                  **{phase_metric(p): s for p, s in study.phase_seconds.items()}}, step=0)
    text = to_markdown(summary)
    return study.finish(summary, text, {"summary.md": text, "summary.csv": to_csv(summary)})
