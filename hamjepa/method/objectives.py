"""Objectives as pure functions returning (loss, stats) (docs/method.md §3-4).

Every batch statistic is computed over the *global* batch: sufficient statistics (sums, centred second moments,
cos/sin sums) are summed over workers, so under data parallelism a loss on W workers x B/W samples equals the
loss on B samples in one process (see distributed.py). The objectives pack their sums into one collective per
dependency level (HamJEPA 2, SIGReg 1), and the global count is known without one.

Stats are detached scalar tensors (no host sync here; the caller decides when to read them).
Which samples a statistic sees (docs/method.md §3): the energy budget, the variance floor, the spectral floor
and the mean penalty are each computed once per step over both views pooled (2N states: view a's and
view b's stacked), never per view and then averaged; with k = 128 projected dimensions, per-view estimates
from N samples bias log det and PR downwards and make the floors bind several times harder.
Conventions decided where the method is silent (docs/method.md §10):
- the variance and spectral floors of q and p are summed ("for q and p separately");
- the LeJEPA prediction loss averages over views, samples and dimensions (an MSE, as HamJEPA's), so
  the SIGReg weight lambda balances the same kind of quantity in both methods.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hamjepa.config import HamJEPALossConfig, SIGRegConfig
from hamjepa.method.distributed import all_reduce_sum, all_reduce_sums, global_count, global_mean
from hamjepa.seeds import Stream, derive

Stats = dict[str, torch.Tensor]


# -- HamJEPA's terms, from global statistics ------------------------------------------------------
# Each term is a pure function of global-batch statistics; the functions after them reduce their own inputs (one
# collective each, for use on their own), and `hamjepa_objective` reduces everything a step needs in two
# collectives, one per dependency level: (1) sums of squared prediction errors, energies and first moments,
# (2) centred second moments and projected covariances, which need the global mean of level 1.

def _prediction_terms(squared_errors: torch.Tensor, pairs: int, q_dim: int, match: str,
                      p_weight: float) -> tuple[torch.Tensor, Stats]:
    """L_pred from the global sums of squared errors [q a->b, p a->b, q b->a, p b->a] over `pairs` samples."""
    q_ab, p_ab, q_ba, p_ba = squared_errors / (pairs * q_dim)  # each half of the state has q_dim features

    def match_loss(mse_q, mse_p):
        # The two halves have equal size, so the MSE of the whole state is their average.
        return mse_q + p_weight * mse_p if match == "q" else 0.5 * (mse_q + mse_p)

    loss = 0.5 * (match_loss(q_ab, p_ab) + match_loss(q_ba, p_ba))
    return loss, {"pred_mse_q": (0.5 * (q_ab + q_ba)).detach(), "pred_mse_p": (0.5 * (p_ab + p_ba)).detach()}


def _squared_errors(pred_a, z_b, pred_b, z_a, q_dim: int) -> torch.Tensor:
    """This worker's sums of squared errors [q a->b, p a->b, q b->a, p b->a], targets stop-gradient; (4,)."""
    sums = []
    for pred, target in ((pred_a, z_b.detach()), (pred_b, z_a.detach())):
        error = (pred - target) ** 2
        sums += [error[:, :q_dim].sum(), error[:, q_dim:].sum()]
    return torch.stack(sums)


def _energy_terms(energies: torch.Tensor, q_target: float, p_target: float) -> tuple[torch.Tensor, Stats]:
    """(E|q|^2/d - q_target)^2 + (E|p|^2/d - p_target)^2 from the global means [E|q|^2/d, E|p|^2/d]."""
    q_energy, p_energy = energies
    loss = (q_energy - q_target) ** 2 + (p_energy - p_target) ** 2
    return loss, {"q_energy": q_energy.detach(), "p_energy": p_energy.detach()}


def _variance_terms(variance: torch.Tensor, std_floor: float, eps: float = 1e-4) -> tuple[torch.Tensor, Stats]:
    """mean_i relu(gamma - std_i)^2, std_i = sqrt(var_i + eps), from the global unbiased variances (d,)."""
    std = torch.sqrt(variance + eps)
    return F.relu(std_floor - std).pow(2).mean(), {"min_std": std.min().detach()}


