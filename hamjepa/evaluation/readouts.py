"""A run's readouts measured (percent): the per-epoch objective, and the final evaluation.

Which readouts a method is judged on, and every metric's name, live in names.py.
Per epoch: the objective `val_knn{k}_top1` against a bounded, seeded subset of the training split (cheap
enough for every epoch, and a fixed yardstick for ASHA). At the end (and at initialisation, epoch 0): kNN
and linear probe on validation and test against the whole training split, per readout, and spectra; the
objective again, from those features (one feature pass per split, where it once took two).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hamjepa.config import Config
from hamjepa.data.splits import Splits
from hamjepa.evaluation.probes import extract_features, knn_top1, linear_probe, spectrum
from hamjepa.names import accuracy, default_readout, knn, objective, readouts


def _features(model, images, splits: Splits, cfg: Config, device) -> dict[str, torch.Tensor]:
    """Readouts of every image. In-memory images go to the device once as uint8 and are normalised there, batch
    by batch (no DataLoader, a quarter of float32's bytes copied); image files are decoded on the CPU."""
    source = images.images.to(device) if images.images is not None else images
    return extract_features(model.encoder, source, splits.normalise(), cfg.eval.batch_size, device)


def _reference(splits: Splits, cfg: Config) -> torch.Tensor:
    """Indices of the objective's bounded, seeded reference set in the training split."""
    generator = torch.Generator().manual_seed(cfg.data.seed)
    return torch.randperm(len(splits.train), generator=generator)[:min(cfg.eval.knn_train_limit, len(splits.train))]


def _objective(train_z: torch.Tensor, val_z: torch.Tensor, splits: Splits, cfg: Config) -> float:
    """kNN top-1 (percent) of validation features against reference-set features (in `_reference`'s order)."""
    labels = splits.train.labels[_reference(splits, cfg)]
    return 100.0 * knn_top1(train_z, labels, val_z, splits.val.labels, k=min(cfg.eval.knn_k, len(labels)))


def validation_knn(model, splits: Splits, cfg: Config, device) -> float:
    """Per-epoch kNN top-1 (percent) of the default readout: validation split (not empty) vs a bounded training
    subset."""
    name = default_readout(cfg.method)
    reference = splits.train.subset(_reference(splits, cfg))
    return _objective(_features(model, reference, splits, cfg, device)[name],
                      _features(model, splits.val, splits, cfg, device)[name], splits, cfg)


def held_out_states(model, splits: Splits, cfg: Config, device, limit: int = 512) -> torch.Tensor:
    """The states z = [q | p] (N, 2d) of up to `limit` held-out images: the test split's first, else the
    validation split's (the split order is seeded, so these are a fixed sample); (0, 2d) when there are none."""
    images = splits.test if len(splits.test) else splits.val
    chosen = images.subset(torch.arange(min(limit, len(images))))
    return _features(model, chosen, splits, cfg, device)["qp"]


def split_features(model, splits: Splits, cfg: Config, device) -> dict[str, dict[str, torch.Tensor]]:
    """Every readout of every image of the train, validation and test splits: split -> readout -> (N, D)."""
    return {name: _features(model, getattr(splits, name), splits, cfg, device) for name in ("train", "val", "test")}


def final_metrics(model, splits: Splits, cfg: Config, device) -> dict[str, float]:
    """kNN and linear probe (percent) on validation and test for every readout, plus spectra, and the objective
    (when there is a validation split) from the same features: one feature pass per split."""
    features = split_features(model, splits, cfg, device)
    return metrics_of_features(features, splits, cfg, [cfg.method], device)[cfg.method]


def metrics_of_features(z: dict[str, dict[str, torch.Tensor]], splits: Splits, cfg: Config, methods: Sequence[str],
                        device) -> dict[str, dict[str, float]]:
    """method -> `final_metrics` of features already extracted (`split_features`), read as that method reads them
    (its readouts and default readout). One feature pass serves several methods (the initialisation reference),
    and a readout two methods share (SIGReg's qp is HamJEPA's) is measured once."""
    k = cfg.eval.knn_k
    measured: dict[str, dict[str, float]] = {}
    out = {}
    for method in methods:
        metrics: dict[str, float] = {}
        if len(splits.val):  # the objective from the same features (its reference set is part of the training split)
            name = default_readout(method)
            metrics[objective(k)] = _objective(z["train"][name][_reference(splits, cfg)], z["val"][name], splits, cfg)
        for r in readouts(method):
            if r not in measured:
                measured[r] = _readout_metrics({name: features[r] for name, features in z.items()}, splits, cfg, r,
                                               device)
            metrics.update(measured[r])
        out[method] = with_default_readout(metrics, method, k)
    return out


def _readout_metrics(x: dict[str, torch.Tensor], splits: Splits, cfg: Config, r: str, device) -> dict[str, float]:
    """kNN and linear probe on validation and test, and the spectrum, of one readout's features x (split -> (N, D))."""
    k = cfg.eval.knn_k
    labels = {name: getattr(splits, name).labels for name in ("train", "val", "test")}
    metrics: dict[str, float] = {}
    for split in ("val", "test"):
        if len(x[split]):
            metrics[accuracy(split, knn(k), r)] = 100.0 * knn_top1(x["train"], labels["train"], x[split],
                                                                   labels[split], k=min(k, len(x["train"])))
    probe = linear_probe(x["train"], labels["train"], {s: (x[s], labels[s]) for s in ("val", "test")},
                         splits.num_classes, cfg.eval, seed=cfg.seed, device=device)
    for split, (top1, top5) in probe.items():
        metrics[accuracy(split, "linprobe_top1", r)] = 100.0 * top1
        metrics[accuracy(split, "linprobe_top5", r)] = 100.0 * top5
    spectra = spectrum(x["train"], cfg.eval.spectrum_top, cfg.eval.spectrum_samples, seed=cfg.seed)
    metrics[f"effective_rank_{r}"] = spectra["effective_rank"]
    metrics[f"participation_ratio_{r}"] = spectra["participation_ratio"]
    return metrics


def with_default_readout(metrics: dict[str, float], method: str, k: int) -> dict[str, float]:
    """The metrics plus unsuffixed copies of the default readout's accuracies (`test_knn20_top1` =
    `test_knn20_top1_q` for HamJEPA). Not val kNN: the objective `val_knn{k}_top1` keeps its per-epoch
    definition (bounded reference set) to the end, so every epoch of every trial is measured alike."""
    default, objective_name = default_readout(method), objective(k)
    aliases = {key[: -len(default) - 1]: value for key, value in metrics.items()
               if key.endswith(f"_{default}") and key.startswith(("val_", "test_"))
               and not key.startswith(objective_name)}
    return {**metrics, **aliases}
