"""Training-step throughput, in two side-by-side comparisons from one run:

1. methods: time per step (forward, backward, AdamW) of HamJEPA and SIGReg with the same encoder and batch. The
   paper leaves HamJEPA's overhead over SIGReg unmeasured: the leapfrog rollout, the floors' eigendecompositions
   and the extra statistics. The ratio printed is that overhead.
2. placement: whole training epochs through the real loop (train.loop.train_one_epoch) with the augmentation in
   the training loop on the training device (data.augment_on = device) and in DataLoader workers (loader), on
   the profile's data (its real epoch: the loader's per-epoch worker start-up counts as in training), or on
   synthetic images of its size with --data synthetic (also the fallback when the data is not on this machine):
   images/s and the fraction of the epoch the step loop waited for input. Epochs alternate between the
   placements so machine noise hits both alike; the medians decide data.feeds.CPU_AUTO_PLACEMENT (docs/results.md,
   a4b4034).
3. compile: time per step of each method eager and with `compute.compile_predictor` (torch.compile of the
   predictor's rollout and the objective), side by side on the same weights and views, after checking that the
   compiled loss agrees with eager to 1e-5 (its statistics to 1e-3); and the seconds the first compiled step took.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch

from hamjepa import checks
from hamjepa.arguments import Parser
from hamjepa.bench.timing import interleaved_medians
from hamjepa.config import PROFILES, Config, parse_overrides, profile
from hamjepa.config.sections import MAX_BATCH
from hamjepa.errors import UserError
from hamjepa.method.model import JEPAModel
from hamjepa.train.optim import build_optimizer

PLACEMENTS = ("device", "loader")
SYNTHETIC_IMAGES = 2000  # the synthetic dataset's training images; --images takes at most these, 10% validate


def method_steps(overrides: dict, profile_name: str, rounds: int) -> tuple[Config, dict[str, float]]:
    """(the last config, median seconds per step of each method) on random views."""
    steps = {}
    for method in ("hamjepa", "sigreg"):
        cfg = profile(profile_name, {**overrides, "method": method})
        steps[method] = _training_step(*_model_and_views(cfg), cfg)
    return cfg, interleaved_medians(steps, rounds, warmup=1)


def _model_and_views(cfg: Config) -> tuple[JEPAModel, tuple[torch.Tensor, torch.Tensor]]:
    """cfg's model (seed 0, past the residual-scale warm-up) and two random views of one batch."""
    torch.manual_seed(0)
    model = JEPAModel(cfg)
    model.set_epoch(cfg.predictor.residual_scale_warmup_epochs)
    shape = (cfg.optim.batch_size, cfg.encoder.in_channels, cfg.data.image_size, cfg.data.image_size)
    return model, (torch.randn(shape), torch.randn(shape))


