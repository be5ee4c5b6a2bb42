"""The paper's theory measured on every run: price of isotropy, entropy gap, and the learned flow's geometry.

docs/method.md, section 9, has the derivation. In short: for a downstream geometry H (SPD, D x D) and an
energy budget tr(H Sigma) = c, the covariance of maximal entropy and minimal worst-case downstream variance
is Sigma* = (c / D) H^-1. An isotropic covariance on the same budget pays the price of isotropy
rho(H) = D lambda_max(H) / tr H in [1, D], and any Sigma falls short of Sigma*'s entropy by the entropy gap
D log(tr(H Sigma) / D) - log det(H Sigma) = D log(arithmetic / geometric mean of the eigenvalues of H Sigma).

A run's H is the Gauss-Newton curvature of its trained linear probe's cross-entropy with respect to the probe's
input (the LayerNorm's output, which is what the probe's linear layer reads); Sigma is the covariance of that
same input on the training split. Everything is float64. Cost per readout: one pass over the training features
(logits, softmax, one D x D covariance), one eigendecomposition and a few Cholesky factorisations of D x D.

The flow diagnostics take the trained predictor to float64 and measure, on a sample of encoded training
states, how far it is from time-reversible, energy-conserving and symplectic. Leapfrog is reversible and
symplectic for any potential, so a float64 HamJEPA predictor shows rounding error only; the MLP-HJEPA ablation
is neither. The Jacobian is taken on JACOBIAN_STATES states only: one (2d x 2d) matrix each.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hamjepa import names
from hamjepa.evaluation.probes import TrainedProbe

# H = H0 + CURVATURE_RIDGE * tr(H0)/D * I. H0 has rank <= classes - 1 (softmax has one redundant logit), so
# it is singular whenever D >= classes. The ridge gives the directions the probe ignores a curvature 1000
# times below the average one: "they matter a little". Relative to tr(H0)/D, so the metrics stay invariant to
# the scale of H0; it lowers rho by the factor 1 + CURVATURE_RIDGE at most. Compare runs at the same ridge.
CURVATURE_RIDGE = 1e-3
# Sigma = Cov + COVARIANCE_RIDGE * tr(Cov)/D * I. LayerNorm centres every sample, so its outputs lie in a
# hyperplane and their covariance is singular in one direction (in more if samples < D); this keeps log det
# finite while adding only about log(1 / COVARIANCE_RIDGE) ~ 14 nats per such direction to the gap.
COVARIANCE_RIDGE = 1e-6
FLOW_STATES = 256  # states for the reversibility error and the energy drift (one batched rollout each)
JACOBIAN_STATES = 2  # states whose full (2d x 2d) Jacobian is taken for the symplecticity defect

Flow = Callable[[torch.Tensor, int], torch.Tensor]  # (z (N, 2d), direction +1/-1) -> (N, 2d)


# -- geometry of a downstream task -------------------------------------------------------------------------

def _square(name: str, m: torch.Tensor) -> torch.Tensor:
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square matrix, got shape {tuple(m.shape)}.")
    return m.double()


def _logdet_spd(name: str, m: torch.Tensor) -> torch.Tensor:
    """log det of an SPD matrix through its Cholesky factor (refuses a matrix that is not SPD)."""
    factor, info = torch.linalg.cholesky_ex(m)
    if info.item() != 0:
        raise ValueError(f"{name} must be symmetric positive definite (Cholesky failed at column {info.item()}).")
    return 2.0 * factor.diagonal().log().sum()


def price_of_isotropy(h: torch.Tensor) -> float:
    """rho(H) = D lambda_max(H) / tr H for SPD H (D, D): 1 when H is proportional to I, up to D when one
    direction dominates. The worst-case downstream variance of the isotropic covariance on the budget
    tr(H Sigma) = c, divided by that of Sigma* = (c/D) H^-1 (docs/method.md, section 9)."""
    h = _square("H", h)
    return (h.shape[0] * torch.linalg.eigvalsh(h)[-1] / h.trace()).item()


def entropy_gap(sigma: torch.Tensor, h: torch.Tensor) -> float:
    """D log(tr(H Sigma) / D) - log det(H Sigma) for SPD Sigma and H (D, D), in nats.

    = D log(AM / GM) of the eigenvalues of H Sigma: >= 0, zero exactly when Sigma is proportional to H^-1, and
    unchanged when Sigma or H is scaled. It is log det Sigma* - log det(Sigma rescaled to the budget of
    Sigma*): the entropy Sigma leaves on the table (x 2). Sigma = I gives the AM/GM gap of H itself.
    """
    sigma, h = _square("Sigma", sigma), _square("H", h)
    if sigma.shape != h.shape:
        raise ValueError(f"Sigma {tuple(sigma.shape)} and H {tuple(h.shape)} must have the same shape.")
    d = h.shape[0]
    budget = (h * sigma).sum()  # tr(H Sigma) for symmetric H and Sigma
    return (d * torch.log(budget / d) - _logdet_spd("H", h) - _logdet_spd("Sigma", sigma)).item()


def probe_curvature(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Gauss-Newton curvature H0 = E_x[W^T (diag(p) - p p^T) W] (D, D), float64, of a linear probe's
    cross-entropy with respect to its input u (N, D), with logits u W^T + b, W (C, D), p = softmax(logits).

    The logits are linear in u, so this is the exact Hessian of the mean loss w.r.t. a shift of every input,
    and it does not depend on the labels. Computed as W^T M W with M = diag(E p) - E[p p^T] (C x C): one
    pass over the samples. Rank <= C - 1 (M 1 = 0); with_ridge makes it SPD.
    """
    u, w = inputs.double(), weight.double()
    logits = u @ w.T + (bias.double() if bias is not None else 0.0)  # (N, C)
    p = torch.softmax(logits, dim=1)
    m = torch.diag(p.mean(0)) - p.T @ p / len(p)  # (C, C)
    return w.T @ m @ w


