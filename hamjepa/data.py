"""Datasets, seeded stratified subsets and the train / validation / test splits (METHOD.md 6, DESIGN.md).

Images are kept as uint8 tensors (N, C, H, W) for the small datasets (Fashion-MNIST, CIFAR, synthetic)
and read lazily from files for class-per-folder datasets (ImageNet-100). Splits:
- `subset` images are drawn first, stratified and seeded, from the full training set;
- then `val_fraction` of them (stratified, seeded) is held out as the validation split, used for tuning;
- the test split is the dataset's own, used only for final reporting.

Where data lives: `data.root` / --data-root, then $HAMJEPA_DATA, then Debian's dataset packages
(/usr/share/datasets/fashion-mnist), then a torchvision download into the first writable candidate.
"""

from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .config import AugmentConfig, ConfigError, DataConfig

DEBIAN_DIRS = {"fashion_mnist": Path("/usr/share/datasets/fashion-mnist")}
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz")
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
# Per-channel mean and std on the 0-1 scale, from each dataset's training split.
NORMALISATION = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
}
FIXES = {
    "fashion_mnist": "run `apt-get install dataset-fashion-mnist` or pass --data-root DIR with its idx.gz files",
    "cifar10": "pass --data-root DIR containing cifar-10-batches-py/ (torchvision's format), or allow the download",
    "cifar100": "pass --data-root DIR containing cifar-100-python/ (torchvision's format), or allow the download",
    "imagefolder": "pass --data-root DIR containing train/ and val/ folders with one folder per class",
}


class DatasetNotFoundError(ConfigError):
    """The dataset is not on disk and could not be downloaded; the message says where we looked and the fix."""


def _not_found(dataset: str, searched: list[Path], detail: str = "") -> DatasetNotFoundError:
    places = ", ".join(str(p) for p in searched) or "nowhere (no candidate folder)"
    detail = f" ({detail})" if detail else ""
    return DatasetNotFoundError(f"dataset '{dataset}' was not found in {places} and could not be downloaded"
                                f"{detail}; {FIXES[dataset]}.")


# -- image sets -------------------------------------------------------------------------------------

class ImageSet:
    """Labelled images: uint8 tensors (N, C, H, W) in memory, or files read and resized on access."""

    def __init__(self, labels: torch.Tensor, images: torch.Tensor | None = None, paths: list[str] | None = None,
                 image_size: int = 0, channels: int = 3):
        self.labels = labels.long()
        self.images = images
        self.paths = paths
        self.image_size = image_size
        self.channels = images.shape[1] if images is not None else channels

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> torch.Tensor:
        """uint8 (C, H, W)."""
        if self.images is not None:
            return self.images[index]
        from PIL import Image
        from torchvision.transforms.v2.functional import pil_to_tensor, resize

        with Image.open(self.paths[index]) as img:
            tensor = pil_to_tensor(img.convert("RGB" if self.channels == 3 else "L"))
        return resize(tensor, [self.image_size, self.image_size], antialias=True)

    def subset(self, indices: torch.Tensor) -> "ImageSet":
        indices = torch.as_tensor(indices, dtype=torch.long)
        return ImageSet(self.labels[indices], None if self.images is None else self.images[indices],
                        None if self.paths is None else [self.paths[i] for i in indices.tolist()],
                        self.image_size, self.channels)


@dataclass
class Splits:
    name: str
    train: ImageSet
    val: ImageSet
    test: ImageSet
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int

    @property
    def channels(self) -> int:
        return self.train.channels


# -- readers ------------------------------------------------------------------------------------------

def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzip or plain): big-endian dims after a magic number whose last byte is the rank."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    rank = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=rank, offset=4).astype(int)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank).reshape(dims)


def read_fashion_mnist(folder: Path) -> tuple[ImageSet, ImageSet]:
    arrays = [read_idx(folder / name) for name in FASHION_FILES]
    train_x, train_y, test_x, test_y = (torch.from_numpy(a.copy()) for a in arrays)
    return (ImageSet(train_y, train_x.unsqueeze(1)), ImageSet(test_y, test_x.unsqueeze(1)))  # (N, 1, 28, 28)


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as handle:
        return pickle.load(handle, encoding="bytes")


