"""What a study says about the paper's theory (docs/method.md §9): the paired check, whether the gap predicts
accuracy across runs, and the plot of the two.

1. **The paired check.** On the compared runs, paired by seed, the primary theory quantity: the entropy gap of
   the within-class covariance inside the probe's range (`theory_gap_within_qp`, the whole state, which both
   methods have). The paper predicts HamJEPA's gap is the smaller: "held" when the paired interval of HamJEPA -
   SIGReg lies below 0, "contradicted" when it lies above 0, else "not resolved at n = ...".
2. **Does the gap predict accuracy?** Across every finished run of the study (search trials and compared runs,
   both methods), Spearman's correlation between the gap and the test linear probe of the same readout, with a
   percentile bootstrap interval (BOOTSTRAP_RESAMPLES resamples of the runs, seeded) and n. The theory predicts
   a negative correlation: less wasted within-class spread where the probe reads, higher accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hamjepa import names
from hamjepa.methods import spec
from hamjepa.report.paired import CONFIDENCE, Estimate, estimate, paired_differences
from hamjepa.report.tables import markdown_table

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # the interval is a function of the runs alone: a rebuilt report prints the same numbers
MIN_CORRELATION_RUNS = 4  # fewer runs than this give no meaningful rank correlation
PLOT = "theory_gap_vs_probe.png"
LABELS = {"rho": "rho in the probe's range, [1, k]", "gap_within": "within-class entropy gap (nats), primary",
          "gap_total": "total-covariance entropy gap (nats)", "signal_fraction": "variance share in the range"}


@dataclass
class TheoryRow:
    """One theory quantity of one readout, paired by seed."""

    label: str
    metric: str
    seeds: list[int]
    hamjepa: Estimate
    sigreg: Estimate
    delta: Estimate  # HamJEPA - SIGReg, paired by seed
    readout: str = ""


@dataclass(frozen=True)
class Correlation:
    """Spearman's rho between two quantities over n runs, with a percentile bootstrap interval."""

    n: int
    rho: float
    low: float
    high: float

    @classmethod
    def unmeasured(cls, n: int = 0) -> Correlation:
        return cls(n, math.nan, math.nan, math.nan)

    def text(self) -> str:
        if self.n < MIN_CORRELATION_RUNS:
            return f"not measured (n = {self.n}; needs at least {MIN_CORRELATION_RUNS} runs with both values)"
        if not math.isfinite(self.rho):
            return f"undefined (n = {self.n}: one of the two does not vary across the runs)"
        return f"{self.rho:+.2f} [{self.low:+.2f}, {self.high:+.2f}] over n = {self.n} runs"


def _spread(value: Estimate) -> str:
    if value.n == 0:
        return "-"
    return f"{value.mean:.4g} +/- {value.std:.3g}" if value.n > 1 else f"{value.mean:.4g}"


def theory_rows(hamjepa: dict, sigreg: dict, paired) -> list[TheoryRow]:
    """Every theory quantity of the THEORY_READOUT readout, paired by seed (`paired` as summary._paired)."""
    rows = []
    for kind in names.THEORY:
        metric = names.theory(kind, names.THEORY_READOUT)
        seeds, h, g = paired(hamjepa, sigreg, metric)
        rows.append(TheoryRow(LABELS[kind], metric, seeds, estimate(h), estimate(g),
                              estimate(paired_differences(h, g)), readout=names.THEORY_READOUT))
    return rows


