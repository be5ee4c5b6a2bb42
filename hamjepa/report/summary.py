"""Study reports: the paired comparison (markdown + CSV + parent-run metrics), built from MLflow's records (not
from Tune's memory), so what is printed is what MLflow holds.

The comparison uses only the paired runs (phase `compare`): HamJEPA's selected configuration and SIGReg on the
same fresh seeds, matched seed by seed. The search trial selected on validation is shown on its own line and never
enters a compared group (its validation score won a maximum over trials, which biases it upwards).

The decision rule (docs/method.md §10 "The decision rule", report/paired.py): the primary metric, declared
before the study (`--primary`, default test kNN@k), is the only row with a verdict word, from its paired
interval; the other test rows are secondary (Holm-adjusted p-values, no verdict word); the validation rows are
the selection split (no verdict, no p-value). Every row states the smallest difference the design detects.
Learning qualifies the verdict, it does not gate it: each method's gain over the initialisation reference
(report/reference.py; without one, over each run's own epoch 0) is stated beside it. The summary's first lines
say how the methods were tuned and which runs did not finish.

The theory section is report/theory.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlflow.tracking import MlflowClient

from hamjepa import methods, names
from hamjepa.config import Config
from hamjepa.methods import METHODS, Method
from hamjepa.names import RunState
from hamjepa.report import timing
from hamjepa.report.paired import (
    CONFIDENCE,
    POWER,
    Estimate,
    estimate,
    holm,
    min_detectable_difference,
    p_value,
    paired_differences,
    primary_verdict,
    seeds_to_resolve,
)
from hamjepa.report.reference import GAIN_CONFIDENCE, gain_over_reference, reference_size
from hamjepa.report.tables import csv_number, csv_text, markdown_table
from hamjepa.report.theory import Correlation, TheoryRow, gap_accuracy_correlation, theory_rows
from hamjepa.report.theory import markdown as theory_markdown
from hamjepa.tracking import METHOD_TAG, PARENT_TAG, PHASE_TAG, REASON_TAG, STATUS_TAG

COMPARE = "compare"  # the phase of the paired runs
BASELINE_SEARCH = "search-baseline"  # the baseline's own search (--tune-baseline)
# Method -> the label of the group its paired runs fill.
_LABELS = {method.value: method_spec.label for method, method_spec in METHODS.items()}
# The arms of a comparison, by label: HamJEPA against the baseline, and the ablation when a study adds it.
HAMJEPA, BASELINE, ABLATION = (METHODS[m].label for m in (Method.HAMJEPA, methods.BASELINE, Method.MLP))
SEARCH_KEYS = "study.search_keys"  # a study's param: its searched config keys, comma-separated


@dataclass
class RunRecord:
    run_id: str
    name: str
    phase: str
    method: str
    status: RunState | str  # ours (the hamjepa.status tag)
    reason: str
    params: dict[str, str]
    metrics: dict[str, float]
    run_status: str = ""  # MLflow's: RUNNING | FINISHED | FAILED | KILLED

    @property
    def seed(self) -> int:
        return int(self.params.get("seed", -1))

    @property
    def complete(self) -> bool:
        """Finished all epochs with final test metrics: eligible for the comparison."""
        k = int(self.params.get("eval.knn_k", 20))
        return self.status == RunState.FINISHED and names.accuracy("test", names.knn(k)) in self.metrics


def typed_param(base: Config, key: str, text: str) -> Any:
    """An MLflow param (a string) back to the config field's type."""
    return base.override({key: text}).flatten()[key]


def collect_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[RunRecord]:
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                              max_results=5000)
    return [RunRecord(run.info.run_id, run.info.run_name, run.data.tags.get(PHASE_TAG, ""),
                      run.data.tags.get(METHOD_TAG, ""), run.data.tags.get(STATUS_TAG, RunState.RUNNING.value),
                      run.data.tags.get(REASON_TAG, ""), dict(run.data.params), dict(run.data.metrics),
                      run.info.status)
            for run in runs]