def read_cifar(folder: Path, dataset: str) -> tuple[ImageSet, ImageSet]:
    """torchvision's on-disk CIFAR: pickled dicts with b'data' (N, 3072) uint8 RGB planes and labels."""
    if dataset == "cifar10":
        train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
        test_files, label_key = [folder / "test_batch"], b"labels"
    else:
        train_files, test_files, label_key = [folder / "train"], [folder / "test"], b"fine_labels"

    def read(files):
        batches = [_unpickle(f) for f in files]
        images = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
        return ImageSet(torch.from_numpy(labels), torch.from_numpy(images.reshape(-1, 3, 32, 32).copy()))

    return read(train_files), read(test_files)


def read_imagefolder(folder: Path, image_size: int) -> tuple[ImageSet, ImageSet]:
    """train/ and val/ of class folders (ImageNet-100 layout); images are read lazily and resized."""
    from torchvision.datasets import ImageFolder

    def read(split: str) -> ImageSet:
        dataset = ImageFolder(str(folder / split))
        paths = [path for path, _ in dataset.samples]
        return ImageSet(torch.tensor(dataset.targets), paths=paths, image_size=image_size, channels=3)

    return read("train"), read("val")


def synthetic(image_size: int, channels: int, seed: int = 0, n_train: int = 2000, n_test: int = 500,
              num_classes: int = 10) -> tuple[ImageSet, ImageSet]:
    """Class templates plus noise: learnable, tiny, offline; for tests and dry runs."""
    generator = torch.Generator().manual_seed(seed)
    templates = torch.rand(num_classes, channels, image_size, image_size, generator=generator) * 255

    def draw(n: int) -> ImageSet:
        labels = torch.arange(n) % num_classes
        noise = torch.randn(n, channels, image_size, image_size, generator=generator) * 40
        return ImageSet(labels, (templates[labels] + noise).clamp(0, 255).to(torch.uint8))

    return draw(n_train), draw(n_test)


# -- finding data -------------------------------------------------------------------------------------

def candidate_folders(dataset: str, root: str = "") -> list[Path]:
    """Where we look, in order: --data-root, $HAMJEPA_DATA, Debian's package folder."""
    folders = [Path(p).expanduser() for p in (root, os.environ.get("HAMJEPA_DATA", "")) if p]
    if dataset in DEBIAN_DIRS:
        folders.append(DEBIAN_DIRS[dataset])
    return folders


def _locate(folders: list[Path], relative_paths: list[str]) -> Path | None:
    """The first folder (or its named sub-folder) that holds every relative path."""
    for folder in folders:
        for sub in ("", "fashion-mnist", "FashionMNIST/raw"):
            base = folder / sub if sub else folder
            if all((base / rel).exists() for rel in relative_paths):
                return base
    return None


def _download(dataset: str, folders: list[Path]) -> Path:
    """Let torchvision download into the first candidate (else ./data); any failure is one sentence."""
    import torchvision.datasets as tvd

    target = folders[0] if folders and folders[0] != DEBIAN_DIRS.get(dataset) else Path("data").resolve()
    try:
        target.mkdir(parents=True, exist_ok=True)
        if dataset == "fashion_mnist":
            tvd.FashionMNIST(str(target), train=True, download=True)
            tvd.FashionMNIST(str(target), train=False, download=True)
            return target / "FashionMNIST" / "raw"
        cls = tvd.CIFAR10 if dataset == "cifar10" else tvd.CIFAR100
        cls(str(target), train=True, download=True)
        return target / CIFAR_FOLDERS[dataset]
    except Exception as error:  # noqa: BLE001 - any download failure (no network, disk) becomes the sentence
        raise _not_found(dataset, folders + [target], f"download failed: {type(error).__name__}") from None


