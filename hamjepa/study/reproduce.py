"""The paper's comparison as fixed runs: SIGReg, HamJEPA and MLP-HJEPA, each on the same seeds, no search.

One Tune experiment (phase `reproduce`) over method x seed, logged like a study (parent run, one child run
per training, resumable with --resume), ending in the paper's table: rows are settings, columns SIGReg and
the HamJEPA readouts q, p, qp, cells "test kNN@20 / linear probe top-1" as mean +/- std over seeds, with
the paper's own row (docs/method.md §8) under each of ours.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hamjepa import names
from hamjepa.config import Config
from hamjepa.methods import Method
from hamjepa.report.paired import Estimate, estimate
from hamjepa.report.paper import COLUMN_TITLES, COLUMNS, DATASET_TITLES, PaperRow, reference_row
from hamjepa.report.summary import RunRecord
from hamjepa.report.tables import csv_number, csv_text, markdown_table
from hamjepa.study.invocation import Invocation, StudyResult
from hamjepa.study.settings import ARM, StudySettings

PHASE = "reproduce"
REPRODUCED = (Method.SIGREG, Method.HAMJEPA, Method.MLP)  # the paper's table: every method it reports
FAMILY_TITLES = {Method.HAMJEPA: "SIGReg and HamJEPA", Method.MLP: "MLP-HJEPA"}


@dataclass
class TableRow:
    """One printed row: ours (cells of seeds) or the paper's (cells of reported numbers)."""

    label: str
    family: str
    source: str  # "ours" | "paper"
    cells: dict[str, tuple[Estimate, Estimate]]  # column title -> (kNN@20, linear probe)


@dataclass
class ReproductionTable:
    rows: list[TableRow]
    notes: list[str]
    knn_k: int = 20


def _columns(family: str) -> list[tuple[str, str, str]]:
    """(title, method, readout) of the columns a family fills: MLP-HJEPA fills the HamJEPA readouts."""
    if family == Method.MLP:
        return [(title, Method.MLP, readout) for title, (method, readout) in zip(COLUMN_TITLES, COLUMNS)
                if method == Method.HAMJEPA]
    return [(title, method, readout) for title, (method, readout) in zip(COLUMN_TITLES, COLUMNS)]


def setting_title(cfg: Config, seeds: int) -> str:
    dataset = DATASET_TITLES.get(cfg.data.dataset, cfg.data.dataset)
    subset = f" ({cfg.data.subset} images)" if cfg.data.subset else ""
    return f"{dataset}{subset}, {cfg.optim.epochs} ep, {seeds} seed{'s' if seeds != 1 else ''}"


def build_table(records: Sequence[RunRecord], base: Config, seeds: int) -> ReproductionTable:
    """Ours from MLflow's complete runs of the reproduction, the paper's beside them; every row always present."""
    k = base.eval.knn_k
    runs = [r for r in records if r.phase == PHASE and r.complete]
    rows: list[TableRow] = []
    notes: list[str] = []
    for family in FAMILY_TITLES:
        paper, caveat = reference_row(family, base.data.dataset, base.optim.epochs)
        # Compare like with like: the paper's ImageNet-100 SIGReg numbers are of the q half, at any schedule.
        sigreg_readout = paper.sigreg_readout if paper and paper.dataset == base.data.dataset else "qp"
        ours: dict[str, tuple[Estimate, Estimate]] = {}
        for title, method, readout in _columns(family):
            readout = sigreg_readout if method == Method.SIGREG else readout
            of_method = [r for r in runs if r.method == method]
            knn, probe = (names.accuracy("test", kind, readout) for kind in (names.knn(k), "linprobe_top1"))
            ours[title] = (estimate([r.metrics[knn] for r in of_method]),
                           estimate([r.metrics[probe] for r in of_method]))
        prefix = "MLP-HJEPA, " if family == Method.MLP else ""
        rows.append(TableRow(f"ours: {prefix}{setting_title(base, seeds)}", family, "ours", ours))
        rows.append(_paper_row(family, paper, caveat))
    notes.append(_headline(rows[0], reference_row(Method.HAMJEPA, base.data.dataset, base.optim.epochs)[0]))
    missing = [r for r in records if r.phase == PHASE and not r.complete]
    if missing:
        notes.append("Not in the table (did not finish): " + ", ".join(
            f"{r.name} ({r.status}{': ' + r.reason if r.reason else ''})" for r in missing) + ".")
    return ReproductionTable(rows, notes, k)