def _training_step(model: JEPAModel, views, cfg: Config) -> Callable[[], None]:
    """One step (forward, backward, AdamW) of `model` on fixed views, with an optimiser of its own."""
    optimizer = build_optimizer(model, cfg.optim)

    def step() -> None:
        loss, _ = model(*views, step=0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def compile_steps(overrides: dict, profile_name: str, rounds: int) -> dict[str, dict[str, float]]:
    """{method: {'eager_s', 'compiled_s' (median seconds per step), 'compile_s' (the first compiled step),
    'max_relative_error' (the loss, compiled vs eager), 'stats_error'}}; raises if the loss disagrees beyond 1e-5
    relative or a statistic beyond 1e-3."""
    out = {}
    for method in ("hamjepa", "sigreg"):
        cfg = profile(profile_name, {**overrides, "method": method})
        eager, views = _model_and_views(cfg)
        compiled = copy.deepcopy(eager)
        compiled.compile_predictor()
        started = time.perf_counter()
        got = compiled(*views, step=0)
        compile_s = time.perf_counter() - started
        want = eager(*views, step=0)
        loss, reference = float(got[0].detach()), float(want[0].detach())
        error = abs(loss - reference) / abs(reference)
        # The statistics are diagnostics: float32 reassociation moves e.g. the log-determinant of a nearly singular
        # covariance by ~1e-5 relative, and a budget term of 1e-9 by much more; the scale they matter at is 1e-3.
        stats_error = max(abs(float(got[1][k]) - float(v)) / max(abs(float(v)), 1e-3) for k, v in want[1].items())
        if error > 1e-5 or stats_error > 1e-3:
            raise RuntimeError(f"{method}: the compiled step differs from eager: loss by {error:.2g} (relative, "
                               f"limit 1e-5), statistics by up to {stats_error:.2g} (limit 1e-3).")
        steps = {name: _training_step(model, views, cfg) for name, model in (("eager", eager), ("compiled", compiled))}
        medians = interleaved_medians(steps, rounds, warmup=1)
        out[method] = {"eager_s": medians["eager"], "compiled_s": medians["compiled"], "compile_s": compile_s,
                       "max_relative_error": error, "stats_error": stats_error}
    return out


def placement_epochs(cfg: Config, epochs: int, device: torch.device | str = "cpu",
                     placements: tuple[str, ...] = PLACEMENTS) -> dict[str, dict[str, float]]:
    """{placement: {'images_per_s', 'data_wait_fraction', 'images'}}: medians over `epochs` alternating epochs.

    cfg's data must be in memory (synthetic here) so both placements apply; each placement trains its own copy
    of the same initial model, epoch after epoch, through the real training loop.
    """
    from hamjepa.train.loop import build_worker, train_one_epoch  # the loop under test; no Ray is started

    workers = {p: build_worker(cfg.override({"data.augment_on": p}), 0, 1, device) for p in placements}
    figures: dict[str, list[tuple[float, float]]] = {p: [] for p in placements}
    for epoch in range(1, epochs + 1):
        for p in placements if epoch % 2 else reversed(placements):
            outcome = train_one_epoch(workers[p], workers[p].model, epoch)
            if outcome.reason is not None:
                raise RuntimeError(f"the {p} placement diverged in the benchmark: {outcome.reason}")
            images = workers[p].iters_per_epoch * cfg.optim.batch_size
            figures[p].append((images / outcome.seconds, outcome.waited / outcome.seconds))
    return {p: {"images_per_s": statistics.median(v[0] for v in values),
                "data_wait_fraction": statistics.median(v[1] for v in values),
                "images": workers[p].iters_per_epoch * cfg.optim.batch_size}
            for p, values in figures.items()}


def fewest_images(batch: int) -> int:
    """The fewest images whose training part (10% are held out for validation) fills one batch."""
    return next(n for n in range(batch, 2 * batch + 10) if n - n // 10 >= batch)


def synthetic_config(cfg: Config, images: int) -> Config:
    """`cfg` on `images` synthetic images of its size, 10% of them held out for validation."""
    return cfg.override({"data.dataset": "synthetic", "data.subset": images - images // 10,
                         "data.val_size": images // 10})


def _checked(args: argparse.Namespace) -> dict[str, object]:
    """The config overrides of --set and --batch; every flag checked (the config tree checks --set) before any
    measurement, so a bad one is one sentence, not a traceback minutes in."""
    overrides: dict[str, object] = dict(parse_overrides(args.overrides))
    if args.batch is not None:
        checks.integer("--batch", args.batch, 1, MAX_BATCH)
        overrides["optim.batch_size"] = args.batch
    checks.integer("--rounds", args.rounds, 1)
    checks.integer("--epochs", args.epochs, 1)
    cfg = profile(args.profile, overrides)
    if args.part in ("all", "placement"):  # synthetic images are also the fallback when the profile's are not here
        batch = cfg.optim.batch_size
        fewest = fewest_images(batch)
        if fewest > SYNTHETIC_IMAGES:
            raise UserError(f"--batch = {batch} is invalid for the placement part: the synthetic images hold "
                            f"{SYNTHETIC_IMAGES - SYNTHETIC_IMAGES // 10} training images; pass --batch <= "
                            f"{SYNTHETIC_IMAGES - SYNTHETIC_IMAGES // 10} or --part methods.")
        checks.integer("--images", args.images, fewest, SYNTHETIC_IMAGES)
        synthetic_config(cfg, args.images)
    return overrides


def main(argv: list[str]) -> None:
    parser = Parser(prog="python -m hamjepa.bench step", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--batch", type=int, help="images per step (two views each); default: the profile's")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--rounds", type=int, default=10, help="method steps timed per method")
    parser.add_argument("--epochs", type=int, default=3, help="epochs timed per placement")
    parser.add_argument("--data", choices=("profile", "synthetic"), default="profile",
                        help="placement part: the profile's dataset, or synthetic images of its size")
    parser.add_argument("--images", type=int, default=SYNTHETIC_IMAGES, help="synthetic: training images, at most "
                        f"{SYNTHETIC_IMAGES} (10%% held out for validation)")
    parser.add_argument("--part", choices=("all", "methods", "placement", "compile"), default="all",
                        help="all = methods and placement; compile is run only when asked (minutes on a CPU)")
    args = parser.parse_args(argv)
    overrides = _checked(args)
    if args.part in ("all", "methods"):
        cfg, medians = method_steps(overrides, args.profile, args.rounds)
        batch = cfg.optim.batch_size
        print(f"training step, profile {args.profile}: batch {batch} x 2 views, {cfg.data.image_size} px, encoder "
              f"width {cfg.encoder.width}, {torch.get_num_threads()} threads, median of {args.rounds}")
        for method, seconds in medians.items():
            print(f"  {method:8s} {seconds * 1e3:8.1f} ms/step  {batch / seconds:8.0f} images/s")
        print(f"  HamJEPA / SIGReg time per step: {medians['hamjepa'] / medians['sigreg']:.2f}x")
    if args.part in ("all", "placement"):
        cfg = profile(args.profile, overrides)
        synthetic = synthetic_config(cfg, args.images)
        try:
            figures = placement_epochs(synthetic if args.data == "synthetic" else cfg, args.epochs)
        except UserError as error:  # the profile's data is not here (DatasetNotFoundError is a UserError)
            print(f"{error} Timing synthetic images instead.")
            cfg = synthetic
            figures = placement_epochs(cfg, args.epochs)
        cfg = synthetic if args.data == "synthetic" else cfg
        print(f"input placement, profile {args.profile} on {cfg.data.dataset}: {figures['device']['images']} images "
              f"per epoch, batch {cfg.optim.batch_size}, {cfg.data.image_size} px x {cfg.encoder.in_channels}, "
              f"loader with {cfg.data.num_workers} worker(s), {torch.get_num_threads()} threads, median of "
              f"{args.epochs} epochs")
        for p, f in figures.items():
            print(f"  {p:8s} {f['images_per_s']:8.0f} images/s  data wait {100 * f['data_wait_fraction']:5.1f}% "
                  "of the epoch")
        ratio = figures["device"]["images_per_s"] / figures["loader"]["images_per_s"]
        print(f"  device / loader images/s: {ratio:.2f}x")
    if args.part == "compile":
        figures = compile_steps(overrides, args.profile, args.rounds)
        print(f"compile (compute.compile_predictor: the predictor's rollout and the objective), profile "
              f"{args.profile}, {torch.get_num_threads()} threads, median of {args.rounds}, eager and compiled "
              "interleaved")
        for method, f in figures.items():
            print(f"  {method:8s} eager {f['eager_s'] * 1e3:8.1f} ms/step  compiled {f['compiled_s'] * 1e3:8.1f} "
                  f"ms/step  eager / compiled {f['eager_s'] / f['compiled_s']:.2f}x  (first compiled step "
                  f"{f['compile_s']:.0f} s; agrees with eager to {f['max_relative_error']:.1e})")
