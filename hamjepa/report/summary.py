"""Study reports: the paired comparison (markdown + CSV + parent-run metrics) and objective plots.

Built from MLflow's records (not from Tune's memory), so what is printed is what MLflow holds.
The comparison uses only the paired runs (phase `compare`): HamJEPA's selected configuration and SIGReg on
the same fresh seeds, matched seed by seed. The search trial that was selected on
validation is shown on its own line and never enters a compared group (its validation score won a
maximum over trials, which biases it upwards). For every metric: each side's mean +/- std over seeds, the
mean paired difference with a 95% t-interval, each side's gain over its own initialisation (epoch 0) with
its interval, and a verdict in words (paired.verdict).

The theory check (docs/method.md §9, theory.py) pairs the same runs on the price of isotropy rho and the entropy
gap of each run's representation to its probe's optimal covariance, says in one sentence whether the paper's
prediction held, and `theory_plots` draws every run's linear-probe-minus-kNN difference against its rho.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mlflow.tracking import MlflowClient

from hamjepa import methods, names
from hamjepa.config import Config
from hamjepa.methods import METHODS, Method
from hamjepa.names import RunState
from hamjepa.report.paired import CONFIDENCE, Estimate, estimate, paired_differences, verdict
from hamjepa.report.tables import csv_number, csv_text, markdown_table
from hamjepa.report.theory import Correlation, TheoryRow, gap_accuracy_correlation, theory_rows
from hamjepa.report.theory import markdown as theory_markdown
from hamjepa.tracking import METHOD_TAG, PARENT_TAG, PHASE_TAG, REASON_TAG, STATUS_TAG

COMPARE = "compare"  # the phase of the paired runs
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


def select_trial(records: Sequence[RunRecord], objective: str) -> RunRecord | None:
    """The search trial with the best objective among those that completed every epoch."""
    eligible = [r for r in records if r.phase == "search" and r.complete and objective in r.metrics]
    return max(eligible, key=lambda r: r.metrics[objective]) if eligible else None


@dataclass
class PairedRow:
    """One metric, HamJEPA beside SIGReg over the seeds both have."""

    label: str
    metric: str
    seeds: list[int]  # the seeds where both sides have the metric
    hamjepa: Estimate
    sigreg: Estimate
    delta: Estimate  # HamJEPA - SIGReg, paired by seed


@dataclass
class Row(PairedRow):
    """One metric of the paired comparison, with each side's gain over initialisation and the verdict."""

    gains: dict[str, Estimate] = field(default_factory=dict)  # side -> final minus initialisation, per seed
    verdict: str = ""
    ablation: Estimate | None = None


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
    correlation: Correlation = field(default_factory=Correlation.unmeasured)  # theory gap vs accuracy, all runs

    @property
    def objective(self) -> str:
        return names.objective(self.base.eval.knn_k)

    def selected_params(self) -> dict[str, str]:
        return {k: self.selected.params[k] for k in self.search_keys} if self.selected else {}

    def parent_metrics(self) -> dict[str, float]:
        """The comparison as parent-run metrics: delta_<metric>[_ci_low|_ci_high], gain_<side>_<metric>[...]."""
        out: dict[str, float] = {}
        for row in self.rows:
            out.update(_estimate_metrics(f"delta_{row.metric}", row.delta))
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


def summarize(records: Sequence[RunRecord], search_keys: Sequence[str], base: Config) -> StudySummary:
    objective = names.objective(base.eval.knn_k)
    search = [r for r in records if r.phase == "search"]
    paired = [r for r in records if r.phase == COMPARE]
    arms = {label: {r.seed: r for r in paired if r.method == method and r.complete}
            for method, label in _LABELS.items()}
    counts = {"trials": len(search), **{status.value: sum(r.status == status for r in search) for status in RunState}}
    not_compared = [r for r in paired if not r.complete]
    summary = StudySummary(base, select_trial(records, objective), arms, list(search_keys), counts, not_compared)
    hamjepa, sigreg, mlp = arms[HAMJEPA], arms[BASELINE], arms[ABLATION]
    for label, metric in names.comparison_metrics(base.eval.knn_k):
        seeds, h, g = _paired(hamjepa, sigreg, metric)
        delta = estimate(paired_differences(h, g))
        gains = {side: _gain(runs, seeds, metric) for side, runs in ((HAMJEPA, hamjepa), (BASELINE, sigreg))}
        ablation = estimate([r.metrics[metric] for r in mlp.values() if metric in r.metrics]) if mlp else None
        summary.rows.append(Row(label, metric, seeds, estimate(h), estimate(g), delta, gains,
                                verdict(delta, gains), ablation))
    summary.theory = theory_rows(hamjepa, sigreg, _paired)
    summary.correlation = gap_accuracy_correlation(records)
    return summary


def _paired(first: dict[int, RunRecord], second: dict[int, RunRecord],
            metric: str) -> tuple[list[int], list[float], list[float]]:
    """(seeds, first's values, second's values) over the seeds where both runs have `metric`, in seed order."""
    seeds = sorted(s for s in first.keys() & second.keys()
                   if metric in first[s].metrics and metric in second[s].metrics)
    return seeds, [first[s].metrics[metric] for s in seeds], [second[s].metrics[metric] for s in seeds]


