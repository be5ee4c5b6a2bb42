"""Data parallelism: every batch statistic and loss on 2 workers x B/2 equals the 1-process value on B."""


import pytest
import torch
from conftest import on_gloo_workers

from hamjepa.config import HamJEPALossConfig, SIGRegConfig
from hamjepa.method.objectives import hamjepa_objective, random_orthonormal, sigreg_directions, sigreg_objective
from hamjepa.method.predictors import HamiltonianPredictor

N, Q_DIM, WORLD = 64, 12, 2


def make_inputs():
    generator = torch.Generator().manual_seed(0)
    # anisotropic, shifted, small-variance states, so every floor and penalty is active
    scale = torch.linspace(0.05, 1.5, 2 * Q_DIM, dtype=torch.float64)
    z_a = torch.randn(N, 2 * Q_DIM, generator=generator, dtype=torch.float64) * scale + 0.3
    z_b = z_a + 0.1 * torch.randn(N, 2 * Q_DIM, generator=generator, dtype=torch.float64)
    return z_a, z_b


def losses_and_grads(rows: slice) -> dict[str, torch.Tensor]:
    """Both objectives on rows of the fixed batch; returns stats, losses and input gradients."""
    z_a, z_b = (z[rows].clone().requires_grad_(True) for z in make_inputs())
    torch.manual_seed(1)
    predictor = HamiltonianPredictor(Q_DIM, hidden_dim=8, residual_scale=0.5).double()
    n = z_a.shape[0]
    pred = predictor(torch.cat([z_a, z_b]), torch.cat([torch.ones(n, 1), -torch.ones(n, 1)]).double())
    projection = random_orthonormal(Q_DIM, 8, seed=0, dtype=torch.float64)
    loss, stats = hamjepa_objective(z_a, z_b, pred[:n], pred[n:], HamJEPALossConfig(), projection, projection)
    grads = torch.autograd.grad(loss, [z_a, z_b, *predictor.parameters()], allow_unused=True)
    out = {f"hamjepa/{k}": v for k, v in stats.items()}
    out.update({"hamjepa/grad_z_a": grads[0], "hamjepa/grad_z_b": grads[1],
                "hamjepa/grad_phi_w0": grads[2]})

    directions = sigreg_directions(2 * Q_DIM, 16, seed=3, step=11).double()
    loss, stats = sigreg_objective(torch.stack([z_a, z_b]), directions, SIGRegConfig())
    grad_a, = torch.autograd.grad(loss, [z_a])
    out.update({f"sigreg/{k}": v for k, v in stats.items()})
    out["sigreg/grad_z_a"] = grad_a
    return out


def _shard(rank: int) -> dict[str, torch.Tensor]:
    shard = N // WORLD
    return losses_and_grads(slice(rank * shard, (rank + 1) * shard))


@pytest.fixture(scope="module")
def shards():
    return on_gloo_workers(_shard, WORLD)


def test_every_statistic_and_loss_equals_single_process(shards):
    single = losses_and_grads(slice(0, N))
    scalars = [k for k, v in single.items() if v.ndim == 0]
    assert len(scalars) >= 20  # losses, energies, floors' stats of q and p, SIGReg terms
    for key in scalars:
        for rank in range(WORLD):
            assert shards[rank][key].item() == pytest.approx(single[key].item(), rel=1e-5, abs=1e-8), key
    # the penalties are active, so the equality is not between zeros
    assert single["hamjepa/loss_var"] > 0 and single["hamjepa/loss_spectral"] > 0 and single["hamjepa/loss_mean"] > 0


def test_gradients_equal_single_process_after_ddp_averaging(shards):
    """Each worker's local rows get W x the global gradient; DDP's mean over W workers makes it exact."""
    single = losses_and_grads(slice(0, N))
    shard = N // WORLD
    for key in ("hamjepa/grad_z_a", "hamjepa/grad_z_b", "sigreg/grad_z_a"):
        for rank in range(WORLD):
            local = shards[rank][key] / WORLD
            torch.testing.assert_close(local, single[key][rank * shard:(rank + 1) * shard], rtol=1e-5, atol=1e-10)
    # a parameter's gradient: the mean over workers (what DDP computes) equals the single-process one
    averaged = sum(shards[r]["hamjepa/grad_phi_w0"] for r in range(WORLD)) / WORLD
    torch.testing.assert_close(averaged, single["hamjepa/grad_phi_w0"], rtol=1e-5, atol=1e-10)
