"""The theory check: price of isotropy, entropy gap, the probe's Gauss-Newton geometry, the flow's geometry."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import euler
from torch import nn

from hamjepa import names
from hamjepa.evaluation import theory
from hamjepa.evaluation.probes import TrainedProbe
from hamjepa.evaluation.theory import (
    covariance,
    entropy_gap,
    flow_geometry,
    flow_jacobians,
    price_of_isotropy,
    probe_curvature,
    probe_geometry,
    readout_geometry,
    reversibility_error,
    symplecticity_defect,
    with_ridge,
)
from hamjepa.method.predictors import HamiltonianPredictor, ResidualMLPPredictor

D = 8


def random_spd(d, seed, spread=1.0):
    """A random SPD matrix with eigenvalues exp(spread * N(0, 1)) in a random basis."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    eigenvalues = torch.exp(spread * torch.randn(d, generator=generator, dtype=torch.float64))
    return basis @ torch.diag(eigenvalues) @ basis.T


def am_gm_gap(eigenvalues):
    return len(eigenvalues) * math.log(eigenvalues.mean().item()) - eigenvalues.log().sum().item()


# -- price of isotropy -------------------------------------------------------------------------------------

@pytest.mark.parametrize("d, c", [(1, 1.0), (5, 3.0), (64, 1e-4)])
def test_price_of_isotropy_of_a_multiple_of_the_identity_is_one(d, c):
    assert price_of_isotropy(c * torch.eye(d, dtype=torch.float64)) == pytest.approx(1.0, abs=1e-12)


def test_price_of_isotropy_of_a_rank_one_dominated_geometry_approaches_d():
    v = torch.randn(D, dtype=torch.float64)
    for weight, tolerance in ((1e2, 0.5), (1e8, 1e-5)):
        h = weight * torch.outer(v, v) + torch.eye(D, dtype=torch.float64)
        assert price_of_isotropy(h) == pytest.approx(D, abs=tolerance)
    assert price_of_isotropy(1e2 * torch.outer(v, v) + torch.eye(D, dtype=torch.float64)) < D


def test_price_of_isotropy_lies_between_one_and_d_and_ignores_scale():
    for seed in range(5):
        h = random_spd(D, seed)
        rho = price_of_isotropy(h)
        assert 1.0 < rho < D
        assert price_of_isotropy(7.5 * h) == pytest.approx(rho, rel=1e-12)
        assert rho == pytest.approx(D * torch.linalg.eigvalsh(h).max().item() / h.trace().item(), rel=1e-12)


# -- entropy gap -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_entropy_gap_vanishes_at_the_optimal_covariance(seed):
    h = random_spd(D, seed, spread=2.0)
    optimal = torch.linalg.inv(h)
    assert abs(entropy_gap(optimal, h)) < 1e-10
    assert abs(entropy_gap(3.7 * optimal, h)) < 1e-10  # any budget: (c/d) H^-1


@pytest.mark.parametrize("seed", range(4))
def test_entropy_gap_is_positive_for_any_other_covariance(seed):
    h = random_spd(D, seed)
    assert entropy_gap(random_spd(D, 100 + seed), h) > 1e-3
    # even a small step away from H^-1 costs entropy, to second order in the step (H^-1 is the minimum)
    step = random_spd(D, 200 + seed) - torch.eye(D, dtype=torch.float64)
    gaps = [entropy_gap(torch.linalg.inv(h) + size * step, h) for size in (1e-3, 5e-4)]
    assert gaps[0] > 0 and gaps[1] > 0
    assert gaps[1] / gaps[0] == pytest.approx(0.25, rel=0.05)


def test_entropy_gap_ignores_the_scale_of_either_matrix():
    sigma, h = random_spd(D, 1), random_spd(D, 2)
    gap = entropy_gap(sigma, h)
    for a, b in ((10.0, 1.0), (1.0, 1e-3), (0.2, 40.0)):
        assert entropy_gap(a * sigma, b * h) == pytest.approx(gap, rel=1e-10)


