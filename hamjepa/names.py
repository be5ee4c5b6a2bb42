"""One vocabulary: the names of everything a run reports, and the statuses a run ends in.

Every metric name is built here, from the config where it depends on it (`eval.knn_k`), so a name is
never spelled as a literal in two modules. docs/design.md "MLflow layout", with k = `eval.knn_k`:
- per epoch (step = epoch; epoch 0 = the encoder at initialisation, before the first step):
  `epoch`, `train/<loss term or statistic>` (training-mode averages), `state/<diagnostic>` (eval mode,
  end of epoch: a different measurement, so a different name), and the objective `val_knn{k}_top1` (%);
- once, after the last epoch: `{split}_{kind}[_{readout}]` for split val/test, kind knn{k}_top1 /
  linprobe_top1 / linprobe_top5, readout q/p/qp (unsuffixed = the method's default readout), spectra;
- once, at initialisation: the same final readouts under `init/` (`init/test_knn20_top1`, ...), so every
  run can be compared with its own starting point;
- once, after the last epoch, the theory check (evaluation/theory.py, docs/method.md §9), per readout:
  `theory_rho_<r>`, `theory_gap_within_<r>` (the primary theory quantity), `theory_gap_total_<r>`,
  `theory_signal_fraction_<r>`; and for a run with a predictor the flow's `flow_reversibility_error`,
  `flow_symplecticity_defect` (and `flow_energy_drift` for HamJEPA).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

from hamjepa.methods import spec
from hamjepa.redact import mask_text

EPOCH = "epoch"
DIVERGED = "diverged"  # 0/1
DIVERGED_REASON = "diverged_reason"
FAILED = "failed"  # 0/1: the run failed beyond its worker restarts
FAILURE_REASON = "failure_reason"
RESUMED_FROM = "resumed_from_epoch"
IMAGES_PER_S = "train/images_per_s"
# Seconds the step loop waited for its next batch / seconds of the epoch: near 0 when the device is the bottleneck
DATA_WAIT_FRACTION = "train/data_wait_fraction"
TRAIN = "train/"  # training-mode averages over an epoch of what the objective saw
STATE = "state/"  # end-of-epoch diagnostics of the states in eval mode (one batch, fixed coordinates)
INIT = "init/"  # final readouts of the encoder at initialisation
WHERE = ("nodes", "device")  # strings: the run's Ray nodes and device (MLflow tags hamjepa.nodes, .device)
# Strings reported at epoch 0: which data the run saw (MLflow tags hamjepa.data_*, and a dataset input).
DATA_DIGEST = "data_digest"  # SHA-256 of the dataset name and the train/val split indices
DATA_SIZES = "data_sizes"  # "train N, val N, test N"
DATA = (DATA_DIGEST, DATA_SIZES)
# Where a run's time went, in seconds, cumulative over the run (a report's value is the total so far, so the last
# report's is the run's): `time/<part>_s` for each part below (docs/design.md "MLflow layout").
TIME = "time/"
TIME_PARTS = ("startup", "train", "eval_init", "eval_objective", "eval_final", "theory", "checkpoint")


def time_metric(part: str) -> str:
    if part not in TIME_PARTS:
        raise ValueError(f"time part {part!r} is unknown: must be one of {', '.join(TIME_PARTS)}.")
    return f"{TIME}{part}_s"

SPECTRA = ("effective_rank", "participation_ratio")
# The theory check per readout (theory_<kind>_<readout>), all inside the range of the probe's curvature H0: the
# price of isotropy there, the entropy gap of the within-class covariance (primary) and of the total covariance
# to the optimal (c/k) H_k^-1, and the share of the variance the probe reads.
THEORY = ("rho", "gap_within", "gap_total", "signal_fraction")
THEORY_PRIMARY = "gap_within"
THEORY_READOUT = "qp"  # the whole state: the one representation both methods have, so their gaps pair
FLOW_REVERSIBILITY = "flow_reversibility_error"  # mean |Phi_-dt(Phi_dt(z)) - z| / |z|
FLOW_ENERGY_DRIFT = "flow_energy_drift"  # mean |H(Phi(z)) - H(z)| / |H(z)|, HamJEPA only
FLOW_SYMPLECTICITY = "flow_symplecticity_defect"  # mean ||J^T Omega J - Omega||_F / ||Omega||_F
FLOW = (FLOW_REVERSIBILITY, FLOW_ENERGY_DRIFT, FLOW_SYMPLECTICITY)


def default_readout(method: str) -> str:
    return spec(method).default_readout


def readouts(method: str) -> tuple[str, ...]:
    """The readouts a method is judged on (methods.METHODS), its default first."""
    return spec(method).readouts


def knn(k: int) -> str:
    return f"knn{k}_top1"


def objective(k: int) -> str:
    """The tuning objective: kNN@k top-1 (percent) of the default readout on the validation split."""
    return f"val_{knn(k)}"


def objective_choices(k: int) -> list[str]:
    """The metrics a search may select on (`--objective`): validation accuracies of the default readout. The first,
    kNN@k, is measured every epoch (so ASHA can stop on it); the linear probe only after the last epoch."""
    return [objective(k), accuracy("val", "linprobe_top1")]


def every_epoch(metric: str, k: int) -> bool:
    """Whether a run reports `metric` at every epoch (what an early-stopping scheduler and Tune's checks need)."""
    return metric == objective(k)


def accuracy(split: str, kind: str, readout: str = "") -> str:
    """`test_linprobe_top1_q` and the like; no readout = the method's default readout."""
    return f"{split}_{kind}_{readout}" if readout else f"{split}_{kind}"


def theory(kind: str, readout: str) -> str:
    """`theory_rho_q`, `theory_gap_within_qp`, ...: kind one of THEORY."""
    if kind not in THEORY:
        raise ValueError(f"theory metric kind {kind!r} is unknown: must be one of {', '.join(THEORY)}.")
    return f"theory_{kind}_{readout}"


def init(name: str) -> str:
    """The name of a final metric measured on the encoder at initialisation."""
    return INIT + name


def final_accuracies(method: str, k: int) -> list[str]:
    """Every accuracy a finished run reports (a diverged run reports them all as its worst value, 0)."""
    names = [objective(k)]
    for split in ("val", "test"):
        for kind in (knn(k), "linprobe_top1", "linprobe_top5"):
            if not (kind == knn(k) and split == "val"):  # unsuffixed val kNN is the objective, named above
                names.append(accuracy(split, kind))
            names += [accuracy(split, kind, r) for r in readouts(method)]
    return names


def default_primary(k: int) -> str:
    """The primary metric unless a study declares another: test kNN@k of the method's default readout (the paper's
    headline, and the search's objective family)."""
    return accuracy("test", knn(k))


def primary_choices(k: int) -> list[str]:
    """The metrics a study may declare primary (`--primary`): its test rows."""
    return [metric for _, metric in comparison_metrics(k) if metric.startswith("test_")]


def comparison_metrics(k: int) -> list[tuple[str, str]]:
    """(label, metric) of the rows a study compares: validation and test, kNN@k and linear probe."""
    return [(f"val kNN@{k}", objective(k)), ("val linear probe", accuracy("val", "linprobe_top1")),
            (f"test kNN@{k}", accuracy("test", knn(k))), ("test linear probe", accuracy("test", "linprobe_top1"))]


def is_ours(name: str) -> bool:
    """Whether a key of a Tune result is one of our metrics (Tune adds bookkeeping keys MLflow needs not)."""
    prefixes = (EPOCH, TRAIN, STATE, INIT, "val_", "test_", DIVERGED, FAILED, RESUMED_FROM, *SPECTRA, *WHERE,
                "theory_", *FLOW, *DATA, TIME)
    return name.startswith(prefixes) or name.endswith("_reason")


class RunState(enum.StrEnum):
    """How a run ended (MLflow tag hamjepa.status)."""

    FINISHED = "finished"  # every epoch, final metrics
    STOPPED = "stopped"  # stopped early by the scheduler (ASHA): a truncated, not a failed, run
    DIVERGED = "diverged"  # NaN/inf or exploded loss or state: the configuration's fault
    FAILED = "failed"  # an error beyond the worker restarts: not the configuration's fault
    RUNNING = "running"  # not ended (yet), or interrupted

    @property
    def mlflow_status(self) -> str:
        return {"finished": "FINISHED", "stopped": "FINISHED", "running": "RUNNING"}.get(self.value, "FAILED")


REASON_CHARS = 300  # a failure's reason: one line in a run's tag, the summary and Tune's table


def failure_reason(error: BaseException) -> str:
    """Why a run failed beyond its restarts: the last line of Ray Train's error (the worker's exception)."""
    lines = str(error).strip().splitlines()
    return mask_text(lines[-1][:REASON_CHARS]) if lines else type(error).__name__  # credentials never reach a tag


def classify(last: Mapping[str, Any], epochs: int) -> tuple[RunState, str]:
    """(status, reason) of an ended run from its last report; the one place a run's status is decided."""
    if last.get(FAILED):
        return RunState.FAILED, str(last.get(FAILURE_REASON, ""))
    if last.get(DIVERGED):
        return RunState.DIVERGED, str(last.get(DIVERGED_REASON, ""))
    epoch = int(last.get(EPOCH, 0))
    if epoch < epochs:
        return RunState.STOPPED, f"stopped early by ASHA after epoch {epoch}"
    return RunState.FINISHED, ""
