"""Invariants of the leapfrog flow: symplecticity, reversibility, energy behaviour, closed-form grad V."""

import math

import pytest
import torch
from conftest import euler

from hamjepa.method.dynamics import gelu_and_derivative, leapfrog
from hamjepa.method.predictors import HamiltonianPredictor

D = 8


def gelu_derivative(x):
    """d/dx GELU(x) of the exact (erf) GELU, written independently: Phi(x) + x * phi(x)."""
    return 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def make_predictor(gradient="closed_form", residual_scale=1.0, steps=3, dt=0.1):
    # A strongly non-quadratic potential (s = 1), so the invariants are not just the harmonic oscillator's.
    torch.manual_seed(1)
    predictor = HamiltonianPredictor(D, hidden_dim=16, depth=2, residual_scale=residual_scale, base_coeff=0.1,
                                     steps=steps, dt=dt, gradient=gradient).double()
    for param in predictor.parameters():  # larger weights: a visibly curved phi
        param.data.mul_(3.0)
    return predictor


def omega(d):
    eye, zero = torch.eye(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
    return torch.cat([torch.cat([zero, eye], 1), torch.cat([-eye, zero], 1)], 0)


@pytest.mark.parametrize("gradient", ["closed_form", "autograd"])
def test_leapfrog_is_symplectic(gradient):
    predictor = make_predictor(gradient)
    z = torch.randn(2 * D, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda x: predictor(x), z)  # (2D, 2D)
    defect = jacobian.T @ omega(D) @ jacobian - omega(D)
    assert defect.abs().max().item() < 1e-9
    # and the map is far from the identity, so the check is not vacuous
    assert (jacobian - torch.eye(2 * D, dtype=torch.float64)).abs().max().item() > 1e-2


def test_euler_is_not_symplectic():
    # Contrast: the same potential under explicit Euler breaks J^T Omega J = Omega by orders of magnitude.
    predictor = make_predictor()
    z = torch.randn(2 * D, dtype=torch.float64)

    def euler_map(x):
        q, p = euler(x[:D], x[D:], predictor.grad_potential, 0.1, 3)
        return torch.cat([q, p])

    jacobian = torch.autograd.functional.jacobian(euler_map, z)
    assert (jacobian.T @ omega(D) @ jacobian - omega(D)).abs().max().item() > 1e-3


def test_leapfrog_is_reversible():
    predictor = make_predictor()
    z = torch.randn(32, 2 * D, dtype=torch.float64)
    forward = predictor(z, direction=1)
    back = predictor(forward, direction=-1)
    assert (back - z).abs().max().item() < 1e-10
    assert (forward - z).abs().max().item() > 1e-2


def test_direction_tensor_batches_both_directions():
    predictor = make_predictor()
    z = torch.randn(6, 2 * D, dtype=torch.float64)
    direction = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0], dtype=torch.float64).unsqueeze(1)
    mixed = predictor(z, direction)
    torch.testing.assert_close(mixed[:3], predictor(z[:3], 1), rtol=0, atol=1e-14)
    torch.testing.assert_close(mixed[3:], predictor(z[3:], -1), rtol=0, atol=1e-14)


def test_bad_direction_is_refused():
    with pytest.raises(ValueError, match="direction"):
        make_predictor()(torch.zeros(1, 2 * D, dtype=torch.float64), direction=2)


