"""The picture of a learned flow: the principal plane, the step-by-step rollout, the PNG, and its way to MLflow."""

import torch

from hamjepa.config import profile
from hamjepa.evaluation import flow_picture
from hamjepa.method.model import JEPAModel
from hamjepa.method.predictors import HamiltonianPredictor
from hamjepa.train import checkpoints
from hamjepa.train.encoder_artifact import PLOTS_DIR, log_run_artifacts
from hamjepa.train.loop import FLOW_PICTURE, _training_state

PNG = b"\x89PNG\r\n\x1a\n"


def _predictor(steps=2):
    torch.manual_seed(0)
    return HamiltonianPredictor(4, hidden_dim=8, depth=2, residual_scale=1.0, steps=steps, dt=0.1).double()


def test_the_principal_plane_is_the_states_top_two_directions():
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(500, 5, generator=generator, dtype=torch.float64) * torch.tensor([0.1, 5.0, 0.2, 2.0, 0.1],
                                                                                      dtype=torch.float64)
    mean, plane = flow_picture.principal_plane(q + 3.0)
    assert torch.allclose(mean, q.mean(0) + 3.0)
    assert torch.allclose(plane.abs().argmax(0), torch.tensor([1, 3]))  # the two widest axes, widest first
    assert torch.allclose(plane.T @ plane, torch.eye(2, dtype=torch.float64), atol=1e-12)


def test_the_rollout_one_step_at_a_time_is_the_trained_k_step_flow():
    predictor = _predictor(steps=3)
    z = torch.randn(5, 8, dtype=torch.float64)
    path = flow_picture.rollout(predictor, z, 3)
    assert path.shape == (4, 5, 8) and torch.equal(path[0], z)
    assert torch.allclose(path[-1], predictor(z, 1), atol=1e-12)  # K single leapfrog steps = the K-step flow
    assert predictor.steps == 3  # the model itself is left alone


def test_the_picture_is_a_png():
    png = flow_picture.draw(_predictor().float(), torch.randn(64, 8))
    assert png.startswith(PNG) and len(png) > 10_000


class _Logger:
    def __init__(self):
        self.artifacts, self.tags = [], {}

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_artifact(self, path, folder):
        with open(path, "rb") as stream:
            self.artifacts.append((folder, path.rsplit("/", 1)[-1], stream.read()))


def test_a_finished_runs_pictures_travel_in_its_checkpoint_to_mlflow(tmp_path):
    cfg = profile("quick", {"encoder.width": 0.125})
    model = JEPAModel(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    png = flow_picture.draw(model.predictor, torch.randn(32, model.state_dim))
    state = _training_state(model, optimizer, scheduler, 8, cfg, [], {FLOW_PICTURE: png})
    folder = tmp_path / "run" / f"{checkpoints.FOLDER_PREFIX}000001"
    folder.mkdir(parents=True)
    checkpoints.write(str(folder), state)
    logger = _Logger()
    assert log_run_artifacts(logger, str(tmp_path / "run"), cfg, encoder=False) is None
    assert logger.artifacts == [(PLOTS_DIR, FLOW_PICTURE, png)]  # byte for byte, and no encoder when not asked
    logger = _Logger()
    log_run_artifacts(logger, str(tmp_path / "run"), cfg)
    assert [(folder, name) for folder, name, _ in logger.artifacts] == [(PLOTS_DIR, FLOW_PICTURE), ("model",
                                                                                                    "encoder.pt")]
