"""Separable Hamiltonian dynamics: the potential, its gradient, and the leapfrog integrator.

H(q, p) = 1/2 |p|^2 + V(q),   V(q) = alpha/2 |q|^2 + s * phi(q),   phi: a GELU MLP d -> h -> ... -> 1.

Leapfrog (velocity Verlet) with step dt:
    p_half = p - dt/2 grad V(q);   q' = q + dt p_half;   p' = p_half - dt/2 grad V(q').
The map is symplectic and time-reversible for any V; integrating backwards is the same map with -dt.
Consecutive steps share one grad V evaluation (the end of step k is the start of step k+1), so K steps
cost K + 1 evaluations, not 2K.

grad V must stay differentiable w.r.t. q (hence the encoder) and phi's weights, because training
back-propagates through the rollout. Autograd with create_graph=True does that with a double backward;
`gelu_mlp_input_grad` computes the same gradient in closed form during the forward pass, so ordinary
autograd differentiates the whole rollout once.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

GradFn = Callable[[torch.Tensor], torch.Tensor]

_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _normal_cdf_pdf(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return 0.5 * (1.0 + torch.erf(x * _INV_SQRT_2)), torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


class _GeluAndDerivative(torch.autograd.Function):
    """(GELU(a), GELU'(a)) in one pass, with a fused first-order backward.

    Written as one autograd node because the closed-form grad V needs both at every hidden layer;
    composing them from erf/exp primitives costs ~20 small elementwise kernels and their backward.
    GELU'' (a) = pdf(a) (2 - a^2).
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cdf, pdf = _normal_cdf_pdf(a)
        ctx.save_for_backward(a, cdf, pdf)
        return a * cdf, cdf + a * pdf

    @staticmethod
    def backward(ctx, grad_value: torch.Tensor, grad_slope: torch.Tensor) -> torch.Tensor:
        a, cdf, pdf = ctx.saved_tensors
        grad = grad_value * (cdf + a * pdf) if grad_value is not None else 0.0
        if grad_slope is not None:
            grad = grad + grad_slope * pdf * (2.0 - a * a)
        return grad


def gelu_and_derivative(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(GELU(a), GELU'(a)); differentiable once (enough for training through grad V)."""
    return _GeluAndDerivative.apply(a)


def gelu_mlp(depth: int, in_dim: int, hidden_dim: int) -> nn.Sequential:
    """phi: Linear/GELU pairs, `depth` hidden layers of width `hidden_dim`, then Linear(hidden, 1).

    The output layer has no bias: a constant added to V changes no force, so its bias would be a dead
    parameter (and one that DistributedDataParallel reports as unused, since grad V never touches it).
    """
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(depth):
        layers += [nn.Linear(width, hidden_dim), nn.GELU()]
        width = hidden_dim
    layers.append(nn.Linear(width, 1, bias=False))
    return nn.Sequential(*layers)


def _linears(mlp: nn.Sequential) -> list[nn.Linear]:
    return [m for m in mlp if isinstance(m, nn.Linear)]


def _weight(layer: nn.Linear, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    # Parameters follow the computation's dtype (float32 under bf16 autocast; float64 in exact tests).
    return layer.weight.to(dtype), None if layer.bias is None else layer.bias.to(dtype)


def gelu_mlp_value(mlp: nn.Sequential, q: torch.Tensor) -> torch.Tensor:
    """phi(q) of shape (...,) computed in q's dtype."""
    h = q
    linears = _linears(mlp)
    for layer in linears[:-1]:
        h = F.gelu(F.linear(h, *_weight(layer, q.dtype)))
    return F.linear(h, *_weight(linears[-1], q.dtype)).squeeze(-1)


def gelu_mlp_input_grad(mlp: nn.Sequential, q: torch.Tensor) -> torch.Tensor:
    """grad_q phi(q) in closed form, shape like q; differentiable by ordinary (first-order) autograd.

    For a_l = W_l h_{l-1} + b_l, h_l = GELU(a_l), phi = w_out . h_L + b_out, the chain rule gives
    g_L = w_out, g_{l-1} = (g_l * GELU'(a_l)) W_l, and grad phi = g_0: one forward and one backward
    sweep of matrix products, no graph of a graph.
    """
    linears = _linears(mlp)
    slopes = []
    h = q
    for layer in linears[:-1]:
        h, slope = gelu_and_derivative(F.linear(h, *_weight(layer, q.dtype)))  # (..., hidden) each
        slopes.append(slope)
    g = linears[-1].weight.to(q.dtype).squeeze(0)  # (hidden,)
    for layer, slope in zip(reversed(linears[:-1]), reversed(slopes), strict=True):
        g = (g * slope) @ layer.weight.to(q.dtype)  # (..., width of the layer's input)
    return g


def leapfrog(q: torch.Tensor, p: torch.Tensor, grad_v: GradFn, dt: float | torch.Tensor, steps: int,
             share_gradients: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`steps` leapfrog steps of size dt (a float, or a tensor broadcastable to q for per-sample signs).

    With share_gradients (the default) grad V is evaluated steps + 1 times: the closing half-kick of one
    step and the opening half-kick of the next use the same gradient. Without it, every step evaluates
    grad V twice (2 * steps), as the textbook form reads; the result is identical.
    """
    half = 0.5 * dt
    force = grad_v(q)
    for step in range(steps):
        if step > 0 and not share_gradients:
            force = grad_v(q)
        p = p - half * force
        q = q + dt * p
        force = grad_v(q)
        p = p - half * force
    return q, p