def _spectral_terms(cov: torch.Tensor, logdet_floor: float, pr_floor: float | None,
                    eigmax_ceiling: float | None) -> tuple[torch.Tensor, Stats]:
    """relu(tau - logdet C / k)^2 + relu(r0 - PR(C) / k)^2 + relu(lambda_max / tr C - e_max)^2 of the (k, k)
    covariance C (with its eps already added); PR = tr(C)^2 / tr(C^2). One eigendecomposition gives all three."""
    k = cov.shape[0]
    eig = torch.linalg.eigvalsh(cov)  # ascending, all > 0 thanks to eps
    trace = eig.sum()
    logdet_per_dim = torch.log(eig).sum() / k
    pr_per_dim = trace ** 2 / (eig * eig).sum() / k
    eigmax_fraction = eig[-1] / trace
    penalty = F.relu(logdet_floor - logdet_per_dim) ** 2
    if pr_floor is not None:
        penalty = penalty + F.relu(pr_floor - pr_per_dim) ** 2
    if eigmax_ceiling is not None:
        penalty = penalty + F.relu(eigmax_fraction - eigmax_ceiling) ** 2
    stats = {"logdet_per_dim": logdet_per_dim, "pr_per_dim": pr_per_dim, "eigmax_fraction": eigmax_fraction}
    return penalty, {key: value.detach() for key, value in stats.items()}


def _mean_terms(mean: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    """Mean over dimensions of the squared global-batch mean (D,)."""
    loss = (mean * mean).mean()
    return loss, {"mean_sq": loss.detach()}


def _covariance(centred_sum_of_products: torch.Tensor, n: int, eps: float) -> torch.Tensor:
    k = centred_sum_of_products.shape[0]
    eye = torch.eye(k, dtype=centred_sum_of_products.dtype, device=centred_sum_of_products.device)
    return centred_sum_of_products / (n - 1) + eps * eye


# -- HamJEPA's terms on their own (tests, diagnostics): each reduces its inputs itself ----------------

def global_mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the global batch and all features; x, y (N, D)."""
    total = all_reduce_sum(((x - y) ** 2).sum())
    return total / (global_count(x.shape[0]) * x.shape[1])


def hamjepa_prediction_loss(pred_a: torch.Tensor, z_b: torch.Tensor, pred_b: torch.Tensor, z_a: torch.Tensor,
                            q_dim: int, match: str = "q", p_weight: float = 0.2) -> tuple[torch.Tensor, Stats]:
    """L_pred = 1/2 [m(Phi_+dt(z_a), sg z_b) + m(Phi_-dt(z_b), sg z_a)]; all inputs (N, 2 q_dim).

    match = "q": m = MSE(q) + p_weight * MSE(p);  match = "qp": m = MSE over the whole state.
    """
    errors = all_reduce_sum(_squared_errors(pred_a, z_b, pred_b, z_a, q_dim))
    return _prediction_terms(errors, global_count(pred_a.shape[0]), q_dim, match, p_weight)


def energy_budget(q: torch.Tensor, p: torch.Tensor, q_target: float = 1.0,
                  p_target: float = 1.0) -> tuple[torch.Tensor, Stats]:
    """(E|q|^2/d - q_target)^2 + (E|p|^2/d - p_target)^2; q, p (N, d) hold all views of the global batch."""
    energies = all_reduce_sum(torch.stack([(q * q).mean(-1).sum(), (p * p).mean(-1).sum()])) / global_count(len(q))
    return _energy_terms(energies, q_target, p_target)


def variance_floor(x: torch.Tensor, std_floor: float = 0.2) -> tuple[torch.Tensor, Stats]:
    """mean_i relu(gamma - std_i)^2 with std_i = sqrt(var_i + 1e-4); x (N, d)."""
    centred = x - global_mean(x)
    return _variance_terms(all_reduce_sum((centred * centred).sum(0)) / (global_count(len(x)) - 1), std_floor)


def spectral_floor(x: torch.Tensor, projection: torch.Tensor, logdet_floor: float,
                   pr_floor: float | None = None, eigmax_ceiling: float | None = None,
                   eps: float = 1e-4) -> tuple[torch.Tensor, Stats]:
    """Penalise a collapsing spectrum of a random k-dim projection of the centred global batch.

    x (N, d), projection R (d, k) with orthonormal columns. C = Y^T Y / (N - 1) + eps I for the centred
    projection Y (N, k) (`_spectral_terms` has the penalty).
    """
    y = (x - global_mean(x)) @ projection.to(x.dtype)  # (N, k): centring commutes with the projection
    return _spectral_terms(_covariance(all_reduce_sum(y.T @ y), global_count(len(x)), eps), logdet_floor,
                           pr_floor, eigmax_ceiling)


def mean_penalty(x: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    """Mean over dimensions of the squared global-batch mean; x (N, D)."""
    return _mean_terms(global_mean(x))


def hamjepa_objective(z_a: torch.Tensor, z_b: torch.Tensor, pred_a: torch.Tensor, pred_b: torch.Tensor,
                      cfg: HamJEPALossConfig, projection_q: torch.Tensor,
                      projection_p: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    """L = w_pred L_pred + w_budget L_budget + w_var L_var + w_spectral L_spectral + w_mean L_mean.

    z_a, z_b: the two views' states (N, 2d); pred_a = Phi_+dt(z_a), pred_b = Phi_-dt(z_b);
    projection_q / projection_p: (d, k) orthonormal projections for the spectral floors.
    Every regulariser sees both views pooled: z = [z_a; z_b], (2N, 2d). Two collectives under data parallelism.
    """
    q_dim = z_a.shape[1] // 2
    z = torch.cat([z_a, z_b])  # (2N, 2d): both views pooled
    q, p = z[:, :q_dim], z[:, q_dim:]
    pairs, n = global_count(len(z_a)), global_count(len(z))
    # Level 1: squared prediction errors, energies, column sums.
    errors, energy_sums, column_sums = all_reduce_sums(
        _squared_errors(pred_a, z_b, pred_b, z_a, q_dim),
        torch.stack([(q * q).mean(-1).sum(), (p * p).mean(-1).sum()]), z.sum(0))
    mean = column_sums / n
    centred = {"q": q - mean[:q_dim], "p": p - mean[q_dim:]}
    projected = {"q": centred["q"] @ projection_q.to(z.dtype), "p": centred["p"] @ projection_p.to(z.dtype)}
    # Level 2: centred second moments and projected covariances.
    var_q, var_p, cov_q, cov_p = all_reduce_sums(
        (centred["q"] ** 2).sum(0), (centred["p"] ** 2).sum(0),
        projected["q"].T @ projected["q"], projected["p"].T @ projected["p"])

    l_pred, stats = _prediction_terms(errors, pairs, q_dim, cfg.match, cfg.p_weight)
    l_budget, budget_stats = _energy_terms(energy_sums / n, cfg.q_target, cfg.p_target)
    stats.update(budget_stats)
    l_var = l_spectral = 0.0
    for half, variance, cov, pr_floor, eigmax_ceiling in (
            ("q", var_q, cov_q, cfg.pr_floor_q, cfg.eigmax_ceiling_q),
            ("p", var_p, cov_p, cfg.pr_floor_p, cfg.eigmax_ceiling_p)):
        loss_var, s_var = _variance_terms(variance / (n - 1), cfg.std_floor)
        loss_spectral, s_spectral = _spectral_terms(_covariance(cov, n, cfg.spectral_eps), cfg.logdet_floor,
                                                    pr_floor, eigmax_ceiling)
        l_var, l_spectral = l_var + loss_var, l_spectral + loss_spectral
        stats.update({f"{half}_{key}": value for key, value in {**s_var, **s_spectral}.items()})
    l_mean, _ = _mean_terms(mean)

    total = (cfg.w_pred * l_pred + cfg.w_budget * l_budget + cfg.w_var * l_var
             + cfg.w_spectral * l_spectral + cfg.w_mean * l_mean)
    stats.update(loss_pred=l_pred.detach(), loss_budget=l_budget.detach(), loss_var=l_var.detach(),
                 loss_spectral=l_spectral.detach(), loss_mean=l_mean.detach(), loss=total.detach())
    return total, stats


def random_orthonormal(dim: int, k: int, seed: int, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A (dim, k) matrix with orthonormal columns, drawn on the CPU from `seed` so every worker agrees."""
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(dim, k, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r))  # Haar-uniform: fix QR's sign ambiguity
    return q.to(device=device, dtype=dtype)


