"""Objectives: known values, collapse detection, SIGReg's statistical behaviour."""

import numpy as np
import pytest
import torch

from hamjepa.config import HamJEPALossConfig, SIGRegConfig
from hamjepa.objectives import (
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


def test_spectral_floor_terms_switch_on_separately():
    x = whitened(512, 64) * torch.linspace(0.05, 3.0, 64, dtype=torch.float64)  # anisotropic, full rank
    projection = torch.eye(64, dtype=torch.float64)[:, :32]
    _, stats = spectral_floor(x, projection, logdet_floor=-100.0)
    penalty_pr, _ = spectral_floor(x, projection, logdet_floor=-100.0, pr_floor=1.0)
    expected = (1.0 - stats["pr_per_dim"].item()) ** 2
    assert penalty_pr.item() == pytest.approx(expected, rel=1e-10)
    penalty_eig, _ = spectral_floor(x, projection, logdet_floor=-100.0, eigmax_ceiling=0.01)
    assert penalty_eig.item() == pytest.approx((stats["eigmax_fraction"].item() - 0.01) ** 2, rel=1e-10)


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


def test_sigreg_objective_combines_terms():
    views = torch.randn(2, 128, 32, dtype=torch.float64)
    directions = sigreg_directions(32, 8, seed=0, step=0).double()
    config = SIGRegConfig(weight=0.5)
    loss, stats = sigreg_objective(views, directions, config)
    assert loss.item() == pytest.approx(stats["loss_pred"].item() + 0.5 * stats["loss_sigreg"].item())


def test_hamjepa_objective_is_the_weighted_sum():
    config = HamJEPALossConfig(w_pred=1.0, w_budget=0.2, w_var=0.5, w_spectral=0.5, w_mean=0.05)
    z_a, z_b = torch.randn(64, 32, dtype=torch.float64) * 0.1, torch.randn(64, 32, dtype=torch.float64) * 0.1
    projection = random_orthonormal(16, 16, seed=0, dtype=torch.float64)
    loss, stats = hamjepa_objective(z_a, z_b, z_a, z_b, config, projection, projection)
    expected = (stats["loss_pred"] + 0.2 * stats["loss_budget"] + 0.5 * stats["loss_var"]
                + 0.5 * stats["loss_spectral"] + 0.05 * stats["loss_mean"])
    assert loss.item() == pytest.approx(expected.item())
    assert stats["loss_var"].item() > 0  # both views are below the std floor
    assert {"q_min_std", "p_logdet_per_dim", "q_pr_per_dim", "p_eigmax_fraction"} <= stats.keys()


def test_hamjepa_regularisers_see_both_views_pooled():
    """docs/method.md §3: budget, variance floor, spectral floor and mean penalty are computed once over [z_a; z_b]."""
    config = HamJEPALossConfig()
    generator = torch.Generator().manual_seed(0)
    scale = torch.linspace(0.05, 1.5, 32, dtype=torch.float64)
    z_a = torch.randn(48, 32, generator=generator, dtype=torch.float64) * scale + 0.3
    z_b = torch.randn(48, 32, generator=generator, dtype=torch.float64) * scale.flip(0) - 0.2
    projection_q = random_orthonormal(16, 12, seed=0, dtype=torch.float64)
    projection_p = random_orthonormal(16, 12, seed=1, dtype=torch.float64)
    _, stats = hamjepa_objective(z_a, z_b, z_a, z_b, config, projection_q, projection_p)
    z = torch.cat([z_a, z_b])
    q, p = z[:, :16], z[:, 16:]
    expected_var = variance_floor(q, config.std_floor)[0] + variance_floor(p, config.std_floor)[0]
    spec_q, spec_q_stats = spectral_floor(q, projection_q, config.logdet_floor, config.pr_floor_q,
                                          config.eigmax_ceiling_q, config.spectral_eps)
    spec_p, _ = spectral_floor(p, projection_p, config.logdet_floor, config.pr_floor_p, config.eigmax_ceiling_p,
                               config.spectral_eps)
    assert stats["loss_budget"].item() == pytest.approx(energy_budget(q, p)[0].item(), rel=1e-12)
    assert stats["loss_var"].item() == pytest.approx(expected_var.item(), rel=1e-12)
    assert stats["loss_spectral"].item() == pytest.approx((spec_q + spec_p).item(), rel=1e-12)
    assert stats["loss_mean"].item() == pytest.approx(mean_penalty(z)[0].item(), rel=1e-12)
    assert stats["q_logdet_per_dim"].item() == pytest.approx(spec_q_stats["logdet_per_dim"].item(), rel=1e-12)
    # and this differs from the per-view average the code used to compute (the views have different means)
    per_view_mean = 0.5 * (mean_penalty(z_a)[0] + mean_penalty(z_b)[0])
    assert abs(per_view_mean.item() - stats["loss_mean"].item()) > 0.01
