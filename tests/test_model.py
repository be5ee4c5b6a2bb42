"""Whole methods: a few optimisation steps on a fixed batch lower each method's loss."""

import pytest
import torch

from hamjepa.config import profile
from hamjepa.method.model import JEPAModel


@pytest.mark.parametrize("method", ["hamjepa", "sigreg", "mlp"])
def test_a_few_steps_lower_the_loss(method):
    cfg = profile("quick", {"method": method, "encoder.width": 0.125, "predictor.residual_scale_warmup_epochs": 0})
    torch.manual_seed(0)
    model = JEPAModel(cfg)
    model.set_epoch(1)
    x = torch.randn(32, 1, 28, 28)
    view_a, view_b = x + 0.3 * torch.randn_like(x), x + 0.3 * torch.randn_like(x)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss, stats = model(view_a, view_b, step=0)  # step 0: the same projections/directions every step
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0]
    assert stats["loss"].item() == pytest.approx(losses[-1])


def test_spectral_projection_fits_the_batch():
    cfg = profile("quick", {"encoder.width": 0.125})
    model = JEPAModel(cfg)
    x = torch.randn(16, 1, 28, 28)
    _, stats = model(x, x + 0.1 * torch.randn_like(x), step=0)
    # k = min(128, d, B - 1) = 15: no projected direction is empty, so logdet/k stays moderate
    assert stats["q_logdet_per_dim"].item() > -6.0


def test_one_seed_gives_both_methods_the_same_encoder_at_initialisation():
    """Paired seeds (a study's confirmation): HamJEPA and SIGReg on seed s start from the same encoder."""
    from hamjepa.config import Config

    cfg = Config().override({"encoder.width": 0.125, "seed": 3})
    encoders = {}
    for method in ("hamjepa", "sigreg"):
        torch.manual_seed(cfg.seed)  # as the training loop does before building the model
        encoders[method] = JEPAModel(cfg.override({"method": method})).encoder.state_dict()
    assert encoders["hamjepa"].keys() == encoders["sigreg"].keys()
    for key, value in encoders["hamjepa"].items():
        assert torch.equal(value, encoders["sigreg"][key]), key