def select_trial(records: Sequence[RunRecord], objective: str, phase: str = "search") -> RunRecord | None:
    """The trial of search `phase` with the best objective among those that completed every epoch."""
    eligible = [r for r in records if r.phase == phase and r.complete and objective in r.metrics]
    return max(eligible, key=lambda r: r.metrics[objective]) if eligible else None


PRIMARY, SECONDARY, SELECTION = "primary", "secondary", "selection split"  # a row's role in the decision


@dataclass
class Row:
    """One metric of the paired comparison: HamJEPA beside SIGReg over the seeds where both finished, each side's
    gain over initialisation, the row's role in the decision and what it says."""

    label: str
    metric: str
    seeds: list[int]  # the seeds where both sides have a finite value
    hamjepa: Estimate
    sigreg: Estimate
    delta: Estimate  # HamJEPA - SIGReg, paired by seed
    gains: dict[str, Estimate] = field(default_factory=dict)  # side -> final minus initialisation, per seed
    role: str = SECONDARY
    verdict: str = ""  # the primary's only
    p_holm: float = math.nan  # a secondary's Holm-adjusted two-sided p-value
    ablation: Estimate | None = None
    confidence: float = CONFIDENCE  # of the delta's interval (a sequential study's primary: 1 - alpha')

    @property
    def detectable(self) -> float:
        """The smallest difference this design detects at 80% power, from the observed paired sd."""
        return min_detectable_difference(self.delta.std, self.delta.n, self.confidence)


@dataclass
class StudySummary:
    base: Config
    selected: RunRecord | None
    arms: dict[str, dict[int, RunRecord]]  # label -> seed -> complete run
    search_keys: list[str]
    counts: dict[str, int]
    not_compared: list[RunRecord] = field(default_factory=list)  # paired runs that did not complete
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. which of Optuna's views were not drawn, and why
    theory: list[TheoryRow] = field(default_factory=list)
    primary: str = ""  # the primary metric's name
    baseline_selected: RunRecord | None = None  # the baseline's selected search trial (--tune-baseline)
    baseline_counts: dict[str, int] = field(default_factory=dict)  # its search trials by how they ended
    looks: tuple[int, ...] = ()  # a sequential study's schedule of paired seeds (--seeds auto)
    tuned: str = ""  # how each method was tuned, stated first
    correlation: Correlation = field(default_factory=Correlation.unmeasured)  # theory gap vs accuracy, all runs
    reference_n: int = 0  # encoders in the initialisation reference the gains are measured against (0: none)
    phase_seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase, this invocation
    run_seconds: dict[str, float] = field(default_factory=dict)  # seconds per part of a run, all runs summed
    objective: str = ""  # the metric the search selected on (--objective)

    @property
    def primary_confidence(self) -> float:
        """The primary's interval: 95%, or 1 - alpha' per look of a sequential study."""
        if len(self.looks) < 2:
            return CONFIDENCE
        from hamjepa.report.sequential import per_look_alpha

        return 1 - per_look_alpha(tuple(self.looks))

    @property
    def primary_row(self) -> Row | None:
        return next((row for row in self.rows if row.role == PRIMARY), None)

    def selected_params(self) -> dict[str, str]:
        return {k: self.selected.params[k] for k in self.search_keys} if self.selected else {}

    def parent_metrics(self) -> dict[str, float]:
        """The comparison as parent-run metrics: delta_<metric>[_ci_low|_ci_high], gain_<side>_<metric>[...]."""
        out: dict[str, float] = {}
        for row in self.rows:
            out.update(_estimate_metrics(f"delta_{row.metric}", row.delta))
            out[f"detectable_{row.metric}"] = row.detectable
            if row.role == SECONDARY:
                out[f"p_holm_{row.metric}"] = row.p_holm
            for side, gain in row.gains.items():
                out.update(_estimate_metrics(f"gain_{side.lower()}_{row.metric}", gain))
        for theory_row in self.theory:
            out.update(_estimate_metrics(f"delta_{theory_row.metric}", theory_row.delta))
        if math.isfinite(self.correlation.rho):
            out.update({"theory_spearman": self.correlation.rho, "theory_spearman_ci_low": self.correlation.low,
                        "theory_spearman_ci_high": self.correlation.high, "theory_spearman_n": self.correlation.n})
        if self.selected:
            out[f"selected/{self.objective}"] = self.selected.metrics[self.objective]
        return {k: v for k, v in out.items() if math.isfinite(v)}


