"""Which images of a dataset train, validate and test a run, and the normalisation that goes with them.

Splits, all seeded by data.seed (independent of the training seed, so the splits of a study stay fixed):
1. `val_size` images are held out first, stratified, from the dataset's full training set: the validation split,
   on which the search selects. It is sized to select on, not to match the training subset: at 5,000 images the
   objective's binomial standard error is at most 0.71 points (p = 0.5), where 500 gave 2.2;
2. then `subset` training images are drawn, stratified, from the rest (0 = all of the rest), so the run never
   trains on a validation image, and a small training subset still gets a large validation split;
3. the dataset's own test split is used only for final reporting.
Each run logs its split's digest (split_digest, names.DATA_DIGEST): the same digest, the same images.

Normalisation (mean, std per channel, 0-1 scale): the published training-set constants for Fashion-MNIST
and CIFAR; computed from the training images for synthetic, and from a seeded sample of STATS_SAMPLE
training images for imagefolder (any channel count; for ImageNet-100 it lands near ImageNet's constants).

The images themselves come from sources.py (load_full); feeds.py turns a Splits into batches.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from hamjepa.config import ConfigError, DataConfig
from hamjepa.data.augment import Normalise
from hamjepa.data.sources import ImageSet, load_full, undecodable

# Per-channel mean and std on the 0-1 scale, of each dataset's full training split.
KNOWN_STATS = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
STATS_SAMPLE = 256  # imagefolder: training images decoded to estimate the mean and std


@dataclass
class Splits:
    """The splits of one run and what describes them. Images are at `image_size`; mean/std on the 0-1 scale."""

    name: str
    train: ImageSet
    val: ImageSet
    test: ImageSet
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    digest: str = ""  # SHA-256 of the dataset name and the train/validation indices: the same digest, the same split

    @property
    def sizes(self) -> str:
        return f"train {len(self.train)}, val {len(self.val)}, test {len(self.test)}"

    @property
    def channels(self) -> int:
        return self.train.channels

    def normalise(self) -> Normalise:
        """The evaluation transform of these splits: uint8 (B, C, S, S) -> normalised float32."""
        return Normalise(self.mean, self.std, self.image_size)


def stratified_indices(labels: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` indices, sorted, whose class counts are proportional to those of `labels`.

    Each class gets floor(count * share); the leftover places go to the largest remainders (ties: lower
    class first). Members are drawn uniformly without replacement with `generator`.
    """
    if not 0 <= count <= len(labels):
        raise ValueError(f"cannot draw {count} of {len(labels)} images.")
    classes, class_counts = torch.unique(labels, return_counts=True)
    exact = class_counts.double() * count / len(labels)
    quota = exact.floor().long()
    by_remainder = torch.argsort(exact - quota, descending=True, stable=True)
    quota[by_remainder[: count - int(quota.sum())]] += 1
    chosen = []
    for cls, take in zip(classes.tolist(), quota.tolist()):
        members = torch.nonzero(labels == cls).squeeze(1)
        chosen.append(members[torch.randperm(len(members), generator=generator)[:take]])
    return torch.sort(torch.cat(chosen)).values


def split_indices(labels: torch.Tensor, subset: int, val_size: int,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices into a full training set: `val_size` held out first, then the training subset drawn
    from the rest (all of it when `subset` is 0). Disjoint, sorted, stratified."""
    generator = torch.Generator().manual_seed(seed)
    held_out = torch.zeros(len(labels), dtype=torch.bool)
    held_out[stratified_indices(labels, val_size, generator)] = True
    rest = torch.nonzero(~held_out).squeeze(1)
    train = rest[stratified_indices(labels[rest], subset, generator)] if subset else rest
    return train, torch.nonzero(held_out).squeeze(1)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) on the 0-1 scale of uint8 (N, C, H, W) images."""
    pixels = images.double().div(255).transpose(0, 1).reshape(images.shape[1], -1)  # (C, N*H*W)
    return tuple(pixels.mean(1).tolist()), tuple(pixels.std(1).tolist())


def load_splits(cfg: DataConfig, channels: int, root: str | None = None) -> Splits:
    """Train / validation / test splits of a run (module docstring: order, sizes, normalisation).

    channels: the encoder's input channels (1 or 3); root overrides cfg.root.
    """
    train, test, num_classes = load_full(cfg, channels, root)
    if cfg.val_size >= len(train):
        raise ConfigError(f"config field 'data.val_size' = {cfg.val_size} is invalid: dataset '{cfg.dataset}' has "
                          f"{len(train)} training images, and some must be left to train on.")
    if cfg.subset > len(train) - cfg.val_size:
        raise ConfigError(f"config field 'data.subset' = {cfg.subset} is invalid: dataset '{cfg.dataset}' has "
                          f"{len(train)} training images, {cfg.val_size} of them held out for validation "
                          f"(data.val_size), so at most {len(train) - cfg.val_size} can train.")
    train_idx, val_idx = split_indices(train.labels, cfg.subset, cfg.val_size, cfg.seed)
    val, train = train.subset(val_idx), train.subset(train_idx)
    if 0 < cfg.test_limit < len(test):
        test = test.subset(stratified_indices(test.labels, cfg.test_limit, torch.Generator().manual_seed(cfg.seed)))
    if cfg.dataset in KNOWN_STATS:
        mean, std = KNOWN_STATS[cfg.dataset]
    elif train.images is not None:
        mean, std = channel_stats(train.images)
    else:
        generator = torch.Generator().manual_seed(cfg.seed)
        sample = torch.randperm(len(train), generator=generator)[:STATS_SAMPLE]
        mean, std = channel_stats(train.load(sample))
    return Splits(cfg.dataset, train, val, test, num_classes, mean, std, cfg.image_size,
                  digest=split_digest(cfg.dataset, train_idx, val_idx))


def split_digest(name: str, train_idx, val_idx) -> str:
    """A split's identity: which images of which dataset train and validate (not the pixels: cheap, exact)."""
    digest = hashlib.sha256(name.encode())
    for indices in (train_idx, val_idx):
        digest.update(b"|")
        digest.update(np.asarray(indices, dtype=np.int64).tobytes())
    return digest.hexdigest()


def check_image_files(splits: Splits) -> None:
    """Open every image file's header (cheap: no decoding) so an unreadable file fails before the run, not in it."""
    from PIL import Image

    for images in (splits.train, splits.val, splits.test):
        for path in images.paths or ():
            try:
                with Image.open(path):
                    pass
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                raise undecodable(path, error) from None
