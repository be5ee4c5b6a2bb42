"""Datasets on disk: the readers, where the files are looked for, and the download when they are missing.

Datasets (DataConfig.dataset):
- fashion_mnist: 28 px grey, 10 classes; the four idx.gz files, read here with gzip + numpy.
- cifar10, cifar100: 32 px RGB, 10 / 100 classes (fine labels); torchvision's on-disk pickle batches
  (`cifar-10-batches-py/`, `cifar-100-python/`), read with cifar.py's restricted unpickler, so a crafted file
  cannot run code.
- imagefolder: `train/` and `val/` with one folder per class (ImageNet-100); decoded lazily per image.
- synthetic: seeded low-frequency class templates plus noise; offline, tiny, learnable (tests, dry runs).

Where files are looked for: the `root` argument / `data.root` (--data-root) alone when one is given (it must
exist; a typo never falls back to another copy); else, in order, $HAMJEPA_DATA, Debian's dataset package folder
(`apt-get install dataset-fashion-mnist` -> /usr/share/datasets/fashion-mnist), then the download folder
($XDG_CACHE_HOME or ~/.cache, /hamjepa). Missing Fashion-MNIST or CIFAR is downloaded by torchvision when
`data.download` allows, into the first of: root, $HAMJEPA_DATA, the download folder. When nothing works,
DatasetNotFoundError says in one sentence where we looked and what fixes it. Files that are there but broken
(not gzip, truncated, a bad idx magic number, the wrong shapes or labels, an undecodable image, a class folder
without images) are one sentence too (UserError), raised while loading, so preflight refuses them before Ray.

Images are uint8 (N, C, S, S) tensors (ImageSet) stored at the run's size S = data.image_size: in-memory
datasets of another native size are resized once on load (shorter side to S, antialiased, centred square crop),
and folder images are decoded and resized the same way on access. The augmentation can then resample without
antialiasing (augment.py), and the evaluation transform only normalises. The price, for ImageNet-100: training
crops come from the centred square at image_size (a 40% crop is up-sampled), not from the full-resolution
photo as torchvision's RandomResizedCrop would take them; decoding is cheaper, views slightly softer.

Which of these images train, validate and test: splits.py; how they reach the device: feeds.py.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hamjepa import paths
from hamjepa.config import ConfigError, DataConfig
from hamjepa.data.augment import resize_square
from hamjepa.data.cifar import read_batch
from hamjepa.errors import UserError

DEBIAN_DIRS = {"fashion_mnist": Path("/usr/share/datasets/fashion-mnist")}
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz")
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CIFAR_FILES = {"cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
               "cifar100": (["train"], ["test"], b"fine_labels")}
NUM_CLASSES = {"fashion_mnist": 10, "cifar10": 10, "cifar100": 100}
FIXES = {
    "fashion_mnist": "run `apt-get install dataset-fashion-mnist`, or pass --data-root DIR holding its four "
                     "idx.gz files, or allow the download (data.download = true) on a machine with network",
    "cifar10": "pass --data-root DIR holding cifar-10-batches-py/ (torchvision's format), or allow the download "
               "(data.download = true) on a machine with network",
    "cifar100": "pass --data-root DIR holding cifar-100-python/ (torchvision's format), or allow the download "
                "(data.download = true) on a machine with network",
    "imagefolder": "pass --data-root DIR holding train/ and val/ with one folder of images per class",
}


class DatasetNotFoundError(UserError):
    """The dataset is not on disk and could not be downloaded; the message says where we looked and the fix."""


def _not_found(dataset: str, searched: Sequence[Path], why: str) -> DatasetNotFoundError:
    places = ", ".join(str(p) for p in searched)
    return DatasetNotFoundError(f"dataset '{dataset}' was not found in {places} and {why}; to fix it, "
                                f"{FIXES[dataset]}.")


# -- image sets -------------------------------------------------------------------------------------

class ImageSet:
    """Labelled images at one size S: uint8 (N, C, S, S) in memory, or image files decoded on access.

    labels: int64 (N,). Exactly one of `images` (in memory) and `paths` (files) is given.
    """

    def __init__(self, labels: torch.Tensor, images: torch.Tensor | None = None,
                 paths: Sequence[str] | None = None, image_size: int = 0, channels: int = 0):
        if (images is None) == (paths is None):
            raise ValueError("an ImageSet holds either images or paths.")
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.images = images
        self.paths = list(paths) if paths is not None else None
        self.image_size = images.shape[-1] if images is not None else image_size
        self.channels = images.shape[1] if images is not None else channels

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, S, S) for the given indices."""
        if self.images is not None:
            return self.images[torch.as_tensor(indices, dtype=torch.long)]
        return torch.stack([decode_image(self.paths[int(i)], self.image_size, self.channels) for i in indices])

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ImageSet:
        indices = torch.as_tensor(indices, dtype=torch.long)
        if self.images is not None:
            return ImageSet(self.labels[indices], images=self.images[indices])
        return ImageSet(self.labels[indices], paths=[self.paths[i] for i in indices.tolist()],
                        image_size=self.image_size, channels=self.channels)


