"""The paper's theory measured on every run: the probe's geometry against the representation's spread, and the
learned flow's geometry.

docs/method.md, section 9, has the derivation and what each quantity can and cannot show. In short: a linear
probe reading features u pays 1/2 tr(H0 Sigma) for noise of covariance Sigma on u, with H0 the Gauss-Newton
curvature of its cross-entropy. H0 has rank <= C - 1 (C classes), so everything is measured inside its range:
U_k, the top k = C - 1 eigenvectors of H0, H_k = U_k^T H0 U_k and S_k = U_k^T Sigma U_k. Within that range
- range_rho(H0, k) = k lambda_max / (sum of the top k eigenvalues), in [1, k]: the price of isotropy there;
- range_entropy_gap(Sigma, H0, k) = k log(tr(H_k S_k) / k) - log det(H_k S_k) >= 0: how far S_k is from the
  covariance of maximal entropy on the same budget, (c/k) H_k^-1 (zero exactly there; scale-free in both).
Sigma is the *within-class* covariance: the variability the classifier pays for; the class signal is what it
reads. No ridge enters. Everything is float64 and measured on held-out features (the test split, else the
validation split), through the probe's own LayerNorm.

The flow diagnostics take the trained predictor to float64 and measure, on a sample of encoded states, how far
it is from time-reversible, energy-conserving and symplectic. Leapfrog is reversible and symplectic for any
potential, so a float64 HamJEPA predictor shows rounding error only; the MLP-HJEPA ablation is neither. The
Jacobian is taken on JACOBIAN_STATES states only: one (2d x 2d) matrix each.
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

FLOW_STATES = 256  # states for the reversibility error and the energy drift (one batched rollout each)
JACOBIAN_STATES = 2  # states whose full (2d x 2d) Jacobian is taken for the symplecticity defect

Flow = Callable[[torch.Tensor, int], torch.Tensor]  # (z (N, 2d), direction +1/-1) -> (N, 2d)


# -- geometry of a downstream task -------------------------------------------------------------------------

def _square(name: str, m: torch.Tensor) -> torch.Tensor:
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square matrix, got shape {tuple(m.shape)}.")
    return m.double()


# An eigenvalue below this fraction of the largest is rounding error of a zero one: H has no range there.
RANGE_TOLERANCE = 1e-10


def _top_range(h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k eigenvalues (descending) and eigenvectors (D, k) of symmetric H; refuses a k beyond H's rank."""
    if not 1 <= k <= h.shape[0]:
        raise ValueError(f"k = {k} must be in [1, {h.shape[0]}] (the size of H).")
    values, vectors = torch.linalg.eigh(h)
    values, vectors = values.flip(0)[:k], vectors.flip(1)[:, :k]
    if not values[-1] > RANGE_TOLERANCE * values[0].abs():
        raise ValueError(f"H's top {k} eigenvalues must be positive (the smallest is {values[-1].item():.3g}): "
                         f"its rank is below {k}.")
    return values, vectors


def range_rho(h: torch.Tensor, k: int) -> float:
    """k lambda_max(H) / (sum of the top-k eigenvalues of H), in [1, k]: the price of isotropy inside H's top-k
    range (1 when those eigenvalues are equal, k when one dominates). No ridge: the range is where H acts."""
    values, _ = _top_range(_square("H", h), k)
    return (k * values[0] / values.sum()).item()


def range_entropy_gap(sigma: torch.Tensor, h: torch.Tensor, k: int) -> float:
    """k log(tr(H_k S_k) / k) - log det(H_k S_k), in nats, with H_k = U_k^T H U_k and S_k = U_k^T Sigma U_k for
    U_k the top-k eigenvectors of H: k log(AM / GM) of the eigenvalues of H_k S_k. >= 0, zero exactly when S_k
    is proportional to H_k^-1, unchanged when Sigma or H is scaled."""
    sigma, h = _square("Sigma", sigma), _square("H", h)
    if sigma.shape != h.shape:
        raise ValueError(f"Sigma {tuple(sigma.shape)} and H {tuple(h.shape)} must have the same shape.")
    values, u = _top_range(h, k)
    s_k = u.T @ sigma @ u  # (k, k); H_k = diag(values)
    spread = torch.linalg.eigvalsh((s_k + s_k.T) / 2)  # ascending
    if not spread[0] > RANGE_TOLERANCE * spread[-1].abs():
        raise ValueError(f"Sigma restricted to H's top-{k} range must be positive definite (it is singular there).")
    logdet = values.log().sum() + spread.log().sum()
    budget = (values * s_k.diagonal()).sum()  # tr(H_k S_k), H_k diagonal
    return (k * torch.log(budget / k) - logdet).item()


