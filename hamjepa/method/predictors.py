"""Predictors that map one view's phase-space state to the other's.

- `HamiltonianPredictor`: the learned separable Hamiltonian flow of docs/method.md §2 (symplectic, reversible).
- `ResidualMLPPredictor`: the MLP-HJEPA ablation, a generic residual MLP rollout with a matched
  parameter count (non-symplectic).

Both take z = [q | p] of shape (..., 2 * q_dim) and a direction: +1 predicts forward in time, -1
backwards; a tensor of +-1 broadcastable to z[..., :1] mixes both in one batched call, so the
bidirectional loss needs one rollout, not two.
"""

from __future__ import annotations

import torch
from torch import nn

from hamjepa.config import PredictorConfig
from hamjepa.method.dynamics import gelu_mlp, gelu_mlp_input_grad, gelu_mlp_value, leapfrog
from hamjepa.methods import Predictor

Direction = int | float | torch.Tensor

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _integration_dtype(z: torch.Tensor) -> torch.dtype:
    """The integrator runs in the input's precision, but never below float32."""
    return torch.float32 if z.dtype in _LOW_PRECISION else z.dtype


def _check_direction(direction: Direction) -> None:
    if not isinstance(direction, torch.Tensor) and direction not in (1, -1):
        raise ValueError(f"direction = {direction!r} is invalid: must be +1 (forward), -1 (backward) or a tensor.")


class HamiltonianPredictor(nn.Module):
    """Leapfrog flow of H(q, p) = 1/2 |p|^2 + alpha/2 |q|^2 + s * phi(q) for `steps` steps of size `dt`.

    `residual_scale` (s) and `steps` are plain attributes so schedules can change them between steps.
    The potential MLP phi is `potential_mlp`, a Sequential of Linear/GELU layers ending in Linear(hidden, 1).
    """

    # The defaults and their rules are PredictorConfig's: one source (the config tree), checked by building one.
    def __init__(self, q_dim: int, hidden_dim: int = PredictorConfig.hidden_dim, depth: int = PredictorConfig.depth,
                 residual_scale: float = PredictorConfig.residual_scale, base_coeff: float = PredictorConfig.base_coeff,
                 steps: int = PredictorConfig.steps, dt: float = PredictorConfig.dt,
                 gradient: str = PredictorConfig.gradient):
        super().__init__()
        if int(q_dim) != q_dim or q_dim < 1:
            raise ValueError(f"HamiltonianPredictor q_dim = {q_dim!r} is invalid: must be an integer >= 1.")
        PredictorConfig(hidden_dim=hidden_dim, depth=depth, residual_scale=residual_scale, base_coeff=base_coeff,
                        steps=steps, dt=dt, gradient=gradient)
        self.q_dim = q_dim
        self.potential_mlp = gelu_mlp(depth, q_dim, hidden_dim)
        self.residual_scale = float(residual_scale)
        self.base_coeff = float(base_coeff)
        self.steps = int(steps)
        self.dt = float(dt)
        self.gradient = gradient

    def potential(self, q: torch.Tensor) -> torch.Tensor:
        """V(q), shape (...,)."""
        return 0.5 * self.base_coeff * (q * q).sum(-1) + self.residual_scale * gelu_mlp_value(self.potential_mlp, q)

    def grad_potential(self, q: torch.Tensor) -> torch.Tensor:
        """grad V(q) in closed form (or by autograd if configured so), shape like q."""
        if self.gradient == "autograd":
            return self.autograd_grad_potential(q)
        return self.base_coeff * q + self.residual_scale * gelu_mlp_input_grad(self.potential_mlp, q)

    def autograd_grad_potential(self, q: torch.Tensor) -> torch.Tensor:
        """The reference: autograd with create_graph=True, so training through it is a double backward."""
        with torch.enable_grad():
            q_in = q if q.requires_grad else q.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.potential(q_in).sum(), q_in, create_graph=True)
        return grad

    def energy(self, z: torch.Tensor) -> torch.Tensor:
        """H(q, p) = 1/2 |p|^2 + V(q), shape (...,)."""
        q, p = z[..., : self.q_dim], z[..., self.q_dim :]
        return 0.5 * (p * p).sum(-1) + self.potential(q)

    def forward(self, z: torch.Tensor, direction: Direction = 1) -> torch.Tensor:
        """Phi_{direction * dt}^steps(z); z (..., 2 * q_dim) -> (..., 2 * q_dim) in the integration dtype."""
        return self._rollout(z, direction, self.grad_potential, share_gradients=True)

    def reference_forward(self, z: torch.Tensor, direction: Direction = 1) -> torch.Tensor:
        """The textbook rollout: autograd grad V (a double backward in training) evaluated 2 * steps times.

        Mathematically identical to forward(); kept as the reference that tests and benchmarks compare with.
        """
        return self._rollout(z, direction, self.autograd_grad_potential, share_gradients=False)

    def _rollout(self, z: torch.Tensor, direction: Direction, grad_v, share_gradients: bool) -> torch.Tensor:
        _check_direction(direction)
        dtype = _integration_dtype(z)
        # Autocast off: under bf16 the MLP's matmuls would otherwise drop back to bf16 inside the flow.
        with torch.autocast(z.device.type, enabled=False):
            z = z.to(dtype)
            dt = self.dt * (direction.to(dtype) if isinstance(direction, torch.Tensor) else direction)
            q, p = leapfrog(z[..., : self.q_dim], z[..., self.q_dim :], grad_v, dt, self.steps, share_gradients)
        return torch.cat([q, p], dim=-1)


