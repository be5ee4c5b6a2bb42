"""The initialisation reference: what encoders that never trained score (docs/method.md §11 "Learning").

A randomly initialised ResNet is already a strong kNN classifier on small images, so "did a method learn" is
its final readouts against those of untrained encoders. A run's own epoch-0 readout is a sample of one, as
spread as the initialisation itself; the reference is `n` encoders at seeds no run trains on (counted down from
the largest seed, while training seeds count up from the base seed), evaluated exactly as a run's epoch 0 is
(the same splits, readouts, kNN, probe and spectra), with no step taken. One feature pass per encoder serves
every compared method: each reads the features its own way (`readouts.metrics_of_features`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hamjepa.config import Config
from hamjepa.config.sections import MAX_SEED
from hamjepa.data.splits import load_splits
from hamjepa.evaluation import readouts
from hamjepa.method.model import JEPAModel


def reference_seeds(n: int) -> list[int]:
    """The reference encoders' seeds: the n largest seeds, which no study trains on (its seeds count up from its
    base seed)."""
    return [MAX_SEED - i for i in range(n)]


def initialisation_readouts(cfg: Config, seeds: Sequence[int], methods: Sequence[str],
                            device: torch.device | str = "cpu") -> dict[str, list[dict[str, float]]]:
    """method -> one dict of final metrics per seed (in `seeds` order) of `cfg`'s encoder at initialisation.

    The encoder is built as a run of that seed builds it (`torch.manual_seed(seed)`, then the model), so a
    reference encoder is exactly the one such a run would start from; it never takes a step.
    """
    device = torch.device(device)
    splits = load_splits(cfg.data, channels=cfg.encoder.in_channels)
    out: dict[str, list[dict[str, float]]] = {method: [] for method in methods}
    for seed in seeds:
        seeded = cfg.override({"seed": seed})
        torch.manual_seed(seed)
        model = JEPAModel(seeded).to(device)
        features = readouts.split_features(model, splits, seeded, device)
        for method, metrics in readouts.metrics_of_features(features, splits, seeded, methods, device).items():
            out[method].append(metrics)
    return out