def _estimate_metrics(name: str, value: Estimate) -> dict[str, float]:
    return {name: value.mean, f"{name}_ci_low": value.low, f"{name}_ci_high": value.high}


def summarize(records: Sequence[RunRecord], search_keys: Sequence[str], base: Config, primary: str = "",
              tuned: str = "", looks: Sequence[int] = (),
              reference: Mapping[str, Mapping[str, list[float]]] | None = None,
              phase_seconds: Mapping[str, float] | None = None, objective: str = "") -> StudySummary:
    """The paired comparison from MLflow's records. `looks`: a sequential study's schedule (--seeds auto), whose
    primary is judged at the per-look level that keeps the overall false-positive rate at 5%. `reference`: the
    initialisation reference (report/reference.py `load_reference`), against which each method's gain is
    measured; without one, each run's own epoch 0 is. `phase_seconds`: the phases' wall time, for the line on
    where the time went. `objective`: the metric the search selected on (default validation kNN@k)."""
    objective = objective or names.objective(base.eval.knn_k)
    primary = primary or names.default_primary(base.eval.knn_k)
    search = [r for r in records if r.phase == "search"]
    paired = [r for r in records if r.phase == COMPARE]
    arms = {label: {r.seed: r for r in paired if r.method == method and r.complete}
            for method, label in _LABELS.items()}
    counts = _counts(search)
    not_compared = [r for r in paired if not r.complete]
    summary = StudySummary(base, select_trial(records, objective), arms, list(search_keys), counts, not_compared,
                           primary=primary, tuned=tuned, looks=tuple(looks), reference_n=reference_size(reference),
                           phase_seconds=dict(phase_seconds or {}), run_seconds=timing.run_parts(records),
                           objective=objective)
    hamjepa, sigreg, mlp = arms[HAMJEPA], arms[BASELINE], arms[ABLATION]
    for label, metric in names.comparison_metrics(base.eval.knn_k):
        seeds, h, g = _paired(hamjepa, sigreg, metric)
        gains = {side: _gain(runs, seeds, metric, (reference or {}).get(method, {}).get(metric))
                 for side, method, runs in ((HAMJEPA, Method.HAMJEPA.value, hamjepa),
                                            (BASELINE, methods.BASELINE.value, sigreg))}
        ablation = estimate([r.metrics[metric] for r in mlp.values() if metric in r.metrics]) if mlp else None
        role = PRIMARY if metric == primary else SELECTION if metric.startswith("val_") else SECONDARY
        confidence = summary.primary_confidence if role == PRIMARY else CONFIDENCE
        summary.rows.append(Row(label, metric, seeds, estimate(h), estimate(g),
                                estimate(paired_differences(h, g), confidence), gains, role, ablation=ablation,
                                confidence=confidence))
    baseline_search = [r for r in records if r.phase == BASELINE_SEARCH]
    if baseline_search:
        summary.baseline_counts = _counts(baseline_search)
        summary.baseline_selected = select_trial(records, objective, BASELINE_SEARCH)
    _decide(summary)
    summary.theory = theory_rows(hamjepa, sigreg, _paired)
    summary.correlation = gap_accuracy_correlation(records)
    return summary


def _counts(trials: Sequence[RunRecord]) -> dict[str, int]:
    return {"trials": len(trials), **{status.value: sum(r.status == status for r in trials) for status in RunState}}