def test_entropy_gap_of_the_identity_is_the_am_gm_gap_of_h():
    h = random_spd(D, 3, spread=1.5)
    gap = entropy_gap(torch.eye(D, dtype=torch.float64), h)
    assert gap == pytest.approx(am_gm_gap(torch.linalg.eigvalsh(h)), rel=1e-10)
    assert entropy_gap(torch.eye(D, dtype=torch.float64), 2.0 * torch.eye(D, dtype=torch.float64)) == pytest.approx(
        0.0, abs=1e-12)


def test_entropy_gap_refuses_a_singular_covariance_and_mismatched_shapes():
    singular = torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="Sigma must be symmetric positive definite"):
        entropy_gap(singular, torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="same shape"):
        entropy_gap(torch.eye(3), torch.eye(4))


# -- the probe's geometry ----------------------------------------------------------------------------------

def test_gauss_newton_curvature_is_the_hessian_of_the_probe_loss_in_its_input():
    generator = torch.Generator().manual_seed(0)
    n, d, classes = 30, 5, 4
    u = torch.randn(n, d, generator=generator, dtype=torch.float64)
    weight = 2.0 * torch.randn(classes, d, generator=generator, dtype=torch.float64)
    bias = torch.randn(classes, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=generator)

    def loss(shift):  # the mean cross-entropy with every input moved by the same shift (d,)
        return F.cross_entropy((u + shift) @ weight.T + bias, labels)

    hessian = torch.autograd.functional.hessian(loss, torch.zeros(d, dtype=torch.float64))  # (d, d)
    curvature = probe_curvature(u, weight, bias)
    assert torch.allclose(curvature, hessian, rtol=0, atol=1e-12)
    assert curvature.abs().max() > 1e-2  # not vacuous
    assert torch.linalg.matrix_rank(curvature).item() == classes - 1  # softmax: one redundant logit


def test_ridge_makes_a_low_rank_curvature_spd_relative_to_its_trace():
    curvature = probe_curvature(torch.randn(50, 10, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64))
    h = with_ridge(curvature, theory.CURVATURE_RIDGE)
    eigenvalues = torch.linalg.eigvalsh(h)
    assert eigenvalues.min().item() == pytest.approx(theory.CURVATURE_RIDGE * curvature.trace().item() / 10,
                                                     rel=1e-6)
    assert torch.allclose(with_ridge(5.0 * curvature, 1e-3), 5.0 * h)


def _probe(features, classes=3, seed=0):
    """A LayerNorm + Linear probe with non-trivial affine parameters, as linear_probe builds it."""
    generator = torch.Generator().manual_seed(seed)
    dim = features.shape[1]
    norm, linear = nn.LayerNorm(dim), nn.Linear(dim, classes)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.3 * torch.rand(dim, generator=generator))
        norm.bias.copy_(0.1 * torch.randn(dim, generator=generator))
        linear.weight.copy_(torch.randn(classes, dim, generator=generator))
        linear.bias.copy_(torch.randn(classes, generator=generator))
    return TrainedProbe(norm, linear, features)


def test_probe_geometry_measures_the_probe_input_the_linear_layer_reads():
    features = torch.randn(400, 6) * torch.tensor([3.0, 1.0, 1.0, 0.5, 0.5, 0.2]) + 2.0
    probe = _probe(features)
    out = probe_geometry(probe)
    assert set(out) == set(names.THEORY)
    with torch.no_grad():  # the reference: the probe's own float32 LayerNorm, then the definitions
        u = probe.norm(features).double()
        weight, bias = probe.linear.weight.double(), probe.linear.bias.double()
    h = with_ridge(probe_curvature(u, weight, bias), theory.CURVATURE_RIDGE)
    sigma = with_ridge(covariance(u), theory.COVARIANCE_RIDGE)
    assert out["rho_probe"] == pytest.approx(price_of_isotropy(h), rel=1e-5)
    assert out["entropy_gap"] == pytest.approx(entropy_gap(sigma, h), rel=1e-5)
    assert out["entropy_gap_iso"] == pytest.approx(entropy_gap(torch.eye(6, dtype=torch.float64), h), rel=1e-5)
    # 3 classes in 6 dimensions: H has rank 2 plus the ridge, so isotropy pays at least D / rank = 3
    assert out["rho_probe"] > 3.0 and out["entropy_gap"] > 0 and out["entropy_gap_iso"] > 0


