"""Study reports: the comparison table (markdown + CSV) and objective-vs-hyperparameter plots.

Built from MLflow's records (not from Tune's memory), so what is printed is what MLflow holds.
Groups: HamJEPA = the best search trial plus its confirmation seeds; SIGReg = the baseline seeds;
MLP-HJEPA = the ablation seeds. Cells are mean +/- std over seeds, with n.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.tracking import MlflowClient

from .tracking import METHOD_TAG, PARENT_TAG

OBJECTIVE = "val_knn20_top1"
TABLE_METRICS = (
    ("val kNN@20", "val_knn20_top1"),
    ("val linear probe", "val_linprobe_top1"),
    ("test kNN@20", "test_knn20_top1"),
    ("test linear probe", "test_linprobe_top1"),
)


@dataclass
class RunRecord:
    run_id: str
    name: str
    phase: str
    method: str
    status: str  # ours (the hamjepa.status tag): finished | stopped | diverged | failed | running
    reason: str
    params: dict[str, str]
    metrics: dict[str, float]
    run_status: str = ""  # MLflow's: RUNNING | FINISHED | FAILED | KILLED

    @property
    def complete(self) -> bool:
        """Finished all epochs with final test metrics: eligible for the comparison."""
        return self.status == "finished" and "test_knn20_top1" in self.metrics


def collect_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[RunRecord]:
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                              max_results=5000)
    return [RunRecord(run.info.run_id, run.info.run_name, run.data.tags.get("hamjepa.phase", ""),
                      run.data.tags.get(METHOD_TAG, ""), run.data.tags.get("hamjepa.status", "running"),
                      run.data.tags.get("hamjepa.reason", ""), dict(run.data.params), dict(run.data.metrics),
                      run.info.status)
            for run in runs]


@dataclass
class Cell:
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else math.nan

    def text(self) -> str:
        if not self.values:
            return "-"
        spread = f" +/- {self.std:.2f}" if self.n > 1 else ""
        return f"{self.mean:.2f}{spread} (n={self.n})"


@dataclass
class StudySummary:
    best: RunRecord | None
    groups: dict[str, list[RunRecord]]  # label -> runs
    search_keys: list[str]
    counts: dict[str, int]
    rows: list[tuple[str, dict[str, Cell], float]] = field(default_factory=list)  # (metric, cells, delta)

    def best_params(self) -> dict[str, str]:
        return {k: self.best.params[k] for k in self.search_keys} if self.best else {}


def summarize(records: Sequence[RunRecord], search_keys: Sequence[str]) -> StudySummary:
    search = [r for r in records if r.phase == "search"]
    eligible = [r for r in search if r.complete]
    best = max(eligible, key=lambda r: r.metrics[OBJECTIVE]) if eligible else None
    groups = {
        "HamJEPA (best)": ([best] if best else []) + [r for r in records if r.phase == "confirm" and r.complete],
        "SIGReg": [r for r in records if r.phase == "baseline" and r.complete],
        "MLP-HJEPA": [r for r in records if r.phase == "ablation" and r.complete],
    }
    counts = {"trials": len(search)}
    for status in ("finished", "stopped", "diverged", "failed", "running"):
        counts[status] = sum(r.status == status for r in search)
    summary = StudySummary(best, groups, list(search_keys), counts)
    for label, key in TABLE_METRICS:
        cells = {name: Cell([r.metrics[key] for r in runs if key in r.metrics]) for name, runs in groups.items()}
        delta = cells["HamJEPA (best)"].mean - cells["SIGReg"].mean
        summary.rows.append((label, cells, delta))
    return summary


def to_markdown(summary: StudySummary) -> str:
    columns = [name for name, runs in summary.groups.items() if runs or name != "MLP-HJEPA"]
    lines = ["| metric (%) | " + " | ".join(columns) + " | HamJEPA - SIGReg (points) |",
             "|---|" + "---|" * (len(columns) + 1)]
    for label, cells, delta in summary.rows:
        delta_text = f"{delta:+.2f}" if math.isfinite(delta) else "-"
        lines.append(f"| {label} | " + " | ".join(cells[c].text() for c in columns) + f" | {delta_text} |")
    c = summary.counts
    lines += ["", f"Search trials: {c['trials']} ({c['finished']} finished, {c['stopped']} stopped early, "
                  f"{c['diverged']} diverged, {c['failed']} failed)."]
    if summary.best:
        params = ", ".join(f"{k}={v}" for k, v in summary.best_params().items())
        lines.append(f"Best HamJEPA configuration ({summary.best.name}): {params}.")
    else:
        lines.append("No HamJEPA trial completed all epochs, so there is no best configuration.")
    return "\n".join(lines) + "\n"


def to_csv(summary: StudySummary) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["metric", "group", "mean", "std", "n"])
    for label, cells, delta in summary.rows:
        for group, cell in cells.items():
            writer.writerow([label, group, _fmt(cell.mean), _fmt(cell.std), cell.n])
        writer.writerow([label, "HamJEPA - SIGReg", _fmt(delta), "", ""])
    return buffer.getvalue()


def _fmt(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else ""


def objective_plots(records: Sequence[RunRecord], search_keys: Sequence[str], folder: Path,
                    baseline: float | None = None) -> list[Path]:
    """One PNG per searched hyperparameter: the objective of every search trial against its value, with the
    SIGReg baseline's mean as a dashed line when there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    search = [r for r in records if r.phase == "search" and OBJECTIVE in r.metrics]
    paths = []
    for key in search_keys:
        points = [(float(r.params[key]), r.metrics[OBJECTIVE], r.status) for r in search if key in r.params]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        styles = {"finished": ("tab:blue", "o"), "stopped": ("tab:gray", "s"), "diverged": ("tab:red", "x"),
                  "failed": ("black", "x")}
        for status, (colour, marker) in styles.items():
            xs = [x for x, _, s in points if s == status]
            ys = [y for _, y, s in points if s == status]
            if xs:
                ax.scatter(xs, ys, c=colour, marker=marker, label=f"{status} ({len(xs)})")
        if baseline is not None and math.isfinite(baseline):
            ax.axhline(baseline, color="tab:orange", linestyle="--", label="SIGReg (mean)")
        values = [x for x, _, _ in points]
        if min(values) > 0 and max(values) / min(values) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("val kNN@20 top-1 (%)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = folder / f"objective_vs_{key.replace('.', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