def _decide(summary: StudySummary) -> None:
    """The primary's verdict word (with its learning qualifier); the secondaries' Holm-adjusted p-values."""
    secondaries = [row for row in summary.rows if row.role == SECONDARY]
    for row, adjusted in zip(secondaries, holm([p_value(row.delta) for row in secondaries]), strict=True):
        row.p_holm = adjusted
    primary = summary.primary_row
    if primary is not None:
        primary.verdict = primary_verdict(primary.delta, primary.label, HAMJEPA, BASELINE)
        not_learning = [side for side, gain in primary.gains.items() if not gain.above_zero]
        if primary.delta.n >= 2 and not_learning:
            primary.verdict += "; " + "; ".join(f"{side}'s gain over initialisation not resolved"
                                                for side in not_learning)


def _paired(first: dict[int, RunRecord], second: dict[int, RunRecord],
            metric: str) -> tuple[list[int], list[float], list[float]]:
    """(seeds, first's values, second's values) over the seeds where both runs have a finite `metric`, in seed
    order: a pair with a NaN side is not a pair (its run is counted as not finished, never averaged)."""
    seeds = sorted(s for s in first.keys() & second.keys()
                   if math.isfinite(first[s].metrics.get(metric, math.nan))
                   and math.isfinite(second[s].metrics.get(metric, math.nan)))
    return seeds, [first[s].metrics[metric] for s in seeds], [second[s].metrics[metric] for s in seeds]


def _gain(runs: dict[int, RunRecord], seeds: Sequence[int], metric: str,
          reference: Sequence[float] | None) -> Estimate:
    """What the runs of `seeds` learned on `metric`: their final mean minus the initialisation reference's (Welch),
    else, with no reference, final minus the same run's epoch 0, per seed, over the seeds that have both."""
    if reference:
        return gain_over_reference([runs[s].metrics[metric] for s in seeds], reference)
    initial = names.init(metric)
    return estimate([runs[s].metrics[metric] - runs[s].metrics[initial] for s in seeds if initial in runs[s].metrics])


def _spread(value: Estimate) -> str:
    if value.n == 0:
        return "-"
    return f"{value.mean:.2f} +/- {value.std:.2f}" if value.n > 1 else f"{value.mean:.2f}"


def protocol_line(base: Config) -> str:
    """What the numbers were measured under: a number without its protocol is not a result."""
    d, o = base.data, base.optim
    images = f"{d.subset:,} images" if d.subset else "all images"
    return (f"Protocol: {d.dataset} ({images}, {d.val_size:,} more held out for validation), {o.epochs} epochs, "
            f"batch {o.batch_size}, lr {o.lr:g}, ResNet-18 width {base.encoder.width:g} read out at "
            f"{base.encoder.readout}, token dim {base.encoder.token_dim}; kNN@{base.eval.knn_k}, linear probe "
            f"{base.eval.probe_epochs} epochs.")