def with_ridge(m: torch.Tensor, ridge: float) -> torch.Tensor:
    """m + ridge * tr(m)/D * I: a ridge relative to the average eigenvalue, so scaling m scales the result."""
    m = _square("m", m)
    return m + ridge * m.trace() / m.shape[0] * torch.eye(m.shape[0], dtype=m.dtype, device=m.device)


def covariance(x: torch.Tensor) -> torch.Tensor:
    """Unbiased covariance (D, D), float64, of the rows of x (N, D)."""
    centred = x.double() - x.double().mean(dim=0)
    return centred.T @ centred / (len(x) - 1)


def probe_inputs(probe: TrainedProbe) -> torch.Tensor:
    """The probe's LayerNorm applied to its training features in float64, on the probe's device: (N, D)."""
    norm = probe.norm
    weight = None if norm.weight is None else norm.weight.detach().double()
    bias = None if norm.bias is None else norm.bias.detach().double()
    x = probe.features.to(norm.weight.device if norm.weight is not None else "cpu", torch.float64)
    return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)


@torch.no_grad()
def probe_geometry(probe: TrainedProbe) -> dict[str, float]:
    """{'rho_probe', 'entropy_gap', 'entropy_gap_iso'} of one trained probe (docs/method.md, section 9).

    H = the probe's Gauss-Newton curvature plus CURVATURE_RIDGE; Sigma = the covariance of the probe's input
    on its training features plus COVARIANCE_RIDGE; the isotropic reference is Sigma = I under the same H.
    NaN when there is nothing to measure (fewer than 2 samples, or a probe or features without variation).
    """
    undefined = {kind: math.nan for kind in names.THEORY}
    if len(probe.features) < 2:
        return undefined
    u = probe_inputs(probe)
    curvature = probe_curvature(u, probe.linear.weight.detach(), probe.linear.bias.detach())
    spread = covariance(u)
    if not (curvature.trace() > 0 and spread.trace() > 0):
        return undefined
    h = with_ridge(curvature, CURVATURE_RIDGE)
    sigma = with_ridge(spread, COVARIANCE_RIDGE)
    identity = torch.eye(len(h), dtype=h.dtype, device=h.device)
    return {"rho_probe": price_of_isotropy(h), "entropy_gap": entropy_gap(sigma, h),
            "entropy_gap_iso": entropy_gap(identity, h)}


# -- geometry of the learned flow --------------------------------------------------------------------------