def range_fraction(sigma: torch.Tensor, h: torch.Tensor, k: int) -> float:
    """tr(P Sigma) / tr(Sigma) with P the projector on H's top-k range: the share of the variance the probe reads."""
    sigma, h = _square("Sigma", sigma), _square("H", h)
    _, u = _top_range(h, k)
    return ((u.T @ sigma @ u).trace() / sigma.trace()).item()


def probe_curvature(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Gauss-Newton curvature H0 = E_x[W^T (diag(p) - p p^T) W] (D, D), float64, of a linear probe's
    cross-entropy with respect to its input u (N, D), with logits u W^T + b, W (C, D), p = softmax(logits).

    The logits are linear in u, so this is the exact Hessian of the mean loss w.r.t. a shift of every input,
    and it does not depend on the labels. Computed as W^T M W with M = diag(E p) - E[p p^T] (C x C): one
    pass over the samples. Rank <= C - 1 (M 1 = 0).
    """
    u, w = inputs.double(), weight.double()
    logits = u @ w.T + (bias.double() if bias is not None else 0.0)  # (N, C)
    p = torch.softmax(logits, dim=1)
    m = torch.diag(p.mean(0)) - p.T @ p / len(p)  # (C, C)
    return w.T @ m @ w


def covariance(x: torch.Tensor) -> torch.Tensor:
    """Unbiased covariance (D, D), float64, of the rows of x (N, D)."""
    centred = x.double() - x.double().mean(dim=0)
    return centred.T @ centred / (len(x) - 1)


def within_class_covariance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The pooled within-class covariance (D, D), float64, of features x (N, D) with labels y (N,):
    sum over classes c of sum_{i in c} (x_i - mean_c)(x_i - mean_c)^T / (N - number of classes present)."""
    x, y = x.double(), torch.as_tensor(y)
    classes, index = torch.unique(y, return_inverse=True)
    if len(x) <= len(classes):
        raise ValueError(f"{len(x)} samples of {len(classes)} classes leave no within-class degrees of freedom.")
    sums = torch.zeros(len(classes), x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, index.to(x.device), x)
    counts = torch.bincount(index, minlength=len(classes)).to(x)
    centred = x - (sums / counts[:, None])[index.to(x.device)]
    return centred.T @ centred / (len(x) - len(classes))


def probe_inputs(probe: TrainedProbe, features: torch.Tensor) -> torch.Tensor:
    """The probe's LayerNorm applied to `features` (N, D) in float64, on the probe's device: what its linear
    layer reads."""
    norm = probe.norm
    weight = None if norm.weight is None else norm.weight.detach().double()
    bias = None if norm.bias is None else norm.bias.detach().double()
    x = features.to(norm.weight.device if norm.weight is not None else "cpu", torch.float64)
    return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)


@torch.no_grad()
def probe_geometry(probe: TrainedProbe) -> dict[str, float]:
    """{'rho', 'gap_within', 'gap_total', 'signal_fraction'} of one trained probe on its held-out features
    (docs/method.md, section 9), inside the range of its curvature H0 (k = classes - 1).

    NaN when there is nothing to measure: no held-out features, fewer samples than classes + 1, a probe or
    features without variation in the range.
    """
    undefined = {kind: math.nan for kind in names.THEORY}
    if probe.held_out is None:
        return undefined
    features, labels = probe.held_out
    k = probe.linear.weight.shape[0] - 1
    if k < 1 or len(features) <= probe.linear.weight.shape[0]:
        return undefined
    u = probe_inputs(probe, features)
    curvature = probe_curvature(u, probe.linear.weight.detach(), probe.linear.bias.detach())
    within, total = within_class_covariance(u, labels.to(u.device)), covariance(u)
    try:
        return {"rho": range_rho(curvature, k), "gap_within": range_entropy_gap(within, curvature, k),
                "gap_total": range_entropy_gap(total, curvature, k),
                "signal_fraction": range_fraction(total, curvature, k)}
    except ValueError:  # a degenerate probe or representation: nothing to measure, not an error of the run
        return undefined


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
    """`theory_rho_<r>`, `theory_gap_within_<r>`, `theory_gap_total_<r>`, `theory_signal_fraction_<r>` for
    readouts r and the probes trained on them, in the same order."""
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
