"""Learning, judged against the initialisation reference (docs/method.md §11 "Learning").

The reference run of a study (phase `reference`, train/reference.py) holds, per compared method, its readouts of
encoders that never trained: metric `<method>/<name>`, one step per encoder. A method learned when its final mean
over the paired seeds is above the reference's mean, by Welch's test, one-sided at 5%: the gain's interval is the
two-sided 90% Welch interval, whose lower end is that one-sided bound. Welch, because the two samples are
independent (different seeds) and their spreads differ (finals barely depend on the initialisation, the
reference is all initialisation).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from mlflow.tracking import MlflowClient

from hamjepa import methods, names
from hamjepa.config import Config
from hamjepa.methods import Method
from hamjepa.report.paired import Estimate, welch_difference

REFERENCE = "reference"  # the phase, and the name, of a study's initialisation-reference run
COMPARED = (Method.HAMJEPA.value, methods.BASELINE.value)  # the methods whose readings of it the summary needs
GAIN_CONFIDENCE = 0.90  # two-sided, so that its lower end is the one-sided 5% test of "learned"


def metric_key(method: str, metric: str) -> str:
    """The reference run's name for `method`'s reading of `metric` (`hamjepa/test_knn20_top1`)."""
    return f"{method}/{metric}"


def load_reference(client: MlflowClient, records: Iterable, base: Config) -> dict[str, dict[str, list[float]]] | None:
    """method -> metric -> the reference encoders' values of the comparison's rows, from the study's finished
    reference run; None when it has none (a study run with `--reference 0`, or one whose reference failed)."""
    run = next((r for r in records if r.phase == REFERENCE and r.run_status == "FINISHED"), None)
    if run is None:
        return None
    out: dict[str, dict[str, list[float]]] = {}
    for method in COMPARED:
        for _, metric in names.comparison_metrics(base.eval.knn_k):
            history = client.get_metric_history(run.run_id, metric_key(method, metric))
            if history:
                out.setdefault(method, {})[metric] = [m.value for m in sorted(history, key=lambda m: m.step)]
    return out


def gain_over_reference(finals: Sequence[float], reference: Sequence[float]) -> Estimate:
    """Final mean minus the reference mean, with its 90% Welch interval (low > 0: learned, one-sided 5%)."""
    return welch_difference(finals, reference, GAIN_CONFIDENCE)


def reference_size(reference: Mapping[str, Mapping[str, list[float]]] | None) -> int:
    """How many encoders the reference holds (0 without one)."""
    return max((len(v) for per_method in (reference or {}).values() for v in per_method.values()), default=0)
