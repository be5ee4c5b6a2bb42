"""The theory check: the quantities inside the probe's range on cases with known answers, the probe's Gauss-Newton
geometry on held-out features, the flow's geometry, and a run's last evaluation."""

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
    flow_geometry,
    flow_jacobians,
    probe_curvature,
    probe_geometry,
    readout_geometry,
    reversibility_error,
    symplecticity_defect,
)
from hamjepa.method.predictors import HamiltonianPredictor, ResidualMLPPredictor

D = 8


def random_spd(d, seed, spread=1.0):
    """A random SPD matrix with eigenvalues exp(spread * N(0, 1)) in a random basis."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    eigenvalues = torch.exp(spread * torch.randn(d, generator=generator, dtype=torch.float64))
    return basis @ torch.diag(eigenvalues) @ basis.T


# -- the quantities, on synthetic cases with known answers ------------------------------------------------

K = 3  # the probe's range: C - 1 for C = 4 classes


def range_geometry(d=D, k=K, seed=0, spread=1.0):
    """H of rank k in D dimensions (a probe's curvature), its top-k eigenvectors U (D, k) and eigenvalues (k,)."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    values = torch.exp(spread * torch.randn(k, generator=generator, dtype=torch.float64))
    u = basis[:, :k]
    return u @ torch.diag(values) @ u.T, u, values


def test_range_rho_of_a_multiple_of_a_rank_k_projector_is_one():
    _, u, _ = range_geometry()
    assert theory.range_rho(4.2 * u @ u.T, K) == pytest.approx(1.0, abs=1e-12)


def test_range_rho_is_k_max_over_the_top_k_sum_and_lies_in_one_to_k():
    h, _, values = range_geometry(spread=2.0)
    assert theory.range_rho(h, K) == pytest.approx(K * values.max().item() / values.sum().item(), rel=1e-10)
    assert 1.0 < theory.range_rho(h, K) < K
    assert theory.range_rho(7.5 * h, K) == pytest.approx(theory.range_rho(h, K), rel=1e-12)  # scale-free


def test_range_rho_refuses_a_range_with_a_zero_eigenvalue():
    h, _, _ = range_geometry()
    with pytest.raises(ValueError, match="positive"):
        theory.range_rho(h, K + 1)  # H has rank K


def test_the_gap_vanishes_when_the_within_class_spread_is_proportional_to_h_inverse_in_the_range():
    h, u, values = range_geometry()
    outside = torch.eye(D, dtype=torch.float64) - u @ u.T
    sigma = 0.37 * u @ torch.diag(1.0 / values) @ u.T + 5.0 * outside  # anything outside the range
    assert abs(theory.range_entropy_gap(sigma, h, K)) < 1e-9


def test_an_isotropic_spread_gives_the_am_gm_gap_of_the_top_k_eigenvalues():
    h, _, values = range_geometry(spread=1.5)
    expected = K * math.log(values.mean().item()) - values.log().sum().item()  # k log(AM / GM)
    assert theory.range_entropy_gap(torch.eye(D, dtype=torch.float64), h, K) == pytest.approx(expected, rel=1e-10)
    assert expected > 0.1  # not vacuous


def test_the_gap_ignores_the_scale_of_either_matrix_and_is_positive_elsewhere():
    h, _, _ = range_geometry()
    sigma = random_spd(D, 5)
    gap = theory.range_entropy_gap(sigma, h, K)
    assert gap > 1e-3
    for a, b in ((3.0, 1.0), (1.0, 0.01), (40.0, 7.0)):
        assert theory.range_entropy_gap(a * sigma, b * h, K) == pytest.approx(gap, rel=1e-10)


def test_the_gap_refuses_a_spread_singular_in_the_range_and_mismatched_shapes():
    h, u, _ = range_geometry()
    flat = torch.eye(D, dtype=torch.float64) - u[:, :1] @ u[:, :1].T  # no variance along the top direction
    with pytest.raises(ValueError, match="singular"):
        theory.range_entropy_gap(flat, h, K)
    with pytest.raises(ValueError, match="same shape"):
        theory.range_entropy_gap(torch.eye(3), torch.eye(4), 1)


def reference_within_class(x, y):
    """Per class, numpy's covariance times (n_c - 1), summed, over N - C: written independently."""
    import numpy as np

    x, y = x.numpy(), y.numpy()
    scatter = sum(np.cov(x[y == c].T, ddof=1) * ((y == c).sum() - 1) for c in np.unique(y))
    return torch.from_numpy(scatter / (len(x) - len(np.unique(y))))


def test_within_class_covariance_against_numpy():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(90, 5, generator=generator, dtype=torch.float64) * 2 + 1
    y = torch.randint(0, 4, (90,), generator=generator)
    assert torch.allclose(theory.within_class_covariance(x, y), reference_within_class(x, y), atol=1e-12)
    with pytest.raises(ValueError, match="degrees of freedom"):
        theory.within_class_covariance(x[:3], torch.arange(3))


def test_class_signal_along_the_probes_directions_leaves_the_within_class_gap_unchanged():
    """Shifting every class mean further apart along the range (more between-class variance, the same within-class
    spread) does not move the primary gap; the total-covariance gap does move (which is why it is secondary)."""
    h, u, _ = range_geometry()
    generator = torch.Generator().manual_seed(4)
    labels = torch.arange(400) % (K + 1)
    means = torch.randn(K + 1, K, generator=generator, dtype=torch.float64)
    noise = torch.randn(400, D, generator=generator, dtype=torch.float64) @ torch.diag(torch.linspace(0.5, 2, D,
                                                                                                       dtype=torch.float64))
    weak, strong = (noise + scale * means[labels] @ u.T for scale in (1.0, 3.0))
    within = [theory.range_entropy_gap(theory.within_class_covariance(x, labels), h, K) for x in (weak, strong)]
    total = [theory.range_entropy_gap(theory.covariance(x), h, K) for x in (weak, strong)]
    assert within[0] == pytest.approx(within[1], rel=1e-10)
    assert abs(total[0] - total[1]) > 1e-2


def test_the_signal_fraction_is_the_share_of_variance_in_the_range():
    h, u, _ = range_geometry()
    sigma = torch.diag(torch.arange(1, D + 1, dtype=torch.float64))
    expected = (u.T @ sigma @ u).trace() / sigma.trace()
    assert theory.range_fraction(sigma, h, K) == pytest.approx(expected.item(), rel=1e-12)
    assert theory.range_fraction(u @ u.T, h, K) == pytest.approx(1.0, rel=1e-12)


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


def _probe(features, classes=3, seed=0, labels=None):
    """A LayerNorm + Linear probe with non-trivial affine parameters, as linear_probe builds it, held out on
    `features` with `labels` (default: cycling through the classes)."""
    generator = torch.Generator().manual_seed(seed)
    dim = features.shape[1]
    norm, linear = nn.LayerNorm(dim), nn.Linear(dim, classes)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.3 * torch.rand(dim, generator=generator))
        norm.bias.copy_(0.1 * torch.randn(dim, generator=generator))
        linear.weight.copy_(torch.randn(classes, dim, generator=generator))
        linear.bias.copy_(torch.randn(classes, generator=generator))
    labels = torch.arange(len(features)) % classes if labels is None else labels
    return TrainedProbe(norm, linear, (features, labels))


