"""The methods a study trains, in one table: what each one's predictor, objective, default readout and gradient
clipping are. Every module asks this table; none spells a method's name as a literal.

Adding a method (docs/design.md "Adding a method") is one entry here plus, where it needs a new predictor or
objective, its code in hamjepa/method/ and its branch in `method.predictors.build_predictor` (a predictor) or
`method.model.JEPAModel.forward` (an objective). Imports nothing heavy: the
config and the command line read it before torch loads.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Method(enum.StrEnum):
    """A method's name in configs (`method: hamjepa`), MLflow params and tags, and cell keys."""

    HAMJEPA = "hamjepa"
    SIGREG = "sigreg"
    MLP = "mlp"


class Predictor(enum.StrEnum):
    LEAPFROG = "leapfrog"  # the learned separable Hamiltonian, integrated by leapfrog (docs/method.md §2)
    RESIDUAL_MLP = "residual_mlp"  # a residual MLP matched in parameters (the MLP-HJEPA ablation)
    VIEW_MEAN = "view_mean"  # no predictor: each view predicts the views' mean (LeJEPA)


class Objective(enum.StrEnum):
    HAMJEPA = "hamjepa"  # prediction + energy budget + variance and spectral floors (docs/method.md §3)
    SIGREG = "sigreg"  # prediction of the views' mean + SIGReg's Epps-Pulley test (docs/method.md §4)


@dataclass(frozen=True)
class MethodSpec:
    label: str  # how tables and plots name it
    predictor: Predictor
    objective: Objective
    # The readouts it is judged on; the first is its default (the unsuffixed metric): q is HamJEPA-q, qp the
    # whole state (SIGReg's own vector).
    readouts: tuple[str, ...]
    grad_clip: float  # the protocol's max grad norm (docs/method.md §5), applied when optim.grad_clip is null
    colour: str  # matplotlib colour in every plot

    @property
    def default_readout(self) -> str:
        return self.readouts[0]

    @property
    def needs_split(self) -> bool:
        """A predictor that acts on the (q, p) phase-space split needs encoder.split."""
        return self.predictor is not Predictor.VIEW_MEAN


METHODS: dict[Method, MethodSpec] = {
    Method.HAMJEPA: MethodSpec("HamJEPA", Predictor.LEAPFROG, Objective.HAMJEPA, ("q", "p", "qp"), 1.0, "tab:blue"),
    # SIGReg's gradient norms run at 4-7 early on; its protocol trains unclipped.
    Method.SIGREG: MethodSpec("SIGReg", Predictor.VIEW_MEAN, Objective.SIGREG, ("qp", "q", "p"), 0.0, "tab:orange"),
    Method.MLP: MethodSpec("MLP-HJEPA", Predictor.RESIDUAL_MLP, Objective.HAMJEPA, ("q", "p", "qp"), 1.0, "tab:green"),
}
BASELINE = Method.SIGREG  # what a study compares HamJEPA against
ABLATIONS = (Method.MLP,)  # what --ablation may add to a study's comparison


def spec(method: str) -> MethodSpec:
    return METHODS[Method(method)]