def decode_image(path: str, size: int, channels: int) -> torch.Tensor:
    """One image file -> uint8 (C, size, size): shorter side to size (antialiased), centred square crop."""
    from PIL import Image, ImageOps

    mode = "RGB" if channels == 3 else "L"
    try:
        with Image.open(path) as img:
            img.draft(mode, (size, size))  # JPEG: decode at the smallest 1/2^k scale still >= size (much faster)
            fitted = ImageOps.fit(img.convert(mode), (size, size), method=Image.Resampling.BILINEAR)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise undecodable(path, error) from None
    array = np.asarray(fitted, dtype=np.uint8).reshape(size, size, channels)  # (S, S, C)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()  # (C, S, S)


def _at_size(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size) (unchanged when already that size); chunked."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    return torch.cat([resize_square(images[i:i + chunk], size) for i in range(0, len(images), chunk)])


def undecodable(path: str, error: Exception) -> UserError:
    """The one sentence for an image file that cannot be opened or decoded (here, and splits.check_image_files)."""
    return UserError(f"image file '{path}' cannot be decoded ({type(error).__name__}); remove or replace it.")


def _corrupt(path: Path | str, what: str) -> UserError:
    return UserError(f"data file '{path}' {what}; replace it with a good copy (or delete it and let the download "
                     "fetch it again).")


# -- readers ------------------------------------------------------------------------------------------

def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it ends in .gz; one sentence when it cannot be read or is not gzip."""
    found = paths.kind(path)
    if found not in ("a regular file", "missing"):  # a named pipe would block the read below until a writer came
        raise _corrupt(path, f"is {found}, not a regular file")
    try:
        if str(path).endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise _corrupt(path, f"is not a complete gzip file ({type(error).__name__})") from None
    except OSError as error:
        raise _corrupt(path, f"cannot be read ({error.strerror or type(error).__name__})") from None


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzip or plain) of unsigned bytes: magic 0x0000 08 <rank>, rank big-endian sizes, data."""
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise _corrupt(path, "is not an idx file of unsigned bytes (bad magic number)")
    rank = data[3]
    if len(data) < 4 + 4 * rank:
        raise _corrupt(path, "is truncated (its header is incomplete)")
    dims = [int(d) for d in np.frombuffer(data, dtype=">u4", count=rank, offset=4)]
    count = int(np.prod(dims))
    if len(data) != 4 + 4 * rank + count:
        raise _corrupt(path, f"is truncated or corrupt: expected {count} values of shape {dims}")
    return np.frombuffer(data, dtype=np.uint8, count=count, offset=4 + 4 * rank).reshape(dims)


def _check_images_and_labels(folder: Path, images: np.ndarray, labels: np.ndarray, num_classes: int,
                             image_shape: tuple[int, ...]) -> None:
    """images (N, *image_shape) and labels (N,) in [0, num_classes), or one sentence naming the files."""
    if tuple(images.shape[1:]) != image_shape or labels.ndim != 1 or len(labels) != len(images):
        raise _corrupt(folder, f"holds images of shape {tuple(images.shape)} and labels of shape {labels.shape}, "
                               f"not (N, {', '.join(map(str, image_shape))}) and (N,)")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise _corrupt(folder, f"holds labels outside 0..{num_classes - 1}")


def read_fashion_mnist(folder: Path) -> tuple[ImageSet, ImageSet]:
    """(train, test) from the four idx files in folder (gzipped or not); images (N, 1, 28, 28)."""
    train_x, train_y, test_x, test_y = (read_idx(_idx_file(folder, name)) for name in FASHION_FILES)
    sets = []
    for x, y in ((train_x, train_y), (test_x, test_y)):
        _check_images_and_labels(folder, x, y, NUM_CLASSES["fashion_mnist"], (28, 28))
        sets.append(ImageSet(torch.from_numpy(y.astype(np.int64)), images=torch.from_numpy(x.copy()).unsqueeze(1)))
    return sets[0], sets[1]


