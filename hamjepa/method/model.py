"""The model of a method (`JEPAModel`) = encoder + predictor + objective: two augmented views in, (loss, stats) out.

Which predictor and objective a method has is methods.METHODS: HamJEPA (leapfrog, HamJEPA objective), the
MLP-HJEPA ablation (residual MLP, same objective), SIGReg (LeJEPA: no predictor, views predict their mean).
"""

from __future__ import annotations

import torch
from torch import nn

from hamjepa.config import Config
from hamjepa.method.distributed import global_count
from hamjepa.method.encoder import TokenEncoder
from hamjepa.method.objectives import ProjectionSchedule, Stats, hamjepa_objective, sigreg_directions, sigreg_objective
from hamjepa.method.predictors import apply_schedules, build_predictor
from hamjepa.methods import Objective, spec
from hamjepa.seeds import Stream, derive


class JEPAModel(nn.Module):
    """Encoder and predictor of one method, with the per-step state of its objective."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.spec = spec(cfg.method)
        self.encoder = TokenEncoder(cfg.encoder)
        self.state_dim = self.encoder.state_dim(cfg.data.image_size)
        self.q_dim = self.state_dim // 2
        self.predictor = build_predictor(cfg.predictor, self.q_dim, self.spec.predictor)
        # Draw k = min(128, d) columns; forward() keeps the first 2B - 1 for a global batch of B images (the
        # floors see both views pooled: 2B states).
        k = min(cfg.hamjepa_loss.spectral_dim, self.q_dim)
        every = cfg.hamjepa_loss.spectral_redraw_every
        self.projection_q = ProjectionSchedule(self.q_dim, k, every, seed=derive(cfg.seed, Stream.PROJECTION_Q))
        self.projection_p = ProjectionSchedule(self.q_dim, k, every, seed=derive(cfg.seed, Stream.PROJECTION_P))
        self.objectives = {Objective.HAMJEPA: hamjepa_objective, Objective.SIGREG: sigreg_objective}

    def compile_predictor(self) -> None:
        """torch.compile the predictor (in place: its state_dict keys stay) and the objective
        (compute.compile_predictor; `python -m hamjepa.bench step --part compile` measures it against eager)."""
        if self.predictor is not None:
            self.predictor.compile()
        self.objectives = {kind: torch.compile(fn) for kind, fn in self.objectives.items()}

    def set_epoch(self, epoch: int) -> None:
        """Per-epoch schedules of the predictor (residual-scale warm-up, horizon curriculum)."""
        apply_schedules(self.predictor, self.cfg.predictor, epoch)

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor, step: int) -> tuple[torch.Tensor, Stats]:
        """(loss, stats) for two views (N, C, H, W) of the same N images at global training step `step`."""
        n = view_a.shape[0]
        z = self.encoder(torch.cat([view_a, view_b]))  # (2N, 2d), one pass: one set of BN statistics
        if z.dtype in (torch.float16, torch.bfloat16):
            z = z.float()  # objectives and the integrator run in float32 under autocast
        if self.spec.objective is Objective.SIGREG:
            directions = sigreg_directions(self.state_dim, self.cfg.sigreg.num_directions, self.cfg.seed, step,
                                           z.device)
            with torch.autocast(z.device.type, enabled=False):
                return self.objectives[Objective.SIGREG](z.view(2, n, -1), directions, self.cfg.sigreg)  # (V, N, D)
        # One batched rollout: view a flows forward in time (+dt), view b backwards (-dt).
        direction = torch.cat([z.new_ones(n, 1), -z.new_ones(n, 1)])  # (2N, 1)
        pred = self.predictor(z, direction)
        # Any subset of orthonormal columns is orthonormal: k = min(128, d, 2B - 1) for the 2B pooled states.
        k = min(self.projection_q.k, 2 * global_count(n) - 1)
        projection_q = self.projection_q(step, z.device)[:, :k]
        projection_p = self.projection_p(step, z.device)[:, :k]
        with torch.autocast(z.device.type, enabled=False):
            return self.objectives[Objective.HAMJEPA](z[:n], z[n:], pred[:n], pred[n:], self.cfg.hamjepa_loss,
                                                      projection_q, projection_p)
