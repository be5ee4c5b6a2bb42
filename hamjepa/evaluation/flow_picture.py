"""A picture of what a HamJEPA predictor learned: its potential V(q) over the plane of the two principal
directions of the trained q states, with leapfrog trajectories of real held-out states drawn on it, and their
energy along the rollout (docs/method.md §9, "The learned flow").

The plane goes through the states' mean; V is evaluated there with every other direction of q at the mean, so the
contours are a slice of V, not a projection. Trajectories are rolled out one leapfrog step at a time for
ROLLOUT_HORIZONS times the trained horizon (K steps of dt), so the picture shows the flow past the prediction it
was trained on. Everything in float64 on a copy of the predictor.
"""

from __future__ import annotations

import copy
import io

import torch
from torch import nn

TRAJECTORIES = 4
ROLLOUT_HORIZONS = 4
GRID = 60  # grid points per axis of the potential's contour plot
MARGIN = 0.25  # the plane's extent beyond the states, as a fraction of their range


def principal_plane(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (d,), the top-2 principal directions (d, 2)) of the states q (N, d)."""
    mean = q.mean(0)
    _, _, vh = torch.linalg.svd(q - mean, full_matrices=False)
    return mean, vh[:2].T


def rollout(predictor: nn.Module, z: torch.Tensor, steps: int) -> torch.Tensor:
    """States (steps + 1, n, 2d) of `steps` single leapfrog steps from z (n, 2d)."""
    single = copy.copy(predictor)
    single.steps = 1
    path = [z]
    for _ in range(steps):
        path.append(single(path[-1], 1))
    return torch.stack(path)


@torch.no_grad()
def draw(predictor: nn.Module, states: torch.Tensor) -> bytes:
    """The PNG of the learned potential and trajectories for a Hamiltonian predictor and held-out states (N, 2d)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exact = copy.deepcopy(predictor).double().requires_grad_(False).eval()
    z = states.detach().double().to(next(exact.parameters()).device)
    d = z.shape[1] // 2
    mean, plane = principal_plane(z[:, :d])
    coords = (z[:, :d] - mean) @ plane  # (N, 2)
    low, high = coords.min(0).values, coords.max(0).values
    pad = MARGIN * (high - low)
    a = torch.linspace(low[0] - pad[0], high[0] + pad[0], GRID, dtype=z.dtype, device=z.device)
    b = torch.linspace(low[1] - pad[1], high[1] + pad[1], GRID, dtype=z.dtype, device=z.device)
    grid_a, grid_b = torch.meshgrid(a, b, indexing="xy")  # (GRID, GRID)
    q_grid = mean + torch.stack([grid_a, grid_b], -1) @ plane.T  # (GRID, GRID, d)
    potential = exact.potential(q_grid)  # (GRID, GRID)
    path = rollout(exact, z[:TRAJECTORIES], ROLLOUT_HORIZONS * int(predictor.steps))  # (T + 1, n, 2d)
    path_coords = (path[..., :d] - mean) @ plane  # (T + 1, n, 2)
    energy = exact.energy(path)  # (T + 1, n)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    filled = left.contourf(grid_a.cpu(), grid_b.cpu(), potential.cpu(), levels=20, cmap="viridis")
    fig.colorbar(filled, ax=left, label="V(q)")
    left.scatter(coords[:, 0].cpu(), coords[:, 1].cpu(), s=3, color="white", alpha=0.4, label="held-out q")
    for i in range(path_coords.shape[1]):
        line = path_coords[:, i].cpu()
        left.plot(line[:, 0], line[:, 1], color="tab:red", linewidth=1.2)
        left.scatter(line[0, 0], line[0, 1], color="tab:red", s=16, marker="o")
        right.plot(range(len(energy)), energy[:, i].cpu(), label=f"state {i + 1}")
    left.set_xlabel("first principal direction of q")
    left.set_ylabel("second principal direction of q")
    left.set_title(f"V(q) on the states' principal plane; {path.shape[0] - 1} leapfrog steps", fontsize=9)
    right.axvline(int(predictor.steps), color="gray", linewidth=0.8, linestyle="--", label="trained horizon")
    right.set_xlabel("leapfrog step")
    right.set_ylabel("H(q, p) = |p|^2 / 2 + V(q)")
    right.set_title("energy along the rollout (leapfrog: bounded oscillation)", fontsize=9)
    right.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