def _idx_file(folder: Path, name: str) -> Path:
    """name.gz, or the un-gzipped copy torchvision's download also leaves."""
    path = folder / name
    return path if path.exists() else folder / name.removesuffix(".gz")


def read_cifar(folder: Path, dataset: str) -> tuple[ImageSet, ImageSet]:
    """(train, test) from torchvision's on-disk CIFAR folder; images (N, 3, 32, 32).

    Each file is a pickled dict with b'data', uint8 (N, 3072) rows of three 32x32 row-major planes
    (R, G, B), and the labels under b'labels' (CIFAR-10) or b'fine_labels' (CIFAR-100).
    """
    train_files, test_files, label_key = CIFAR_FILES[dataset]

    def read(names: list[str]) -> ImageSet:
        batches = [read_batch(folder / name) for name in names]
        try:
            pixels = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])  # (N, 3072)
            labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64).reshape(-1) for b in batches])
        except (KeyError, ValueError, TypeError) as error:
            raise _corrupt(folder, f"holds a CIFAR batch without readable {label_key!r} or b'data' "
                                   f"({type(error).__name__})") from None
        _check_images_and_labels(folder, pixels, labels, NUM_CLASSES[dataset], (3072,))
        images = torch.from_numpy(pixels.reshape(-1, 3, 32, 32).copy())  # (N, 3, 32, 32)
        return ImageSet(torch.from_numpy(labels), images=images)

    return read(train_files), read(test_files)


def read_imagefolder(folder: Path, image_size: int, channels: int) -> tuple[ImageSet, ImageSet, int]:
    """(train, test, num_classes) from train/ and val/ class folders; val uses train's class indices."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    try:
        train = ImageFolder(str(folder / "train"))
    except OSError as error:  # e.g. a class folder without images
        first = str(error).splitlines()[0].split(". ")[0] if str(error).strip() else type(error).__name__
        raise UserError(f"image folder '{folder / 'train'}' is not usable ({first}); give every class folder at "
                        "least one image.") from None
    if len(train.classes) < 2:  # one class: every readout would score 100% and mean nothing
        raise UserError(f"image folder '{folder / 'train'}' holds {len(train.classes)} class folder "
                        f"({', '.join(train.classes)}); the readouts classify, so give it at least 2 classes, one "
                        "folder each.")
    val = make_dataset(str(folder / "val"), train.class_to_idx, IMG_EXTENSIONS, allow_empty=True)
    if not val:
        raise UserError(f"image folder '{folder / 'val'}' holds no images of train/'s classes; it is the test "
                        "split, so put the held-out images there, one folder per class.")
    for path, _ in [*train.samples, *val]:  # listed by name only: a named pipe called x.png would block its decode
        found = paths.kind(path)
        if found != "a regular file":
            raise UserError(f"image file '{path}' is {found}, not a regular file; remove or replace it.")

    def image_set(samples: list[tuple[str, int]]) -> ImageSet:
        labels = torch.tensor([label for _, label in samples], dtype=torch.long)
        return ImageSet(labels, paths=[path for path, _ in samples], image_size=image_size, channels=channels)

    return image_set(train.samples), image_set(val), len(train.classes)


def synthetic(image_size: int, channels: int, seed: int = 0, n_train: int = 2000, n_test: int = 500,
              num_classes: int = 10) -> tuple[ImageSet, ImageSet]:
    """Class templates (random 4x4 patterns upsampled: they survive crops and blur) plus pixel noise."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, channels, 4, 4, generator=generator)  # (K, C, 4, 4)
    templates = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False) * 255

    def draw(n: int) -> ImageSet:
        labels = torch.arange(n) % num_classes
        noise = torch.randn(n, channels, image_size, image_size, generator=generator) * 30
        return ImageSet(labels, images=(templates[labels] + noise).round().clamp(0, 255).to(torch.uint8))

    return draw(n_train), draw(n_test)


# -- finding and downloading data ------------------------------------------------------------------------