def _relative(difference: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over rows of |difference| / |reference| (row norms; absolute values for 1-D inputs)."""
    if difference.ndim == 1:
        return (difference.abs() / reference.abs()).mean().item()
    return (difference.norm(dim=-1) / reference.norm(dim=-1)).mean().item()


@torch.no_grad()
def reversibility_error(flow: Flow, z: torch.Tensor) -> float:
    """Mean |Phi_-dt(Phi_dt(z)) - z| / |z| over the states z (N, 2d): 0 for a time-reversible map."""
    return _relative(flow(flow(z, 1), -1) - z, z)


@torch.no_grad()
def energy_drift(flow: Flow, energy: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> float:
    """Mean |E(Phi_dt(z)) - E(z)| / |E(z)| over the states z (N, 2d), for energy (N, 2d) -> (N,)."""
    start = energy(z)
    return _relative(energy(flow(z, 1)) - start, start)


def flow_jacobians(flow: Flow, z: torch.Tensor) -> torch.Tensor:
    """Jacobians dPhi_dt/dz (n, 2d, 2d) at the states z (n, 2d), by one reverse-mode pass.

    Each state is repeated 2d times and output row i of copy i is back-propagated, which yields row i of its
    Jacobian: 2d vector-Jacobian products as one batched rollout. Valid because the flow maps every state on
    its own (no batch statistics), as both predictors do.
    """
    n, dim = z.shape
    with torch.enable_grad():
        copies = z.detach()[:, None, :].expand(n, dim, dim).reshape(n * dim, dim).clone().requires_grad_(True)
        out = flow(copies, 1).reshape(n, dim, dim)  # (state, copy, output coordinate)
        (grad,) = torch.autograd.grad(out.diagonal(dim1=1, dim2=2).sum(), copies)
    return grad.reshape(n, dim, dim)  # grad[s, i] = d out_i / d z_s = row i of state s's Jacobian


def symplectic_form(d: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Omega = [[0, I], [-I, 0]] (2d, 2d) for z = [q | p]."""
    eye = torch.eye(d, dtype=dtype, device=device)
    zero = torch.zeros(d, d, dtype=dtype, device=device)
    return torch.cat([torch.cat([zero, eye], 1), torch.cat([-eye, zero], 1)], 0)


def symplecticity_defect(flow: Flow, z: torch.Tensor) -> float:
    """Mean over the states z (n, 2d) of ||J^T Omega J - Omega||_F / ||Omega||_F: 0 for a symplectic map."""
    jacobians = flow_jacobians(flow, z)  # (n, 2d, 2d)
    omega = symplectic_form(z.shape[1] // 2, jacobians.dtype, jacobians.device)
    defect = jacobians.transpose(1, 2) @ omega @ jacobians - omega
    return (torch.linalg.matrix_norm(defect) / torch.linalg.matrix_norm(omega)).mean().item()


def flow_geometry(predictor: nn.Module, states: torch.Tensor) -> dict[str, float]:
    """Flow diagnostics of a trained predictor on encoded states (N, 2d), in float64 on a copy of it.

    {'flow_reversibility_error', 'flow_symplecticity_defect'} for any predictor(z, direction), plus
    'flow_energy_drift' when it has an energy(z) (the Hamiltonian predictor). The first FLOW_STATES states
    are rolled out, the first JACOBIAN_STATES differentiated.
    """
    exact = copy.deepcopy(predictor).double().requires_grad_(False).eval()
    z = states.detach().to(next(exact.parameters()).device, torch.float64)

    def flow(x: torch.Tensor, direction: int) -> torch.Tensor:
        return exact(x, direction)

    sample = z[:FLOW_STATES]
    out = {names.FLOW_REVERSIBILITY: reversibility_error(flow, sample),
           names.FLOW_SYMPLECTICITY: symplecticity_defect(flow, z[:JACOBIAN_STATES])}
    if hasattr(exact, "energy"):
        out[names.FLOW_ENERGY_DRIFT] = energy_drift(flow, exact.energy, sample)
    return out


# -- one run -----------------------------------------------------------------------------------------------

def readout_geometry(readouts: Sequence[str], probes: Sequence[TrainedProbe]) -> dict[str, float]:
    """`rho_probe_<r>`, `entropy_gap_<r>`, `entropy_gap_iso_<r>` for readouts r and the probes trained on them,
    in the same order."""
    if len(readouts) != len(probes):
        raise ValueError(f"{len(probes)} probes for the {len(readouts)} readouts {', '.join(readouts)}: "
                         "expected one probe per readout, in order.")
    out: dict[str, float] = {}
    for readout, probe in zip(readouts, probes, strict=True):
        out.update({names.theory(kind, readout): value for kind, value in probe_geometry(probe).items()})
    return out


def final_metrics(method: str, predictor: nn.Module | None, states: torch.Tensor,
                  probes: Sequence[TrainedProbe]) -> dict[str, float]:
    """A run's theory check: every readout's geometry (probes in names.readouts(method) order, as
    readouts.final_metrics trains them) and, when it has a predictor, the flow's on `states` (N, 2d)."""
    out = readout_geometry(names.readouts(method), probes)
    if predictor is not None:
        out.update(flow_geometry(predictor, states))
    return out