class ResidualMLPPredictor(nn.Module):
    """MLP-HJEPA: `steps` applications of z -> z + MLP([z, direction]) with one weight-tied MLP.

    The direction enters as an extra input so that one network serves both prediction directions, as
    the Hamiltonian flow does with the sign of dt. The last layer starts at zero so the rollout starts
    as the identity, like the Hamiltonian predictor whose learned term starts small.
    """

    def __init__(self, state_dim: int, hidden_dim: int, steps: int = 2):
        super().__init__()
        if hidden_dim < 1 or steps < 1:
            raise ValueError(f"ResidualMLPPredictor hidden_dim = {hidden_dim}, steps = {steps}: both must be >= 1.")
        self.mlp = nn.Sequential(nn.Linear(state_dim + 1, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, state_dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.steps = int(steps)

    def forward(self, z: torch.Tensor, direction: Direction = 1) -> torch.Tensor:
        _check_direction(direction)
        dtype = _integration_dtype(z)
        with torch.autocast(z.device.type, enabled=False):
            z = z.to(dtype)
            sign = direction.to(dtype) if isinstance(direction, torch.Tensor) else torch.tensor(float(direction))
            sign = sign.to(device=z.device, dtype=dtype).expand(*z.shape[:-1], 1)  # (..., 1)
            for _ in range(self.steps):
                z = z + self.mlp(torch.cat([z, sign], dim=-1).to(self.mlp[0].weight.dtype)).to(dtype)
        return z


def hamiltonian_parameter_count(q_dim: int, hidden_dim: int, depth: int) -> int:
    """Parameters of phi: d -> h (-> h)^(depth-1) -> 1, weights and biases (none on the output)."""
    return (q_dim + 1) * hidden_dim + (depth - 1) * (hidden_dim + 1) * hidden_dim + hidden_dim


def matched_mlp_hidden_dim(q_dim: int, hidden_dim: int, depth: int) -> int:
    """Hidden width h' of the residual MLP whose parameter count is nearest the Hamiltonian predictor's.

    The MLP (2d + 1 -> h' -> 2d) has (2d + 1) h' + h' + 2d h' + 2d = (4d + 2) h' + 2d parameters.
    """
    target = hamiltonian_parameter_count(q_dim, hidden_dim, depth)
    return max(1, round((target - 2 * q_dim) / (4 * q_dim + 2)))


def build_predictor(cfg: PredictorConfig, q_dim: int, kind: Predictor) -> nn.Module | None:
    """The predictor of a method's kind (methods.METHODS): Hamiltonian, matched residual MLP, or none."""
    if kind is Predictor.LEAPFROG:
        return HamiltonianPredictor(q_dim, hidden_dim=cfg.hidden_dim, depth=cfg.depth,
                                    residual_scale=cfg.residual_scale, base_coeff=cfg.base_coeff, steps=cfg.steps,
                                    dt=cfg.dt, gradient=cfg.gradient)
    if kind is Predictor.RESIDUAL_MLP:
        return ResidualMLPPredictor(2 * q_dim, matched_mlp_hidden_dim(q_dim, cfg.hidden_dim, cfg.depth), cfg.steps)
    return None


def residual_scale_at(cfg: PredictorConfig, epoch: int) -> float:
    """s(epoch) = s * min(1, epoch / warmup), epochs counted from 1; no warm-up when warmup is 0."""
    if cfg.residual_scale_warmup_epochs == 0:
        return cfg.residual_scale
    return cfg.residual_scale * min(1.0, epoch / cfg.residual_scale_warmup_epochs)


def horizon_steps_at(cfg: PredictorConfig, epoch: int) -> int:
    """Horizon curriculum: K rises linearly from 1 (epoch 1) to `steps` (epoch = curriculum_epochs)."""
    if cfg.curriculum_epochs == 0:
        return cfg.steps
    return min(cfg.steps, 1 + ((cfg.steps - 1) * epoch) // cfg.curriculum_epochs)


def apply_schedules(predictor: nn.Module | None, cfg: PredictorConfig, epoch: int) -> None:
    """Set the predictor's per-epoch knobs (residual-scale warm-up, horizon curriculum)."""
    if isinstance(predictor, HamiltonianPredictor):
        predictor.residual_scale = residual_scale_at(cfg, epoch)
    if predictor is not None:
        predictor.steps = horizon_steps_at(cfg, epoch)
