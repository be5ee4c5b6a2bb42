"""Time per training step (forward, backward, AdamW) of HamJEPA and SIGReg with the same encoder and batch.

The paper leaves HamJEPA's overhead over SIGReg unmeasured: the leapfrog rollout, the floors' eigen-
decompositions and the extra statistics. The ratio printed here is that overhead, measured side by side.
"""

from __future__ import annotations

import argparse

import torch

from ..config import PROFILES, parse_overrides, profile
from ..methods import JEPAModel
from ..optim import build_optimizer
from .timing import interleaved_medians


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m hamjepa.bench step", description=__doc__)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--batch", type=int, help="images per step (two views each); default: the profile's")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)

    overrides = parse_overrides(args.overrides)
    if args.batch:
        overrides["optim.batch_size"] = args.batch
    steps = {}
    for method in ("hamjepa", "sigreg"):
        cfg = profile(args.profile, {**overrides, "method": method})
        torch.manual_seed(0)
        model = JEPAModel(cfg)
        model.set_epoch(cfg.predictor.residual_scale_warmup_epochs)
        optimizer = build_optimizer(model, cfg.optim)
        shape = (cfg.optim.batch_size, cfg.encoder.in_channels, cfg.data.image_size, cfg.data.image_size)
        views = torch.randn(shape), torch.randn(shape)

        def step(model=model, optimizer=optimizer, views=views):
            loss, _ = model(*views, step=0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        steps[method] = step
    medians = interleaved_medians(steps, args.rounds, warmup=1)
    batch = cfg.optim.batch_size
    print(f"training step, profile {args.profile}: batch {batch} x 2 views, {cfg.data.image_size} px, encoder width "
          f"{cfg.encoder.width}, {torch.get_num_threads()} threads, median of {args.rounds}")
    for method, seconds in medians.items():
        print(f"  {method:8s} {seconds * 1e3:8.1f} ms/step  {batch / seconds:8.0f} images/s")
    print(f"  HamJEPA / SIGReg time per step: {medians['hamjepa'] / medians['sigreg']:.2f}x")
