"""Predictor construction, the matched MLP ablation, schedules."""

import pytest
import torch

from hamjepa.config import PredictorConfig
from hamjepa.method.predictors import (
    HamiltonianPredictor,
    ResidualMLPPredictor,
    build_predictor,
    hamiltonian_parameter_count,
    horizon_steps_at,
    matched_mlp_hidden_dim,
    residual_scale_at,
)
from hamjepa.methods import spec


def test_potential_mlp_is_the_documented_sequential():
    predictor = HamiltonianPredictor(64, hidden_dim=32, depth=2)
    kinds = [type(m).__name__ for m in predictor.potential_mlp]
    assert kinds == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert predictor.potential_mlp[-1].out_features == 1
    assert parameter_count(predictor) == hamiltonian_parameter_count(64, 32, 2)


@pytest.mark.parametrize("q_dim,hidden,depth", [(1024, 256, 2), (784, 256, 2), (392, 256, 2), (64, 32, 3)])
def test_matched_mlp_parameter_count_within_5_percent(q_dim, hidden, depth):
    hamiltonian = parameter_count(HamiltonianPredictor(q_dim, hidden_dim=hidden, depth=depth))
    config = PredictorConfig(hidden_dim=hidden, depth=depth)
    mlp = build_predictor(config, q_dim, spec("mlp").predictor)
    assert isinstance(mlp, ResidualMLPPredictor)
    assert mlp.mlp[0].out_features == matched_mlp_hidden_dim(q_dim, hidden, depth)
    assert abs(parameter_count(mlp) - hamiltonian) / hamiltonian < 0.05


def test_mlp_predictor_starts_as_identity_and_uses_direction():
    mlp = ResidualMLPPredictor(16, hidden_dim=8, steps=2)
    z = torch.randn(5, 16)
    torch.testing.assert_close(mlp(z), z)
    torch.nn.init.normal_(mlp.mlp[-1].weight)
    assert not torch.allclose(mlp(z, 1), mlp(z, -1))


def test_build_predictor_per_method():
    config = PredictorConfig()
    assert isinstance(build_predictor(config, 32, spec("hamjepa").predictor), HamiltonianPredictor)
    assert build_predictor(config, 32, spec("sigreg").predictor) is None


@pytest.mark.parametrize("kwargs,field", [({"dt": 0.0}, "dt"), ({"steps": 0}, "steps"), ({"depth": 0}, "depth"),
                                          ({"gradient": "numeric"}, "gradient")])
def test_predictor_refuses_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        HamiltonianPredictor(8, **kwargs)


def test_residual_scale_warmup():
    config = PredictorConfig(residual_scale=0.02, residual_scale_warmup_epochs=10)
    assert residual_scale_at(config, 1) == pytest.approx(0.002)
    assert residual_scale_at(config, 5) == pytest.approx(0.01)
    assert residual_scale_at(config, 10) == pytest.approx(0.02)
    assert residual_scale_at(config, 30) == pytest.approx(0.02)
    assert residual_scale_at(PredictorConfig(residual_scale_warmup_epochs=0), 1) == pytest.approx(0.02)


def test_horizon_curriculum():
    config = PredictorConfig(steps=4, curriculum_epochs=9)
    assert [horizon_steps_at(config, e) for e in range(1, 12)] == [1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert horizon_steps_at(PredictorConfig(steps=3), 1) == 3  # curriculum off


def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())