def test_probe_geometry_measures_the_held_out_input_the_linear_layer_reads():
    features = torch.randn(400, 6) * torch.tensor([3.0, 1.0, 1.0, 0.5, 0.5, 0.2]) + 2.0
    probe = _probe(features)
    labels = probe.held_out[1]
    out = probe_geometry(probe)
    assert set(out) == set(names.THEORY)
    with torch.no_grad():  # the reference: the probe's own float32 LayerNorm, then the definitions
        u = probe.norm(features).double()
        weight, bias = probe.linear.weight.double(), probe.linear.bias.double()
    h = probe_curvature(u, weight, bias)
    k = 2  # 3 classes
    assert out["rho"] == pytest.approx(theory.range_rho(h, k), rel=1e-5)
    assert out["gap_within"] == pytest.approx(theory.range_entropy_gap(reference_within_class(u, labels), h, k),
                                              rel=1e-5)
    assert out["gap_total"] == pytest.approx(theory.range_entropy_gap(covariance(u), h, k), rel=1e-5)
    assert 0 < out["signal_fraction"] < 1 and 1.0 <= out["rho"] <= k and out["gap_within"] > 0


def test_probe_geometry_is_undefined_without_held_out_samples_or_signal():
    assert all(math.isnan(v) for v in probe_geometry(_probe(torch.randn(3, 4))).values())
    no_held_out = _probe(torch.randn(20, 4))
    no_held_out = TrainedProbe(no_held_out.norm, no_held_out.linear, None)
    assert all(math.isnan(v) for v in probe_geometry(no_held_out).values())
    dead = _probe(torch.randn(20, 4))
    dead.linear.weight.data.zero_()
    assert all(math.isnan(v) for v in probe_geometry(dead).values())


def test_readout_geometry_names_every_readout_and_wants_one_probe_each():
    probes = [_probe(torch.randn(50, 4), seed=s) for s in range(3)]
    out = readout_geometry(("q", "p", "qp"), probes)
    assert sorted(out) == sorted(names.theory(kind, r) for kind in names.THEORY for r in ("q", "p", "qp"))
    assert out["theory_rho_p"] == pytest.approx(probe_geometry(probes[1])["rho"])
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
    assert sigreg[names.theory("rho", "qp")] == pytest.approx(hamjepa[names.theory("rho", "qp")])
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
        classes = splits.num_classes
        assert 1.0 <= metrics[names.theory("rho", readout)] <= classes - 1  # inside the probe's range
        assert metrics[names.theory("gap_within", readout)] > 0 and metrics[names.theory("gap_total", readout)] > 0
        assert 0 < metrics[names.theory("signal_fraction", readout)] < 1
    flow = {key: value for key, value in metrics.items() if key in names.FLOW}
    if method == "sigreg":
        assert flow == {}
    else:
        assert set(flow) == set(names.FLOW)
        assert flow[names.FLOW_REVERSIBILITY] < 1e-12 and flow[names.FLOW_SYMPLECTICITY] < 1e-10