def _headline(ours: TableRow, paper: PaperRow | None) -> str:
    """The paper's headline number: HamJEPA q minus SIGReg in test kNN@20, ours beside theirs."""
    sigreg, hamjepa_q = ours.cells[COLUMN_TITLES[0]][0], ours.cells[COLUMN_TITLES[1]][0]
    ours_delta = f"{hamjepa_q.mean - sigreg.mean:+.2f}" if sigreg.n and hamjepa_q.n else "-"
    if paper is None:
        return f"HamJEPA q - SIGReg, test kNN@20: ours {ours_delta} points."
    paper_delta = paper.cells["q"][0] - paper.cells[Method.SIGREG][0]
    return (f"HamJEPA q - SIGReg, test kNN@20: ours {ours_delta} points, paper {paper_delta:+.2f} "
            f"({paper.title}).")


def _paper_row(family: str, paper: PaperRow | None, caveat: str) -> TableRow:
    if paper is None:
        return TableRow(f"paper: {FAMILY_TITLES[family]} not reported", family, "paper", {})
    caveat = f" ({caveat})" if caveat else ""
    cells = {}
    for title, method, readout in _columns(family):
        key = Method.SIGREG if method == Method.SIGREG else readout
        if key in paper.cells:
            knn, probe = paper.cells[key]
            cells[title] = (estimate([knn]), estimate([probe]))
    return TableRow(f"paper: {paper.title}{caveat}", family, "paper", cells)


def _cell_text(knn: Estimate, probe: Estimate, seeds: int, source: str) -> str:
    if not knn.n:
        return ""
    if source == "paper":
        return f"{knn.mean:.2f} / {probe.mean:.2f}"
    spread = lambda c: f" +/- {c.std:.2f}" if c.n > 1 else ""  # noqa: E731
    short = f" (n={knn.n})" if knn.n < seeds else ""
    return f"{knn.mean:.2f}{spread(knn)} / {probe.mean:.2f}{spread(probe)}{short}"


def to_markdown(table: ReproductionTable, seeds: int) -> str:
    rows = [[row.label, *(_cell_text(*row.cells[t], seeds, row.source) if t in row.cells else ""
                          for t in COLUMN_TITLES)] for row in table.rows]
    lines = ["Test kNN@20 / linear probe top-1 (%), mean +/- std over seeds; the paper's numbers in the row below "
             "ours.", "", *markdown_table(["setting", *COLUMN_TITLES], rows)]
    return "\n".join(lines + [""] + table.notes) + "\n"


def to_csv(table: ReproductionTable) -> str:
    metrics = (names.accuracy("test", names.knn(table.knn_k)), names.accuracy("test", "linprobe_top1"))
    rows = [[row.label, row.source, title, metric, csv_number(cell.mean), csv_number(cell.std), cell.n]
            for row in table.rows for title, pair in row.cells.items() for metric, cell in zip(metrics, pair)]
    return csv_text(["setting", "source", "column", "metric", "mean", "std", "n"], rows)


def comparison_plot(table: ReproductionTable, path: Path) -> Path:
    """Grouped bars, ours (with the std over seeds) beside the paper's, per column and metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(row.family, title) for row in table.rows if row.source == "ours" for title in row.cells]
    names = [title.replace("HamJEPA", "MLP") if family == Method.MLP else title for family, title in bars]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for axis, (index, metric) in zip(axes, ((0, "test kNN@20 top-1 (%)"), (1, "linear probe top-1 (%)"))):
        for offset, source, colour in ((-0.2, "ours", "tab:blue"), (0.2, "paper", "tab:gray")):
            rows = {row.family: row for row in table.rows if row.source == source}
            cells = [rows[family].cells.get(title, (estimate([]), estimate([])))[index] for family, title in bars]
            errors = [cell.std if cell.n > 1 else 0.0 for cell in cells]
            axis.bar([i + offset for i in range(len(bars))], [cell.mean if cell.n else 0.0 for cell in cells],
                     width=0.4, color=colour, label=source, yerr=errors if any(errors) else None, capsize=2)
        axis.set_xticks(range(len(bars)))
        axis.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        axis.set_ylabel(metric)
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def reproduction_params(settings: StudySettings) -> dict[str, str | int]:
    """The reproduction's own parameters (a resumed one must match them, checked before Ray starts)."""
    return {"study.seeds": settings.seeds, "study.methods": ",".join(REPRODUCED)}


def run_reproduction(settings: StudySettings) -> StudyResult:
    """Train every method on seeds 0..settings.seeds-1, log them as one study, return the paper table."""
    with Invocation(settings, reproduction_params(settings)) as study:
        try:
            study.run_cells(PHASE, [{ARM: {"method": method}, "seed": seed}
                                    for seed in range(settings.seeds) for method in REPRODUCED])
        except KeyboardInterrupt:
            study.interrupted = True
        table = build_table(study.records(), settings.base, settings.seeds)
        text = to_markdown(table, settings.seeds)
        if not study.interrupted:
            with tempfile.TemporaryDirectory() as folder:
                study.parent.log_artifact(comparison_plot(table, Path(folder) / "paper_comparison.png"))
        return study.finish(table, text, {"paper_table.md": text, "paper_table.csv": to_csv(table)})