def _relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_closed_form_grad_v_matches_autograd_values_and_gradients():
    predictor = make_predictor()
    q = torch.randn(16, D, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(16, D, dtype=torch.float64)  # a random linear functional of grad V

    closed = predictor.grad_potential(q)
    reference = predictor.autograd_grad_potential(q)
    assert _relative_error(closed, reference) < 1e-8

    params = [q, *predictor.parameters()]
    grads_closed = torch.autograd.grad((closed * weights).sum(), params)
    grads_reference = torch.autograd.grad((reference * weights).sum(), params)
    assert len(grads_closed) == 1 + 5  # q, 3 weights, 2 hidden biases
    for g_closed, g_reference in zip(grads_closed, grads_reference, strict=True):
        assert g_reference.abs().max() > 0
        assert _relative_error(g_closed, g_reference) < 1e-8


@pytest.mark.parametrize("direction", [1, -1])
def test_closed_form_rollout_matches_the_textbook_reference(direction):
    """forward (closed-form grad V, steps + 1 evaluations) == reference_forward (autograd, 2 * steps)."""
    predictor = make_predictor(steps=3)
    z = torch.randn(8, 2 * D, dtype=torch.float64, requires_grad=True)
    fast, reference = predictor(z, direction), predictor.reference_forward(z, direction)
    assert _relative_error(fast, reference) < 1e-12
    used = [z, *predictor.parameters()]
    g_fast = torch.autograd.grad(fast.pow(2).sum(), used)
    g_reference = torch.autograd.grad(reference.pow(2).sum(), used)
    for a, b in zip(g_fast, g_reference, strict=True):
        assert b.abs().max() > 0
        assert _relative_error(a, b) < 1e-8


def test_gelu_and_derivative_backward_matches_autograd():
    a = torch.randn(50, dtype=torch.float64, requires_grad=True)
    value, slope = gelu_and_derivative(a)
    torch.testing.assert_close(value, torch.nn.functional.gelu(a))
    torch.testing.assert_close(slope, gelu_derivative(a))
    weights = torch.randn(2, 50, dtype=torch.float64)
    fused, = torch.autograd.grad((value * weights[0] + slope * weights[1]).sum(), a)
    plain, = torch.autograd.grad((torch.nn.functional.gelu(a) * weights[0] + gelu_derivative(a) * weights[1]).sum(), a)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)


def test_steps_share_gradient_evaluations():
    predictor = make_predictor(steps=4)
    calls = []
    original = predictor.grad_potential
    predictor.grad_potential = lambda q: calls.append(1) or original(q)
    predictor(torch.randn(3, 2 * D, dtype=torch.float64))
    assert len(calls) == 4 + 1


def _energy_error(integrator, dt, n_steps):
    # Quadratic V (s = 0): H = |p|^2/2 + alpha |q|^2/2 with alpha = 1, a harmonic oscillator.
    predictor = HamiltonianPredictor(D, hidden_dim=4, residual_scale=0.0, base_coeff=1.0).double()
    z = torch.randn(64, 2 * D, dtype=torch.float64)
    q, p = z[:, :D], z[:, D:]
    energy0 = predictor.energy(z)
    worst = 0.0
    for _ in range(n_steps // 10):
        q, p = integrator(q, p, predictor.grad_potential, dt, 10)
        error = ((predictor.energy(torch.cat([q, p], 1)) - energy0).abs() / energy0).max().item()
        worst = max(worst, error)
    return worst, error


def test_leapfrog_energy_stays_bounded_while_euler_grows():
    leap_worst, leap_final = _energy_error(leapfrog, 0.1, 1000)
    euler_worst, euler_final = _energy_error(euler, 0.1, 1000)
    assert leap_worst < 0.01  # bounded at O(dt^2) for all 1,000 steps, no drift
    assert euler_final > 100.0  # grows like (1 + dt^2)^n = 2e4
    # leapfrog's energy error is second order: halving dt quarters it
    half_worst, _ = _energy_error(leapfrog, 0.05, 2000)
    assert 3.0 < leap_worst / half_worst < 5.0


def test_integration_precision():
    predictor = HamiltonianPredictor(D, hidden_dim=16)
    z = torch.randn(4, 2 * D)
    assert predictor(z.bfloat16()).dtype == torch.float32  # bf16 is upcast for the flow
    assert predictor(z).dtype == torch.float32
    assert predictor.double()(z.double()).dtype == torch.float64  # float64 stays float64


def test_residual_scale_and_steps_are_plain_mutable_attributes():
    predictor = make_predictor()
    z = torch.randn(4, 2 * D, dtype=torch.float64)
    predictor.residual_scale = 0.0
    predictor.steps = 1
    q, p = z[:, :D], z[:, D:]
    # with s = 0 one step is the exact leapfrog of the quadratic well
    p_half = p - 0.05 * 0.1 * q
    q_next = q + 0.1 * p_half
    p_next = p_half - 0.05 * 0.1 * q_next
    torch.testing.assert_close(predictor(z), torch.cat([q_next, p_next], 1), rtol=0, atol=1e-14)
