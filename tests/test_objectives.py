"""Objectives: known values, collapse detection, SIGReg's statistical behaviour.

Expected values come from hand-built inputs or from docs/method.md's formulas written out here (numpy), never
from the stats the function under test returns.
"""

import math

import numpy as np
import pytest
import torch

from hamjepa.config import HamJEPALossConfig, SIGRegConfig
from hamjepa.method.objectives import (
    ProjectionSchedule,
    energy_budget,
    epps_pulley,
    hamjepa_objective,
    hamjepa_prediction_loss,
    lejepa_prediction_loss,
    mean_penalty,
    random_orthonormal,
    sigreg_directions,
    sigreg_objective,
    spectral_floor,
    variance_floor,
)


def whitened(n, d, seed=0):
    """n samples with sample mean exactly 0 and sample covariance exactly I (float64)."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x - x.mean(0)
    cov = x.T @ x / (n - 1)
    evals, evecs = torch.linalg.eigh(cov)
    return x @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T


# -- spectral floor ------------------------------------------------------------------------------------

def test_rank_one_batch_passes_variance_floor_but_triggers_spectral_floor():
    n, d = 256, 64
    direction = torch.ones(d, dtype=torch.float64)
    x = torch.randn(n, 1, dtype=torch.float64) * direction  # rank 1, every column std ~1
    var_loss, var_stats = variance_floor(x, std_floor=0.2)
    assert var_loss.item() == 0.0 and var_stats["min_std"].item() > 0.5
    projection = random_orthonormal(d, 32, seed=0, dtype=torch.float64)
    penalty, stats = spectral_floor(x, projection, logdet_floor=-1.5, pr_floor=0.12, eigmax_ceiling=0.35)
    assert penalty.item() > 10.0
    assert stats["eigmax_fraction"].item() > 0.99
    assert stats["pr_per_dim"].item() < 1.5 / 32


def test_whitened_gaussian_batch_has_zero_spectral_penalty():
    x = whitened(512, 64)
    projection = random_orthonormal(64, 32, seed=3, dtype=torch.float64)
    penalty, stats = spectral_floor(x, projection, logdet_floor=-1.5, pr_floor=0.12, eigmax_ceiling=0.35)
    assert penalty.item() == 0.0
    assert stats["pr_per_dim"].item() == pytest.approx(1.0, abs=1e-9)
    assert stats["eigmax_fraction"].item() == pytest.approx(1 / 32, abs=1e-9)


def test_spectral_stats_match_numpy():
    x = torch.randn(200, 40, dtype=torch.float64) @ torch.randn(40, 40, dtype=torch.float64)
    projection = random_orthonormal(40, 16, seed=1, dtype=torch.float64)
    _, stats = spectral_floor(x, projection, logdet_floor=-1.5, eps=1e-4)
    y = x.numpy() @ projection.numpy()
    y = y - y.mean(0)
    cov = y.T @ y / (len(y) - 1) + 1e-4 * np.eye(16)
    eig = np.linalg.eigvalsh(cov)
    assert stats["logdet_per_dim"].item() == pytest.approx(np.linalg.slogdet(cov)[1] / 16, rel=1e-10)
    assert stats["pr_per_dim"].item() == pytest.approx(np.trace(cov) ** 2 / np.trace(cov @ cov) / 16, rel=1e-10)
    assert stats["eigmax_fraction"].item() == pytest.approx(eig.max() / np.trace(cov), rel=1e-10)


def known_spectrum_batch():
    """4 states in d = 3 whose first two columns have covariance exactly diag(3, 1) (n - 1 = 3 divides it)."""
    b = 3 ** 0.5 / 2  # 4 b^2 / 3 = 1
    return torch.tensor([[1.5, b, 10.0], [1.5, -b, -10.0], [-1.5, b, -10.0], [-1.5, -b, 10.0]], dtype=torch.float64)


def test_spectral_floor_on_a_known_spectrum_and_its_terms_switch_on_separately():
    """C = diag(3, 1) (the third column is projected away): log det C / k = ln(3) / 2, PR(C) / k = 16 / 10 / 2 = 0.8,
    lambda_max / tr C = 3 / 4."""
    x, projection = known_spectrum_batch(), torch.eye(3, dtype=torch.float64)[:, :2]
    penalty, stats = spectral_floor(x, projection, logdet_floor=-100.0, eps=0.0)
    assert penalty.item() == 0.0
    assert stats["logdet_per_dim"].item() == pytest.approx(math.log(3) / 2, rel=1e-12)
    assert stats["pr_per_dim"].item() == pytest.approx(0.8, rel=1e-12)
    assert stats["eigmax_fraction"].item() == pytest.approx(0.75, rel=1e-12)
    logdet_only, _ = spectral_floor(x, projection, logdet_floor=1.0, eps=0.0)
    assert logdet_only.item() == pytest.approx((1.0 - math.log(3) / 2) ** 2, rel=1e-12)
    pr_only, _ = spectral_floor(x, projection, logdet_floor=-100.0, pr_floor=1.0, eps=0.0)
    assert pr_only.item() == pytest.approx(0.2 ** 2, rel=1e-12)
    eigmax_only, _ = spectral_floor(x, projection, logdet_floor=-100.0, eigmax_ceiling=0.5, eps=0.0)
    assert eigmax_only.item() == pytest.approx(0.25 ** 2, rel=1e-12)
    inactive, _ = spectral_floor(x, projection, logdet_floor=0.5, pr_floor=0.8 - 1e-9, eigmax_ceiling=0.75 + 1e-9,
                                 eps=0.0)
    assert inactive.item() == 0.0  # each term is zero just on the safe side of its floor (ln 3 / 2 > 0.5)
    every_term, _ = spectral_floor(x, projection, logdet_floor=1.0, pr_floor=1.0, eigmax_ceiling=0.5, eps=0.0)
    assert every_term.item() == pytest.approx((1.0 - math.log(3) / 2) ** 2 + 0.04 + 0.0625, rel=1e-12)
    # eps is added to C's diagonal: C = diag(3.5, 1.5)
    _, stats = spectral_floor(x, projection, logdet_floor=-100.0, eps=0.5)
    assert stats["logdet_per_dim"].item() == pytest.approx(math.log(3.5 * 1.5) / 2, rel=1e-12)
    assert stats["pr_per_dim"].item() == pytest.approx(5.0 ** 2 / (3.5 ** 2 + 1.5 ** 2) / 2, rel=1e-12)
    assert stats["eigmax_fraction"].item() == pytest.approx(0.7, rel=1e-12)


def test_random_orthonormal_and_schedule():
    r = random_orthonormal(50, 20, seed=5, dtype=torch.float64)
    torch.testing.assert_close(r.T @ r, torch.eye(20, dtype=torch.float64), rtol=0, atol=1e-12)
    schedule = ProjectionSchedule(50, 20, every=16, seed=7)
    assert torch.equal(schedule(0), schedule(15))  # held for 16 steps
    assert not torch.equal(schedule(15), schedule(16))  # then redrawn
    assert torch.equal(ProjectionSchedule(50, 20, every=16, seed=7)(17), schedule(16))  # deterministic


# -- variance floor, budget, mean -------------------------------------------------------------------

def test_variance_floor_value():
    x = whitened(1000, 4) * torch.tensor([0.1, 0.3, 1.0, 0.0], dtype=torch.float64)
    loss, stats = variance_floor(x, std_floor=0.2)
    std = torch.sqrt(torch.tensor([0.01, 0.09, 1.0, 0.0], dtype=torch.float64) + 1e-4)
    expected = torch.relu(0.2 - std).pow(2).mean().item()
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert stats["min_std"].item() == pytest.approx(0.01, rel=1e-6)


def test_energy_budget_value():
    q = torch.full((10, 4), 2.0, dtype=torch.float64)  # |q|^2/d = 4
    p = torch.full((10, 4), 0.5, dtype=torch.float64)  # |p|^2/d = 0.25
    loss, stats = energy_budget(q, p, q_target=1.0, p_target=1.0)
    assert loss.item() == pytest.approx(9.0 + 0.5625)
    assert stats["q_energy"].item() == pytest.approx(4.0)


def test_mean_penalty_value():
    x = torch.tensor([[1.0, 2.0], [3.0, 2.0]], dtype=torch.float64)  # means 2, 2
    assert mean_penalty(x)[0].item() == pytest.approx(4.0)


# -- prediction losses ----------------------------------------------------------------------------

def test_hamjepa_prediction_loss_values_and_stop_gradient():
    d = 3
    z_a = torch.zeros(4, 2 * d, dtype=torch.float64, requires_grad=True)
    z_b = torch.ones(4, 2 * d, dtype=torch.float64, requires_grad=True)
    pred_a = torch.zeros(4, 2 * d, dtype=torch.float64)  # error 1 on q and p against z_b
    pred_b = torch.full((4, 2 * d), 3.0, dtype=torch.float64)  # error 9 on q and p against z_a
    loss_q, _ = hamjepa_prediction_loss(pred_a, z_b, pred_b, z_a, d, match="q", p_weight=0.2)
    assert loss_q.item() == pytest.approx(0.5 * ((1 + 0.2) + (9 + 1.8)))
    loss_qp, _ = hamjepa_prediction_loss(pred_a, z_b, pred_b, z_a, d, match="qp")
    assert loss_qp.item() == pytest.approx(0.5 * (1 + 9))
    # targets are detached: no gradient reaches z_a or z_b through the target side
    pred_a.requires_grad_(True)
    loss, _ = hamjepa_prediction_loss(pred_a, z_b, pred_b, z_a, d)
    loss.backward()
    assert z_a.grad is None and z_b.grad is None and pred_a.grad.abs().sum() > 0


def test_lejepa_prediction_loss_value():
    views = torch.stack([torch.zeros(5, 4), torch.full((5, 4), 2.0)])  # mean 1, deviations 1
    assert lejepa_prediction_loss(views).item() == pytest.approx(0.5)


# -- Epps-Pulley / SIGReg -------------------------------------------------------------------------

def _gaussian_statistic(n, repeats=20):
    x = torch.randn(repeats, n, 16, dtype=torch.float64)
    return epps_pulley(x, t_max=3.0, n_points=17).mean().item()


def test_epps_pulley_is_small_and_n_independent_on_gaussians():
    small, large = _gaussian_statistic(500), _gaussian_statistic(5000)
    assert 0 < small < 2.0 and 0 < large < 2.0  # about 1 under the null
    assert 0.6 < small / large < 1.6  # O(1) under the null whatever N


def test_epps_pulley_is_large_on_collapsed_and_uniform_batches():
    n = 5000
    gaussian = _gaussian_statistic(n)
    collapsed = epps_pulley(torch.zeros(n, 16, dtype=torch.float64)).mean().item()
    uniform = epps_pulley((torch.rand(n, 16, dtype=torch.float64) - 0.5) * 12 ** 0.5).mean().item()  # var 1
    assert collapsed > 1000 * gaussian
    assert uniform > 10 * gaussian


def test_epps_pulley_properties():
    x = torch.randn(300, 8, dtype=torch.float64) * 2 + 1
    stat = epps_pulley(x)
    assert stat.shape == (8,) and (stat >= 0).all()
    torch.testing.assert_close(epps_pulley(x[torch.randperm(300)]), stat)  # permutation invariant
    torch.testing.assert_close(epps_pulley(x.T.reshape(2, 4, 300).transpose(1, 2)).reshape(8),
                               stat)  # batched leading axes = separate directions


def test_epps_pulley_gradient_moves_towards_gaussian():
    x = ((torch.rand(2000, 4, dtype=torch.float64) - 0.5) * 12 ** 0.5).requires_grad_(True)
    optimiser = torch.optim.SGD([x], lr=0.05)
    before = epps_pulley(x).mean().item()
    for _ in range(25):
        optimiser.zero_grad()
        epps_pulley(x).mean().backward()
        optimiser.step()
    assert epps_pulley(x).mean().item() < 0.5 * before


def test_sigreg_directions_are_unit_and_shared_by_seed():
    a = sigreg_directions(32, 8, seed=1, step=5)
    torch.testing.assert_close(a.norm(dim=0), torch.ones(8))
    assert torch.equal(a, sigreg_directions(32, 8, seed=1, step=5))
    assert not torch.equal(a, sigreg_directions(32, 8, seed=1, step=6))  # redrawn every step


def standard_normal_cf_weights(t_max, n_points):
    """docs/method.md §4, written out: knots, trapezoid weights on [0, t_max] doubled, times exp(-t^2/2)."""
    t = np.linspace(0.0, t_max, n_points)
    trapezoid = np.full(n_points, t_max / (n_points - 1))
    trapezoid[[0, -1]] /= 2
    return t, 2 * trapezoid * np.exp(-t ** 2 / 2)


def reference_epps_pulley(x, t_max, n_points):
    """N sum_j w_j [(mean cos(t_j x) - exp(-t_j^2/2))^2 + (mean sin(t_j x))^2] for a 1-d sample."""
    t, w = standard_normal_cf_weights(t_max, n_points)
    tx = np.outer(x, t)
    return len(x) * np.sum(w * ((np.cos(tx).mean(0) - np.exp(-t ** 2 / 2)) ** 2 + np.sin(tx).mean(0) ** 2))


# Knots 0, 1, 2 (t_max 2, 3 points): trapezoid weights 1/2, 1, 1/2, so w = (1, 2 e^-1/2, e^-2), and
# exp(-t^2/2) = (1, e^-1/2, e^-2). For N = 4 values +-1 (mean cos = cos t, mean sin = 0) and for N = 4 zeros:
EP_PLUS_MINUS_ONE = 4 * (2 * math.exp(-0.5) * (math.cos(1) - math.exp(-0.5)) ** 2
                         + math.exp(-2) * (math.cos(2) - math.exp(-2)) ** 2)  # = 0.185922
EP_ZEROS = 4 * (2 * math.exp(-0.5) * (1 - math.exp(-0.5)) ** 2 + math.exp(-2) * (1 - math.exp(-2)) ** 2)


def test_epps_pulley_known_values():
    plus_minus_one = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]], dtype=torch.float64)
    assert epps_pulley(plus_minus_one, t_max=2.0, n_points=3).item() == pytest.approx(EP_PLUS_MINUS_ONE, rel=1e-12)
    zeros = torch.zeros(4, 1, dtype=torch.float64)
    assert epps_pulley(zeros, t_max=2.0, n_points=3).item() == pytest.approx(EP_ZEROS, rel=1e-12)
    # an asymmetric sample (the sine term counts), default knots, against the formula written out in numpy
    sample = np.array([0.0, 0.0, 0.5, 2.0, -0.3])
    value = epps_pulley(torch.tensor(sample).unsqueeze(-1), t_max=3.0, n_points=17).item()
    assert value == pytest.approx(reference_epps_pulley(sample, 3.0, 17), rel=1e-12)
    assert np.abs(np.sin(np.outer(sample, np.linspace(0.0, 3.0, 17))).mean(0)).max() > 0.1  # sin term counts


def test_sigreg_objective_on_a_hand_built_batch():
    """Views a = (+-1, 0), b = -a, directions e1, e2. L_pred = 1/2 mean (z_v - (a+b)/2)^2 = 1/2 * 1/2 (half the
    entries are +-1, the centre is 0); SIGReg = mean over 2 views x 2 directions = (EP(+-1) + EP(0)) / 2."""
    column = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    view_a = torch.stack([column, torch.zeros(4, dtype=torch.float64)], dim=1)
    views = torch.stack([view_a, -view_a])  # (V = 2, N = 4, D = 2)
    directions = torch.eye(2, dtype=torch.float64)
    config = SIGRegConfig(num_directions=2, t_max=2.0, n_points=3, weight=0.3)
    loss, stats = sigreg_objective(views, directions, config)
    sigreg_value = (EP_PLUS_MINUS_ONE + EP_ZEROS) / 2
    assert stats["loss_pred"].item() == pytest.approx(0.25, rel=1e-12)
    assert stats["loss_sigreg"].item() == pytest.approx(sigreg_value, rel=1e-12)
    assert loss.item() == pytest.approx(0.25 + 0.3 * sigreg_value, rel=1e-12)
    default, _ = sigreg_objective(views, directions, SIGRegConfig(t_max=2.0, n_points=3))
    assert default.item() == pytest.approx(0.25 + 0.02 * sigreg_value, rel=1e-12)  # lambda = 0.02 (§4)


# -- the HamJEPA objective on a hand-built batch ----------------------------------------------------------

# Two views of N = 2 images, d = 2; pooled (2N = 4 states), the columns q0, q1, p0, p1 are
#   q0 = (2, 2, 2, 2)     constant: variance 0
#   q1 = (1, -1, 1, -1)   mean 0, unbiased variance 4/3
#   p0 = (1, 1, -1, -1), p1 = (1, -1, -1, 1): mean 0, variance 4/3, uncorrelated with each other
Z_A = [[2.0, 1.0, 1.0, 1.0], [2.0, -1.0, 1.0, -1.0]]
Z_B = [[2.0, 1.0, -1.0, -1.0], [2.0, -1.0, -1.0, 1.0]]
EPS = 1e-4  # spectral_eps, and the variance floor's 1e-4
# L_pred, match q, p_weight 0.2: pred_a misses z_b by 1 on q and 0.5 on p, pred_b misses z_a by 2 on q only:
#   1/2 [(1 + 0.2 * 0.25) + (4 + 0)] = 2.525
HAND_PRED = 2.525
# L_budget: |q|^2/d = (4 + 1)/2 = 2.5 and |p|^2/d = 1 in every state: (2.5 - 1)^2 + 0
HAND_BUDGET = 2.25
# L_var: q0's std is sqrt(0 + 1e-4) = 0.01, every other std sqrt(4/3 + 1e-4) > 0.2: (0.2 - 0.01)^2 / d
HAND_VAR = 0.19 ** 2 / 2
# L_spectral: C_q = diag(eps, 4/3 + eps) (any rotation R keeps its spectrum), C_p = (4/3 + eps) I.
#   q: log det/k = (ln eps + ln(4/3 + eps))/2 < -1.5; PR/k ~ 1/2 > 0.12; lambda_max/tr ~ 1 > 0.35
#   p: log det/k = ln(4/3 + eps) > -1.5; PR/k = 1 > 0.16; lambda_max/tr = 1/2 > 0.30 -> 0.2^2
_SMALL, _LARGE = EPS, 4 / 3 + EPS
HAND_SPECTRAL_Q = ((-1.5 - (math.log(_SMALL) + math.log(_LARGE)) / 2) ** 2
                   + (_LARGE / (_SMALL + _LARGE) - 0.35) ** 2)
HAND_SPECTRAL = HAND_SPECTRAL_Q + 0.2 ** 2  # = 2.9612916^2 + 0.6499250^2 + 0.04 = 9.2316508
# L_mean: the pooled mean is (2, 0, 0, 0): 2^2 / 4
HAND_MEAN = 1.0


def hand_built_batch():
    z_a, z_b = torch.tensor(Z_A, dtype=torch.float64), torch.tensor(Z_B, dtype=torch.float64)
    pred_a = z_b + torch.tensor([1.0, 1.0, 0.5, 0.5], dtype=torch.float64)
    pred_b = z_a + torch.tensor([2.0, 2.0, 0.0, 0.0], dtype=torch.float64)
    angle = 0.5
    rotation = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]],
                            dtype=torch.float64)
    return z_a, z_b, pred_a, pred_b, rotation, torch.eye(2, dtype=torch.float64)


def test_hamjepa_objective_on_a_hand_built_batch():
    z_a, z_b, pred_a, pred_b, projection_q, projection_p = hand_built_batch()
    weights = dict(w_pred=1.5, w_budget=0.3, w_var=0.7, w_spectral=0.11, w_mean=2.0)  # distinct: a swap shows
    loss, stats = hamjepa_objective(z_a, z_b, pred_a, pred_b, HamJEPALossConfig(**weights, p_weight=0.6),
                                    projection_q, projection_p)
    pred = 0.5 * ((1 + 0.6 * 0.25) + (4 + 0.6 * 0))  # HAND_PRED with p_weight 0.6 instead of 0.2
    assert stats["loss_pred"].item() == pytest.approx(pred, rel=1e-12)
    assert stats["loss_budget"].item() == pytest.approx(HAND_BUDGET, rel=1e-12)
    assert stats["loss_var"].item() == pytest.approx(HAND_VAR, rel=1e-12)
    assert stats["loss_spectral"].item() == pytest.approx(HAND_SPECTRAL, rel=1e-10)
    assert stats["loss_mean"].item() == pytest.approx(HAND_MEAN, rel=1e-12)
    expected = (1.5 * pred + 0.3 * HAND_BUDGET + 0.7 * HAND_VAR + 0.11 * HAND_SPECTRAL + 2.0 * HAND_MEAN)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert stats["loss"].item() == pytest.approx(expected, rel=1e-10)
    assert (stats["pred_mse_q"].item(), stats["pred_mse_p"].item()) == pytest.approx((2.5, 0.125), rel=1e-12)
    assert (stats["q_energy"].item(), stats["p_energy"].item()) == pytest.approx((2.5, 1.0), rel=1e-12)
    assert stats["q_min_std"].item() == pytest.approx(0.01, rel=1e-12)
    assert stats["p_min_std"].item() == pytest.approx(math.sqrt(4 / 3 + EPS), rel=1e-12)
    assert stats["p_eigmax_fraction"].item() == pytest.approx(0.5, rel=1e-12)
    assert stats["p_pr_per_dim"].item() == pytest.approx(1.0, rel=1e-12)
    assert stats["q_logdet_per_dim"].item() == pytest.approx((math.log(_SMALL) + math.log(_LARGE)) / 2, rel=1e-12)


def test_hamjepa_objective_default_weights_are_the_documented_ones():
    """docs/method.md §3: L = L_pred + 0.2 L_budget + 0.5 L_var + 0.5 L_spectral + 0.05 L_mean."""
    z_a, z_b, pred_a, pred_b, projection_q, projection_p = hand_built_batch()
    loss, _ = hamjepa_objective(z_a, z_b, pred_a, pred_b, HamJEPALossConfig(), projection_q, projection_p)
    expected = HAND_PRED + 0.2 * HAND_BUDGET + 0.5 * HAND_VAR + 0.5 * HAND_SPECTRAL + 0.05 * HAND_MEAN
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    # match qp: m = MSE over the whole state: 1/2 [(1 + 0.25)/2 + (4 + 0)/2] = 1.3125 replaces 2.525
    qp, stats = hamjepa_objective(z_a, z_b, pred_a, pred_b, HamJEPALossConfig(match="qp"), projection_q,
                                  projection_p)
    assert stats["loss_pred"].item() == pytest.approx(1.3125, rel=1e-12)
    assert qp.item() == pytest.approx(expected - HAND_PRED + 1.3125, rel=1e-10)


def reference_regularisers(z, config, projection_q, projection_p):
    """docs/method.md §3's four regularisers, written out in numpy for states z (n, 2d)."""
    n, d = z.shape[0], z.shape[1] // 2
    q, p = z[:, :d], z[:, d:]
    budget = ((q ** 2).sum(1).mean() / d - config.q_target) ** 2 + ((p ** 2).sum(1).mean() / d - config.p_target) ** 2

    def variance(x):
        return np.mean(np.maximum(config.std_floor - np.sqrt(x.var(0, ddof=1) + 1e-4), 0.0) ** 2)

    def spectral(x, projection, pr_floor, eigmax_ceiling):
        y = (x - x.mean(0)) @ projection
        k = projection.shape[1]
        cov = y.T @ y / (n - 1) + config.spectral_eps * np.eye(k)
        logdet = np.linalg.slogdet(cov)[1] / k
        pr = np.trace(cov) ** 2 / np.trace(cov @ cov) / k
        top = np.linalg.eigvalsh(cov).max() / np.trace(cov)
        return (max(config.logdet_floor - logdet, 0.0) ** 2 + max(pr_floor - pr, 0.0) ** 2
                + max(top - eigmax_ceiling, 0.0) ** 2)

    return {"loss_budget": budget, "loss_var": variance(q) + variance(p),
            "loss_spectral": (spectral(q, projection_q, config.pr_floor_q, config.eigmax_ceiling_q)
                              + spectral(p, projection_p, config.pr_floor_p, config.eigmax_ceiling_p)),
            "loss_mean": np.mean(z.mean(0) ** 2)}