def to_markdown(summary: StudySummary) -> str:
    k = summary.base.eval.knn_k
    primary = summary.primary_row
    seeds = primary.seeds if primary else (summary.rows[0].seeds if summary.rows else [])
    with_ablation = bool(summary.arms[ABLATION])
    lines = [*_first_lines(summary),
             f"Paired comparison on seeds {', '.join(map(str, seeds)) or '(none)'} (n = {len(seeds)}): fresh "
             "seeds, not the search's; each seed gives both methods the same data split, sample order, augmentation "
             f"stream and encoder initialisation. Cells: mean +/- std over seeds; [{CONFIDENCE:.0%} Student-t "
             f"interval over the paired differences]. {_gain_legend(summary)} Detectable = the smallest difference "
             f"this design detects at {POWER:.0%} power. Secondary "
             "rows: two-sided paired t-test p-values, Holm-adjusted over the secondaries; the selection split is the "
             "one the search chose on.",
             ""]
    header = ["metric (%)", "role", HAMJEPA, BASELINE, f"{HAMJEPA} - {BASELINE}", "detectable", f"gain: {HAMJEPA}",
              f"gain: {BASELINE}", "decision"]
    rows = []
    for row in summary.rows:
        decision = row.verdict if row.role == PRIMARY else (
            f"p (Holm) = {row.p_holm:.3g}" if row.role == SECONDARY and math.isfinite(row.p_holm) else "-")
        cells = [row.label, row.role, _spread(row.hamjepa), _spread(row.sigreg), row.delta.text(signed=True),
                 f"{row.detectable:.2f}" if math.isfinite(row.detectable) else "-",
                 row.gains[HAMJEPA].text(signed=True), row.gains[BASELINE].text(signed=True), decision]
        if with_ablation:
            cells.append(_spread(row.ablation) if row.ablation else "-")
        rows.append(cells)
    lines += markdown_table(header + ([ABLATION] if with_ablation else []), rows)
    lines += ["", _overall(summary), *_design_line(summary), *_seeds_needed(summary), "",
              *theory_markdown(summary.theory, summary.correlation), protocol_line(summary.base),
              *timing.lines(summary.phase_seconds, summary.run_seconds)]
    lines += ["", *_search_lines(HAMJEPA, summary.counts, summary.selected, summary.search_keys, k)]
    if summary.baseline_counts:
        keys = sorted(key for key in (summary.baseline_selected.params if summary.baseline_selected else {})
                      if key.startswith("sigreg."))
        lines += _search_lines(BASELINE, summary.baseline_counts, summary.baseline_selected, keys, k)
    lines += summary.notes
    return "\n".join(lines) + "\n"


def _gain_legend(summary: StudySummary) -> str:
    if summary.reference_n:
        return (f"Gain = final mean minus the mean of {summary.reference_n} encoders at initialisation (seeds no run "
                f"trains on, evaluated alike) [{GAIN_CONFIDENCE:.0%} Welch interval: learned when its lower end is "
                "above 0, one-sided at 5%].")
    return ("Gain = final minus the same run's readout at initialisation (epoch 0) [95% paired interval]; this study "
            "has no initialisation reference.")


def _search_lines(label: str, c: dict[str, int], selected: RunRecord | None, keys: Sequence[str], k: int) -> list[str]:
    """A search's trials by how they ended, and the configuration it selected (shown apart, never compared)."""
    lines = [f"{label} search trials: {c['trials']} ({c['finished']} finished, {c['stopped']} stopped early, "
             f"{c['diverged']} diverged, {c['failed']} failed)."]
    if selected is None:
        return [*lines, f"No {label} trial completed all epochs, so no configuration was selected."]
    params = ", ".join(f"{key}={selected.params[key]}" for key in keys if key in selected.params)
    shown = ", ".join(f"{name} {selected.metrics[metric]:.2f}" for name, metric in names.comparison_metrics(k)
                      if metric in selected.metrics)
    return [*lines, f"{label} selected on validation ({selected.name}, search seed {selected.seed}; not in the "
                    f"comparison, its validation score is a maximum over trials): {shown}. Configuration: {params}."]


def _first_lines(summary: StudySummary) -> list[str]:
    """What a reader must know before any number: how each method was tuned, and runs that did not finish."""
    lines = [summary.tuned] if summary.tuned else []
    if summary.not_compared:
        lines.append("Not compared, did not finish: " + ", ".join(
            f"{r.name} ({r.status}{': ' + r.reason if r.reason else ''})" for r in summary.not_compared)
            + "; the comparison uses the seeds where both methods finished.")
    return [*lines, ""] if lines else []


def _outcomes(summary: StudySummary) -> str:
    """Per method: finished / diverged / failed paired runs."""
    parts = []
    for label, arm in ((HAMJEPA, summary.arms[HAMJEPA]), (BASELINE, summary.arms[BASELINE])):
        method = next(m for m, name in _LABELS.items() if name == label)
        cut = [r for r in summary.not_compared if r.method == method]
        diverged = sum(r.status == RunState.DIVERGED for r in cut)
        parts.append(f"{label} {len(arm)} finished, {diverged} diverged, {len(cut) - diverged} failed")
    return "; ".join(parts)