def test_probe_geometry_is_undefined_without_samples_or_signal():
    assert all(math.isnan(v) for v in probe_geometry(_probe(torch.randn(1, 4))).values())
    dead = _probe(torch.randn(20, 4))
    dead.linear.weight.data.zero_()
    assert all(math.isnan(v) for v in probe_geometry(dead).values())


def test_readout_geometry_names_every_readout_and_wants_one_probe_each():
    probes = [_probe(torch.randn(50, 4), seed=s) for s in range(3)]
    out = readout_geometry(("q", "p", "qp"), probes)
    assert sorted(out) == sorted(names.theory(kind, r) for kind in names.THEORY for r in ("q", "p", "qp"))
    assert out["rho_probe_p"] == pytest.approx(probe_geometry(probes[1])["rho_probe"])
    with pytest.raises(ValueError, match="one probe per readout"):
        readout_geometry(("q", "p", "qp"), probes[:2])


# -- the flow's geometry -----------------------------------------------------------------------------------

def hamiltonian(steps=3, dt=0.1, dtype=torch.float64):
    # A strongly non-quadratic potential (s = 1, larger weights), so the checks are not the oscillator's.
    torch.manual_seed(1)
    predictor = HamiltonianPredictor(D, hidden_dim=16, depth=2, residual_scale=1.0, base_coeff=0.1, steps=steps,
                                     dt=dt).to(dtype)
    for param in predictor.parameters():
        param.data.mul_(3.0)
    return predictor


def mlp_ablation():
    torch.manual_seed(2)
    predictor = ResidualMLPPredictor(2 * D, hidden_dim=16, steps=3).double()
    nn.init.normal_(predictor.mlp[-1].weight, std=0.3)  # zero-initialised = the identity, trivially symplectic
    return predictor


def as_flow(predictor):
    return lambda z, direction: predictor(z, direction)


def euler_flow(predictor, dt=0.1, steps=3):
    def flow(z, direction):
        q, p = euler(z[..., :D], z[..., D:], predictor.grad_potential, direction * dt, steps)
        return torch.cat([q, p], dim=-1)
    return flow