def download_dir() -> Path:
    """Where downloads go when neither a root nor $HAMJEPA_DATA is given (searched too)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hamjepa"


def candidate_folders(dataset: str, root: str = "") -> list[Path]:
    """Where we look, in order: root (--data-root), $HAMJEPA_DATA, Debian's package folder, download_dir().

    A root, when given, is the only place: a typo in it must not quietly train on a copy found elsewhere.
    """
    if root:
        folder = Path(root).expanduser()
        paths.check_length("config field 'data.root' (--data-root)", folder)
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "does not exist"
            raise DatasetNotFoundError(f"config field 'data.root' (--data-root) = '{root}' is invalid: it {what}; "
                                       f"pass the folder that holds the {dataset} dataset.")
        return [folder]
    folders = [Path(p).expanduser() for p in (os.environ.get("HAMJEPA_DATA", ""),) if p]
    if folders:
        paths.check_length("$HAMJEPA_DATA", folders[0])
    if folders and folders[0].exists() and not folders[0].is_dir():  # absent is fine: downloads create it
        raise DatasetNotFoundError(f"$HAMJEPA_DATA = '{folders[0]}' is invalid: it is not a folder; point it at the "
                                   "folder that holds the datasets, or unset it.")
    if dataset in DEBIAN_DIRS:
        folders.append(DEBIAN_DIRS[dataset])
    folders.append(download_dir())
    return list(dict.fromkeys(folders))


def _layouts(dataset: str) -> tuple[list[str], list[str]]:
    """(sub-folders to try under a candidate, files that must all be there) for a dataset."""
    if dataset == "fashion_mnist":
        return ["", "fashion-mnist", "FashionMNIST/raw"], list(FASHION_FILES)
    if dataset in CIFAR_FOLDERS:
        train, test, _ = CIFAR_FILES[dataset]
        return [CIFAR_FOLDERS[dataset], ""], train + test
    return [""], ["train", "val"]


def find_dataset(dataset: str, folders: Sequence[Path]) -> Path | None:
    """The first candidate folder (or its known sub-folder) that holds every file of the dataset."""
    subs, files = _layouts(dataset)
    for folder in folders:
        for sub in subs:
            base = folder / sub if sub else folder
            if all((base / f).exists() or (base / f.removesuffix(".gz")).exists() for f in files):
                return base
    return None


def _download(dataset: str, target: Path) -> None:
    """torchvision downloads into target (it skips files already there and checks their MD5)."""
    import torchvision.datasets as tvd

    target.mkdir(parents=True, exist_ok=True)
    cls = {"fashion_mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[dataset]
    for train in (True, False):
        cls(str(target), train=train, download=True)


def locate(dataset: str, root: str = "", download: bool = True) -> Path:
    """The folder holding the dataset's files; downloads when allowed; else DatasetNotFoundError."""
    folders = candidate_folders(dataset, root)
    found = find_dataset(dataset, folders)
    if found is not None:
        return found
    if dataset not in NUM_CLASSES:  # imagefolder: nothing to download
        raise _not_found(dataset, folders, "cannot be downloaded")
    if not download:
        raise _not_found(dataset, folders, "downloads are off (data.download = false)")
    target = Path(root).expanduser() if root else Path(os.environ.get("HAMJEPA_DATA") or download_dir())
    try:
        _download(dataset, target)
    except Exception as error:  # noqa: BLE001 - any failure (no network, disk, bad MD5) becomes the one sentence
        raise _not_found(dataset, folders, f"the download into {target} failed ({type(error).__name__})") from None
    found = find_dataset(dataset, [target])
    if found is None:
        raise _not_found(dataset, folders, f"the download into {target} left no readable copy")
    return found


def load_full(cfg: DataConfig, channels: int, root: str | None = None) -> tuple[ImageSet, ImageSet, int]:
    """(train, test, num_classes): the dataset's full training and test sets at cfg.image_size."""
    if cfg.dataset == "synthetic":
        train, test = synthetic(cfg.image_size, channels, seed=cfg.seed)
        return train, test, 10
    folder = locate(cfg.dataset, cfg.root if root is None else root, cfg.download)
    if cfg.dataset == "imagefolder":
        return read_imagefolder(folder, cfg.image_size, channels)
    train, test = read_fashion_mnist(folder) if cfg.dataset == "fashion_mnist" else read_cifar(folder, cfg.dataset)
    if train.channels != channels:
        raise ConfigError(f"config field 'encoder.in_channels' = {channels} is invalid: dataset '{cfg.dataset}' "
                          f"has {train.channels} channel(s).")
    resized = [ImageSet(s.labels, images=_at_size(s.images, cfg.image_size)) for s in (train, test)]
    return resized[0], resized[1], NUM_CLASSES[cfg.dataset]