def load_full(cfg: DataConfig, channels: int) -> tuple[ImageSet, ImageSet]:
    """The dataset's full training and test sets."""
    dataset = cfg.dataset
    if dataset == "synthetic":
        return synthetic(cfg.image_size, channels, seed=cfg.seed)
    folders = candidate_folders(dataset, cfg.root)
    if dataset == "fashion_mnist":
        found = _locate(folders, list(FASHION_FILES))
        if found is None:
            found = _download(dataset, folders) if cfg.download else None
        if found is None:
            raise _not_found(dataset, folders)
        return read_fashion_mnist(found)
    if dataset in CIFAR_FOLDERS:
        marker = "test_batch" if dataset == "cifar10" else "test"
        found = _locate(folders, [f"{CIFAR_FOLDERS[dataset]}/{marker}"])
        folder = found / CIFAR_FOLDERS[dataset] if found else (_download(dataset, folders) if cfg.download else None)
        if folder is None:
            raise _not_found(dataset, folders)
        return read_cifar(folder, dataset)
    found = _locate(folders, ["train", "val"])
    if found is None:
        raise _not_found(dataset, folders)
    return read_imagefolder(found, cfg.image_size)


# -- subsets and splits -----------------------------------------------------------------------------

def stratified_indices(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """`count` indices whose class proportions match `labels` (largest remainders), seeded; sorted."""
    generator = torch.Generator().manual_seed(seed)
    classes, class_counts = torch.unique(labels, return_counts=True)
    exact = class_counts.double() * count / len(labels)
    quota = exact.floor().long()
    remainder_order = torch.argsort(exact - quota, descending=True, stable=True)
    quota[remainder_order[: count - int(quota.sum())]] += 1
    chosen = []
    for cls, take in zip(classes.tolist(), quota.tolist(), strict=True):
        members = torch.nonzero(labels == cls).squeeze(1)
        chosen.append(members[torch.randperm(len(members), generator=generator)[:take]])
    return torch.sort(torch.cat(chosen)).values


def load_splits(cfg: DataConfig, channels: int) -> Splits:
    """Train / validation / test splits for a run (see the module docstring for the order)."""
    train, test = load_full(cfg, channels)
    if train.channels != channels:
        raise ConfigError(f"config field 'encoder.in_channels' = {channels} is invalid: dataset "
                          f"'{cfg.dataset}' has {train.channels} channel(s).")
    if cfg.subset:
        if cfg.subset > len(train):
            raise ConfigError(f"config field 'data.subset' = {cfg.subset} is invalid: dataset '{cfg.dataset}' has "
                              f"{len(train)} training images.")
        train = train.subset(stratified_indices(train.labels, cfg.subset, cfg.seed))
    n_val = round(len(train) * cfg.val_fraction)
    val_idx = stratified_indices(train.labels, n_val, cfg.seed + 1) if n_val else torch.empty(0, dtype=torch.long)
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[val_idx] = False
    val, train = train.subset(val_idx), train.subset(torch.nonzero(keep).squeeze(1))
    num_classes = int(torch.cat([train.labels, test.labels]).max()) + 1
    if cfg.dataset in NORMALISATION:
        mean, std = NORMALISATION[cfg.dataset]
    else:  # synthetic: from the training images
        pixels = train.images.double() / 255
        mean = tuple(pixels.mean(dim=(0, 2, 3)).tolist())
        std = tuple(pixels.std(dim=(0, 2, 3)).tolist())
    image_size = cfg.image_size if train.images is None else train.images.shape[-1]
    return Splits(cfg.dataset, train, val, test, num_classes, mean, std, image_size)


# -- torch datasets -----------------------------------------------------------------------------------

class TwoViewDataset(Dataset):
    """(view_a, view_b): two independent augmentations of each image, float (C, H, W) each."""

    def __init__(self, images: ImageSet, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images.image(index)
        return self.transform(image), self.transform(image)


class LabelledDataset(Dataset):
    """(image, label) through a deterministic transform, for feature extraction."""

    def __init__(self, images: ImageSet, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images.image(index)), int(self.images.labels[index])


def two_view_dataset(splits: Splits, augment: AugmentConfig) -> TwoViewDataset:
    from .augment import two_view_transform

    transform = two_view_transform(augment, splits.image_size, splits.channels, splits.mean, splits.std)
    return TwoViewDataset(splits.train, transform)