def _gain(runs: dict[int, RunRecord], seeds: Sequence[int], metric: str) -> Estimate:
    """Final minus initialisation (epoch 0) of `metric`, per seed, over the seeds that have both."""
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
    return (f"Protocol: {d.dataset} ({images}, {d.val_fraction:.0%} held out for validation), {o.epochs} epochs, "
            f"batch {o.batch_size}, lr {o.lr:g}, ResNet-18 width {base.encoder.width:g} read out at "
            f"{base.encoder.readout}, token dim {base.encoder.token_dim}; kNN@{base.eval.knn_k}, linear probe "
            f"{base.eval.probe_epochs} epochs.")


def to_markdown(summary: StudySummary) -> str:
    k = summary.base.eval.knn_k
    seeds = summary.rows[0].seeds if summary.rows else []
    n = len(seeds)
    with_ablation = bool(summary.arms[ABLATION])
    lines = [
        f"Paired comparison on seeds {', '.join(map(str, seeds)) or '(none)'} (n = {n}): fresh seeds, not the "
        "search's; each seed gives both methods the same data split, sample order, augmentation stream and "
        f"encoder initialisation. Cells: mean +/- std over seeds; [{CONFIDENCE:.0%} Student-t interval over the n "
        "paired differences]. Gain = final minus the same run's readout at initialisation (epoch 0).",
        "",
    ]
    header = ["metric (%)", HAMJEPA, BASELINE, f"{HAMJEPA} - {BASELINE}", f"gain: {HAMJEPA}", f"gain: {BASELINE}",
              "verdict"]
    rows = []
    for row in summary.rows:
        cells = [row.label, _spread(row.hamjepa), _spread(row.sigreg), row.delta.text(signed=True),
                 row.gains[HAMJEPA].text(signed=True), row.gains[BASELINE].text(signed=True), row.verdict]
        if with_ablation:
            cells.append(_spread(row.ablation) if row.ablation else "-")
        rows.append(cells)
    lines += markdown_table(header + ([ABLATION] if with_ablation else []), rows)
    lines += ["", _overall(summary, k), "",
              *theory_markdown(summary.theory, summary.correlation),
              protocol_line(summary.base)]
    if summary.not_compared:
        lines.append("Not compared (did not finish): " + ", ".join(
            f"{r.name} ({r.status}{': ' + r.reason if r.reason else ''})" for r in summary.not_compared) + ".")
    c = summary.counts
    lines += ["", f"Search trials: {c['trials']} ({c['finished']} finished, {c['stopped']} stopped early, "
                  f"{c['diverged']} diverged, {c['failed']} failed)."]
    if summary.selected:
        s = summary.selected
        params = ", ".join(f"{key}={value}" for key, value in summary.selected_params().items())
        shown = ", ".join(f"{label} {s.metrics[metric]:.2f}" for label, metric in names.comparison_metrics(k)
                          if metric in s.metrics)
        lines.append(f"Selected on validation ({s.name}, search seed {s.seed}; not in the comparison, its validation "
                     f"score is a maximum over trials): {shown}. Configuration: {params}.")
    else:
        lines.append("No HamJEPA trial completed all epochs, so no configuration was selected.")
    lines += summary.notes
    return "\n".join(lines) + "\n"


def _overall(summary: StudySummary, k: int) -> str:
    """The study's answer in one sentence, from the test rows."""
    test = {row.label: row for row in summary.rows if row.label.startswith("test")}
    if not test or all(row.delta.n == 0 for row in test.values()):
        return "Verdict: no paired runs completed, so there is no comparison."
    parts = [f"{label.removeprefix('test ')}: {row.verdict}" for label, row in test.items()]
    return "Verdict (test split): " + "; ".join(parts) + "."


CSV_COLUMNS = ["metric", "label", "n", "hamjepa_mean", "hamjepa_std", "sigreg_mean", "sigreg_std", "delta",
               "delta_ci_low", "delta_ci_high", "hamjepa_gain", "hamjepa_gain_ci_low", "hamjepa_gain_ci_high",
               "sigreg_gain", "sigreg_gain_ci_low", "sigreg_gain_ci_high", "verdict"]


def to_csv(summary: StudySummary) -> str:
    """One row per metric (CSV_COLUMNS); empty cells where a value is undefined (no interval at n = 1)."""
    rows = []
    for row in summary.rows:
        h, g = row.gains[HAMJEPA], row.gains[BASELINE]
        values = [row.hamjepa.mean, row.hamjepa.std, row.sigreg.mean, row.sigreg.std, row.delta.mean,
                  row.delta.low, row.delta.high, h.mean, h.low, h.high, g.mean, g.low, g.high]
        rows.append([row.metric, row.label, row.delta.n, *map(csv_number, values), row.verdict])
    return csv_text(CSV_COLUMNS, rows)