def states(n=16):
    return torch.randn(n, 2 * D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def test_jacobians_match_autograd_one_state_at_a_time():
    predictor = hamiltonian()
    z = states(3)
    jacobians = flow_jacobians(as_flow(predictor), z)
    for state, jacobian in zip(z, jacobians, strict=True):
        reference = torch.autograd.functional.jacobian(lambda x: predictor(x), state)
        assert torch.allclose(jacobian, reference, rtol=0, atol=1e-12)


def test_a_float64_learned_hamiltonian_is_reversible_and_symplectic_to_rounding():
    predictor = hamiltonian()
    flow = as_flow(predictor)
    assert reversibility_error(flow, states()) < 1e-12
    assert symplecticity_defect(flow, states(2)) < 1e-10
    assert (predictor(states()) - states()).abs().max() > 0.1  # the flow moves the states: not vacuous


@pytest.mark.parametrize("make_flow", [lambda: as_flow(mlp_ablation()), lambda: euler_flow(hamiltonian())],
                         ids=["mlp_ablation", "euler"])
def test_the_mlp_ablation_and_an_euler_step_are_neither(make_flow):
    flow = make_flow()
    assert reversibility_error(flow, states()) > 1e-4
    assert symplecticity_defect(flow, states(2)) > 1e-3


def test_leapfrog_energy_drift_is_second_order_in_dt_and_below_euler():
    z = states()
    # over a fixed time (0.2): halving dt quarters leapfrog's energy error; Euler's is first order and larger
    energy = hamiltonian().energy
    drift = {dt: theory.energy_drift(as_flow(hamiltonian(steps, dt)), energy, z)
             for steps, dt in ((10, 0.02), (20, 0.01))}
    assert drift[0.01] / drift[0.02] == pytest.approx(0.25, rel=0.1)
    euler_drift = theory.energy_drift(euler_flow(hamiltonian(), dt=0.02, steps=10), energy, z)
    assert euler_drift > 10 * drift[0.02]


def test_flow_geometry_runs_a_float32_predictor_in_float64_and_leaves_it_alone():
    predictor = hamiltonian(dtype=torch.float32)
    out = flow_geometry(predictor, states().float())
    assert set(out) == {names.FLOW_REVERSIBILITY, names.FLOW_SYMPLECTICITY, names.FLOW_ENERGY_DRIFT}
    assert out[names.FLOW_REVERSIBILITY] < 1e-12 and out[names.FLOW_SYMPLECTICITY] < 1e-10
    assert 0 < out[names.FLOW_ENERGY_DRIFT] < 0.1
    assert next(predictor.parameters()).dtype == torch.float32  # a copy was converted, not the model
    ablation = flow_geometry(mlp_ablation().float(), states().float())
    assert set(ablation) == {names.FLOW_REVERSIBILITY, names.FLOW_SYMPLECTICITY}  # no energy to conserve
    assert ablation[names.FLOW_REVERSIBILITY] > 1e-4 and ablation[names.FLOW_SYMPLECTICITY] > 1e-3


def test_final_metrics_per_method():
    probes = [_probe(torch.randn(40, 2 * D if r == "qp" else D), seed=i) for i, r in enumerate(("q", "p", "qp"))]
    hamjepa = theory.final_metrics("hamjepa", hamiltonian(dtype=torch.float32), states().float(), probes)
    assert set(hamjepa) == {names.theory(k, r) for k in names.THEORY for r in "q p qp".split()} | set(names.FLOW)
    sigreg = theory.final_metrics("sigreg", None, states().float(), [probes[2], probes[0], probes[1]])
    assert sigreg[names.theory("rho_probe", "qp")] == pytest.approx(hamjepa[names.theory("rho_probe", "qp")])
    assert not any(key.startswith("flow_") for key in sigreg)
    assert all(names.is_ours(key) for key in hamjepa)  # a study forwards them to MLflow


# -- wiring: a run's last evaluation ---------------------------------------------------------------------

@pytest.mark.parametrize("method", ["hamjepa", "sigreg"])
def test_the_last_evaluation_of_a_run_reports_the_theory_check(method):
    """training's end-of-run evaluation, without Ray, at the smoke size: the probes it trains are measured."""
    from conftest import tiny_config

    from hamjepa.data.splits import load_splits
    from hamjepa.method.model import JEPAModel
    from hamjepa.train.loop import _evaluate_epoch

    cfg = tiny_config(method=method, **{"data.subset": 300, "eval.probe_epochs": 1})
    splits = load_splits(cfg.data, channels=cfg.encoder.in_channels)
    splits = dataclasses.replace(splits, test=splits.test.subset(torch.arange(60)))  # not all 10,000
    model = JEPAModel(cfg)
    views = splits.normalise()(splits.train.load(torch.arange(16)))
    metrics = _evaluate_epoch(model, views, splits, cfg, torch.device("cpu"), final=True)
    for readout in names.readouts(method):
        state_dim = model.state_dim if readout == "qp" else model.q_dim
        assert 1.0 <= metrics[names.theory("rho_probe", readout)] <= state_dim
        assert metrics[names.theory("entropy_gap", readout)] > 0
        assert metrics[names.theory("entropy_gap_iso", readout)] > 0
    flow = {key: value for key, value in metrics.items() if key in names.FLOW}
    if method == "sigreg":
        assert flow == {}
    else:
        assert set(flow) == set(names.FLOW)
        assert flow[names.FLOW_REVERSIBILITY] < 1e-12 and flow[names.FLOW_SYMPLECTICITY] < 1e-10