class ProjectionSchedule:
    """The spectral floor's random projection, redrawn every `every` steps from (seed, step // every).

    Deterministic in the step, so all data-parallel workers and a resumed run draw the same matrices.
    """

    def __init__(self, dim: int, k: int, every: int = 16, seed: int = 0):
        self.dim, self.k, self.every, self.seed = dim, k, every, seed
        self._key: tuple | None = None
        self._matrix: torch.Tensor | None = None

    def __call__(self, step: int, device: torch.device | str = "cpu") -> torch.Tensor:
        key = (step // self.every, str(device))
        if key != self._key:
            self._matrix = random_orthonormal(self.dim, self.k, derive(self.seed, step // self.every), device)
            self._key = key
        return self._matrix


# -- SIGReg (LeJEPA) ------------------------------------------------------------------------------

def epps_pulley_knots(t_max: float, n_points: int, device=None,
                      dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Knots t_j on [0, t_max], weights w_j (trapezoid, doubled for the symmetric half, times exp(-t^2/2))
    and the standard normal characteristic function exp(-t^2/2) at the knots."""
    t = torch.linspace(0.0, t_max, n_points, device=device, dtype=dtype)
    trapezoid = torch.full_like(t, t_max / (n_points - 1))
    trapezoid[0] = trapezoid[-1] = 0.5 * t_max / (n_points - 1)
    gaussian_cf = torch.exp(-0.5 * t * t)
    return t, 2.0 * trapezoid * gaussian_cf, gaussian_cf


def _epps_pulley_terms(cos_mean: torch.Tensor, sin_mean: torch.Tensor, n: int, weights: torch.Tensor,
                       gaussian_cf: torch.Tensor) -> torch.Tensor:
    """N * sum_j w_j [(mean cos(t_j x) - exp(-t_j^2/2))^2 + (mean sin(t_j x))^2] from the global means (..., K, J)."""
    return n * (((cos_mean - gaussian_cf) ** 2 + sin_mean ** 2) * weights).sum(-1)


def epps_pulley(x: torch.Tensor, t_max: float = 3.0, n_points: int = 17) -> torch.Tensor:
    """Epps-Pulley normality statistic per direction; x (..., N, K) already projected -> (..., K).

    The defaults are the stand-alone test's (17 knots on [0, 3]); the SIGReg objective passes its own
    (`sigreg.t_max`, `sigreg.n_points`: 9 knots, docs/method.md §4), so a run's knots have one source: the config.

    N * sum_j w_j [(mean cos(t_j x) - exp(-t_j^2/2))^2 + (mean sin(t_j x))^2], N and the means taken
    over the global batch (cos and sin sums all-reduced together).
    """
    t, weights, gaussian_cf = epps_pulley_knots(t_max, n_points, x.device, x.dtype)
    tx = x.unsqueeze(-1) * t  # (..., N, K, J)
    n = global_count(x.shape[-2])
    cos_sum, sin_sum = all_reduce_sums(torch.cos(tx).sum(-3), torch.sin(tx).sum(-3))  # (..., K, J)
    return _epps_pulley_terms(cos_sum / n, sin_sum / n, n, weights, gaussian_cf)


def random_directions(dim: int, k: int, seed: int, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(dim, k) Gaussian directions normalised to unit length, drawn on the CPU from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(dim, k, generator=generator)
    return (directions / directions.norm(dim=0, keepdim=True)).to(device=device, dtype=dtype)


def sigreg_directions(dim: int, k: int, seed: int, step: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """SIGReg's directions for a training step: fresh every step, identical on every worker."""
    return random_directions(dim, k, derive(seed, Stream.SIGREG_DIRECTIONS, step), device)


def sigreg(views: torch.Tensor, directions: torch.Tensor, t_max: float, n_points: int) -> torch.Tensor:
    """Mean Epps-Pulley statistic over directions and views; views (V, N, D), directions (D, K)."""
    projected = views @ directions.to(views.dtype)  # (V, N, K)
    return epps_pulley(projected, t_max, n_points).mean()


def _lejepa_squared_deviations(views: torch.Tensor) -> torch.Tensor:
    """Per image, the mean over views and dimensions of (z_v - mean of the image's views)^2; views (V, N, D)."""
    centre = views.mean(0, keepdim=True)  # (1, N, D)
    return ((views - centre) ** 2).mean(dim=(0, 2))  # (N,)


def lejepa_prediction_loss(views: torch.Tensor) -> torch.Tensor:
    """1/2 * mean over views, samples and dimensions of (z_v - mean of the image's views)^2; views (V, N, D)."""
    return 0.5 * global_mean(_lejepa_squared_deviations(views))


def sigreg_objective(views: torch.Tensor, directions: torch.Tensor,
                     cfg: SIGRegConfig) -> tuple[torch.Tensor, Stats]:
    """LeJEPA: L = L_pred + lambda * SIGReg; views (V, N, D), directions (D, K). One collective under data
    parallelism: the prediction loss's sum and the Epps-Pulley cos and sin sums are reduced together."""
    n = global_count(views.shape[1])
    t, weights, gaussian_cf = epps_pulley_knots(cfg.t_max, cfg.n_points, views.device, views.dtype)
    tx = (views @ directions.to(views.dtype)).unsqueeze(-1) * t  # (V, N, K, J)
    deviation_sum, cos_sum, sin_sum = all_reduce_sums(
        _lejepa_squared_deviations(views).sum(), torch.cos(tx).sum(-3), torch.sin(tx).sum(-3))
    l_pred = 0.5 * deviation_sum / n
    l_sigreg = _epps_pulley_terms(cos_sum / n, sin_sum / n, n, weights, gaussian_cf).mean()
    total = l_pred + cfg.weight * l_sigreg
    return total, {"loss_pred": l_pred.detach(), "loss_sigreg": l_sigreg.detach(), "loss": total.detach()}