def theory_sentence(rows: Sequence[TheoryRow]) -> str:
    """The paired check's verdict on the primary quantity: held, contradicted or not resolved."""
    primary = next(row for row in rows if row.metric == names.theory(names.THEORY_PRIMARY, names.THEORY_READOUT))
    claim = ("the paper's prediction (HamJEPA's within-class covariance closer to the probe's H^-1 inside its "
             "range, i.e. a smaller within-class entropy gap than SIGReg's)")
    head = f"Theory check ({primary.readout} readout): "
    delta = primary.delta
    if delta.n == 0:
        return head + f"no paired runs carry the theory metrics, so {claim} is not tested."
    if not delta.has_interval:
        return head + f"{claim} is not resolved: n = {delta.n}, no interval."
    difference = f"HamJEPA - SIGReg {delta.text(signed=True)} nats"
    if delta.below_zero:
        return head + f"{claim} held: {difference}."
    if delta.above_zero:
        return head + f"{claim} is contradicted: {difference}."
    return head + f"{claim} is not resolved at n = {delta.n}: {difference}."


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); nan when either side is constant or n < 2."""
    from scipy.stats import spearmanr

    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan
    return float(spearmanr(x, y).statistic)


def correlation(x: Sequence[float], y: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                seed: int = BOOTSTRAP_SEED) -> Correlation:
    """Spearman's rho of (x, y) with a percentile bootstrap interval at CONFIDENCE over resampled pairs."""
    n = len(x)
    if n < MIN_CORRELATION_RUNS:
        return Correlation.unmeasured(n)
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    rng = np.random.default_rng(seed)
    draws = [spearman(x[i], y[i]) for i in (rng.integers(0, n, n) for _ in range(resamples))]
    draws = [d for d in draws if math.isfinite(d)]  # a resample of ties only has no correlation
    tail = (1 - CONFIDENCE) / 2
    low, high = (np.quantile(draws, [tail, 1 - tail]) if draws else (math.nan, math.nan))
    return Correlation(n, spearman(list(x), list(y)), float(low), float(high))


def gap_accuracy_points(records) -> list[tuple[str, str, float, float]]:
    """(method, phase, within-class gap, test linear probe %) of every finished run carrying both, on the
    THEORY_READOUT readout."""
    gap = names.theory(names.THEORY_PRIMARY, names.THEORY_READOUT)
    probe = names.accuracy("test", "linprobe_top1", names.THEORY_READOUT)
    return [(r.method, r.phase, r.metrics[gap], r.metrics[probe]) for r in records
            if r.complete and all(k in r.metrics and math.isfinite(r.metrics[k]) for k in (gap, probe))]


def gap_accuracy_correlation(records) -> Correlation:
    points = gap_accuracy_points(records)
    return correlation([p[2] for p in points], [p[3] for p in points])


def correlation_sentence(value: Correlation) -> str:
    return ("Does the gap predict accuracy? Spearman's correlation between the within-class entropy gap and the "
            f"test linear probe ({names.THEORY_READOUT} readout) across every finished run: {value.text()}; the "
            "theory predicts a negative one.")


def markdown(rows: Sequence[TheoryRow], value: Correlation) -> list[str]:
    """The theory section's lines: what is measured, the paired table, the verdict, the correlation."""
    lines = []
    if any(row.delta.n or row.hamjepa.n or row.sigreg.n for row in rows):
        lines += [
            "Theory check (docs/method.md §9), on the same paired seeds and the test split: H0 = the trained linear "
            "probe's Gauss-Newton curvature, measured inside its range (k = classes - 1, no ridge); the gap is 0 "
            "when the covariance there is proportional to H0^-1.",
            "",
            *markdown_table(["quantity", "readout", "HamJEPA", "SIGReg", "HamJEPA - SIGReg"],
                   [[row.label, row.readout, _spread(row.hamjepa), _spread(row.sigreg), row.delta.text(signed=True)]
                    for row in rows]),
            "",
        ]
    return [*lines, theory_sentence(rows), correlation_sentence(value), ""]


def plots(records, folder: str | Path) -> list[str]:
    """The within-class gap against test linear-probe accuracy for every finished run, coloured by method, search
    trials and compared runs marked; the paths written (PLOT), none when no run carries both."""
    points = gap_accuracy_points(records)
    if not points:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"search": "o", "compare": "^"}
    fig, axis = plt.subplots(figsize=(6, 4))
    for method in sorted({p[0] for p in points}):
        for phase in sorted({p[1] for p in points}):
            chosen = [(gap, probe) for m, ph, gap, probe in points if m == method and ph == phase]
            if chosen:
                axis.scatter(*zip(*chosen, strict=True), marker=markers.get(phase, "s"), color=spec(method).colour,
                             label=f"{spec(method).label}, {phase}", alpha=0.8)
    value = gap_accuracy_correlation(records)
    axis.set_title(f"Spearman {value.text()}", fontsize=8)
    axis.set_xlabel(f"within-class entropy gap in the probe's range, {names.THEORY_READOUT} (nats)")
    axis.set_ylabel(f"test linear probe top-1, {names.THEORY_READOUT} (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    fig.tight_layout()
    path = Path(folder) / PLOT
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path)]