def test_hamjepa_regularisers_see_both_views_pooled():
    """docs/method.md §3: budget, variance floor, spectral floor and mean penalty are computed once over [z_a; z_b],
    checked against the formulas written out in numpy, and each differs from the per-view average."""
    config = HamJEPALossConfig()
    rng = np.random.default_rng(0)
    half = np.geomspace(0.02, 3.0, 16)  # a few tiny and one dominant direction: every floor binds
    scale = np.concatenate([half, half[::-1]])
    shift = np.repeat([1.0, 0.0], [8, 24])  # the views' means differ on 8 coordinates of q
    z_a = rng.standard_normal((48, 32)) * scale * 1.3 + 0.3 * shift  # and their scales everywhere
    z_b = rng.standard_normal((48, 32)) * scale * 0.6 - 0.2 * shift
    projection_q = np.linalg.qr(rng.standard_normal((16, 12)))[0]
    projection_p = np.linalg.qr(rng.standard_normal((16, 12)))[0]
    tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in (z_a, z_b, projection_q, projection_p)]
    _, stats = hamjepa_objective(tensors[0], tensors[1], tensors[0], tensors[1], config, tensors[2], tensors[3])
    pooled = reference_regularisers(np.concatenate([z_a, z_b]), config, projection_q, projection_p)
    view_a = reference_regularisers(z_a, config, projection_q, projection_p)
    view_b = reference_regularisers(z_b, config, projection_q, projection_p)
    for name, value in pooled.items():
        assert value > 1e-3, name  # every term is active on this batch, so a zero would not pass for agreement
        assert stats[name].item() == pytest.approx(value, rel=1e-10), name
        per_view = (view_a[name] + view_b[name]) / 2
        assert abs(per_view - value) > 0.01 * max(abs(value), 1e-3), name  # pooling is observable in every term