def _overall(summary: StudySummary) -> str:
    """The study's answer in one sentence: the primary's verdict, on how many seeds, with the runs' outcomes."""
    primary = summary.primary_row
    if primary is None or primary.delta.n == 0:
        return f"Verdict: no paired runs completed, so there is no comparison ({_outcomes(summary)})."
    planned = len({r.seed for arm in (summary.arms[HAMJEPA], summary.arms[BASELINE]) for r in arm.values()}
                  | {r.seed for r in summary.not_compared})
    return (f"Verdict (primary, declared before the study: {primary.label}): {primary.verdict}; on {primary.delta.n} "
            f"of {planned} seeds ({_outcomes(summary)}).")


def _design_line(summary: StudySummary) -> list[str]:
    """A sequential study's schedule, its per-look level and where it stopped."""
    primary = summary.primary_row
    if len(summary.looks) < 2 or primary is None:
        return []
    n, most = primary.delta.n, summary.looks[-1]
    resolved = primary.delta.above_zero or primary.delta.below_zero
    where = (f"stopped at n = {n}: resolved" if resolved else f"reached its maximum, n = {most}: not resolved"
             if n >= most else f"at n = {n}, not resolved yet (the study is incomplete)")
    return [f"Sequential design (--seeds auto:{most}): looks at {', '.join(map(str, summary.looks))} paired seeds, "
            f"each judged at level {1 - summary.primary_confidence:.4f} (Pocock-style: the overall false-positive "
            f"rate stays at 5%), so the primary's interval is {summary.primary_confidence:.1%}; {where}."]


def _seeds_needed(summary: StudySummary) -> list[str]:
    """When the primary is not resolved: how many paired seeds would resolve the observed difference."""
    primary = summary.primary_row
    if primary is None or primary.delta.n < 2 or primary.delta.above_zero or primary.delta.below_zero:
        return []
    needed = seeds_to_resolve(primary.delta.mean, primary.delta.std)
    count = f"about {needed}" if needed <= 1000 else "more than 1000"
    return [f"Resolving the observed difference ({primary.delta.mean:+.2f} points, paired sd "
            f"{primary.delta.std:.2f}) at {POWER:.0%} power would take {count} paired seeds (`--seeds`)."]


CSV_COLUMNS = ["metric", "label", "role", "n", "hamjepa_mean", "hamjepa_std", "sigreg_mean", "sigreg_std", "delta",
               "delta_ci_low", "delta_ci_high", "detectable", "p_holm", "hamjepa_gain", "hamjepa_gain_ci_low",
               "hamjepa_gain_ci_high", "sigreg_gain", "sigreg_gain_ci_low", "sigreg_gain_ci_high", "verdict"]


def _row_values(row: Row) -> list[Any]:
    """A row's cells in CSV_COLUMNS order, numbers as floats (NaN where undefined, e.g. no interval at n = 1)."""
    h, g = row.gains[HAMJEPA], row.gains[BASELINE]
    values = [row.hamjepa.mean, row.hamjepa.std, row.sigreg.mean, row.sigreg.std, row.delta.mean, row.delta.low,
              row.delta.high, row.detectable, row.p_holm, h.mean, h.low, h.high, g.mean, g.low, g.high]
    return [row.metric, row.label, row.role, row.delta.n, *values, row.verdict]


def to_csv(summary: StudySummary) -> str:
    """One row per metric (CSV_COLUMNS); empty cells where a value is undefined (no interval at n = 1)."""
    rows = []
    for row in summary.rows:
        cells = _row_values(row)
        rows.append([*cells[:4], *map(csv_number, cells[4:-1]), cells[-1]])
    return csv_text(CSV_COLUMNS, rows)


def to_records(summary: StudySummary) -> list[dict[str, Any]]:
    """The table as data: one dict per metric, keyed by CSV_COLUMNS (the same cells as summary.csv, numbers as
    floats), e.g. for `pandas.DataFrame(result.table)`."""
    return [dict(zip(CSV_COLUMNS, _row_values(row))) for row in summary.rows]
