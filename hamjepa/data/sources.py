"""Datasets, seeded stratified subsets, the train / validation / test splits, and torch Datasets over them.

Datasets (DataConfig.dataset):
- fashion_mnist: 28 px grey, 10 classes; the four idx.gz files, read here with gzip + numpy.
- cifar10, cifar100: 32 px RGB, 10 / 100 classes (fine labels); torchvision's on-disk pickle batches
  (`cifar-10-batches-py/`, `cifar-100-python/`), read here with a restricted unpickler that admits only the
  dicts, lists, bytes and numpy arrays those files hold, so a crafted file cannot run code.
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

Images are uint8 (N, C, S, S) tensors stored at the run's size S = data.image_size: in-memory datasets of
another native size are resized once on load (shorter side to S, antialiased, centred square crop), and
folder images are decoded and resized the same way on access. The augmentation can then resample without
antialiasing (augment.py), and the evaluation transform only normalises. The price, for ImageNet-100: training
crops come from the centred square at image_size (a 40% crop is up-sampled), not from the full-resolution
photo as torchvision's RandomResizedCrop would take them; decoding is cheaper, views slightly softer.

Splits, all seeded by data.seed (independent of the training seed, so the splits of a study stay fixed):
1. `subset` training images are drawn first, stratified, from the dataset's full training set;
2. then `val_fraction` of those (stratified) are held out as the validation split, used for tuning;
3. the dataset's own test split is used only for final reporting.
Subset first, so `subset` bounds everything a run touches (a 10,000-image subset with val_fraction 0.1
trains on 9,000 and validates on 1,000), and the validation split has the subset's class balance.

How training batches reach the device (data.augment_on; `two_view_feed` builds the one a run uses; every feed
yields (view_a, view_b) float32 (B, C, S, S) on the training device):
- loader: DataLoader workers load, augment and collate both views on the CPU; the views are copied over.
- device, in-memory datasets (Fashion-MNIST, CIFAR, synthetic): the training images are held once per worker
  as uint8 on the training device; each epoch draws its shard of the order DistributedSampler would give
  (`shard_indices`), batches are sliced on the device and augmented there, in the training loop.
- device, image folders (ImageNet-100; too large to hold at full size on a 24 GB GPU): DataLoader workers
  decode to uint8 at image_size (4x fewer bytes to copy than float views), the uint8 batch is copied over
  and augmented on the device.
Either way the order of a seed and epoch is DistributedSampler's, and the augmentation's randomness comes from
a seed the training loop derives from (seed, epoch, rank), so a resumed epoch replays exactly.

Normalisation (mean, std per channel, 0-1 scale): the published training-set constants for Fashion-MNIST
and CIFAR; computed from the training images for synthetic, and from a seeded sample of STATS_SAMPLE
training images for imagefolder (any channel count; for ImageNet-100 it lands near ImageNet's constants).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from hamjepa.data.augment import Augmentation, Normalise, resize_square
from hamjepa.config import AugmentConfig, ConfigError, DataConfig
from hamjepa.errors import UserError

try:  # CIFAR's pickled arrays; numpy 2 (numpy.core is a deprecated alias there)
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # numpy 1.26
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

DEBIAN_DIRS = {"fashion_mnist": Path("/usr/share/datasets/fashion-mnist")}
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz")
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CIFAR_FILES = {"cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
               "cifar100": (["train"], ["test"], b"fine_labels")}
NUM_CLASSES = {"fashion_mnist": 10, "cifar10": 10, "cifar100": 100}
# Per-channel mean and std on the 0-1 scale, of each dataset's full training split.
KNOWN_STATS = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
STATS_SAMPLE = 256  # imagefolder: training images decoded to estimate the mean and std
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
        raise _undecodable(path, error) from None
    array = np.asarray(fitted, dtype=np.uint8).reshape(size, size, channels)  # (S, S, C)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()  # (C, S, S)


def _at_size(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size) (unchanged when already that size); chunked."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    return torch.cat([resize_square(images[i:i + chunk], size) for i in range(0, len(images), chunk)])


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


def _undecodable(path: str, error: Exception) -> UserError:
    return UserError(f"image file '{path}' cannot be decoded ({type(error).__name__}); remove or replace it.")


def _corrupt(path: Path | str, what: str) -> UserError:
    return UserError(f"data file '{path}' {what}; replace it with a good copy (or delete it and let the download "
                     "fetch it again).")


# -- readers ------------------------------------------------------------------------------------------

def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it ends in .gz; one sentence when it cannot be read or is not gzip."""
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


def _array(subtype, shape, dtype):
    """numpy's pickled-array constructor, for plain ndarrays only (no subclass's __setstate__ runs)."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("an array subclass")
    return _np_reconstruct(np.ndarray, shape, dtype)


def _array_from_buffer(buffer, dtype, shape, order):
    """numpy's constructor for arrays pickled with protocol 5 (contiguous buffer, then reshape)."""
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


def _latin1_bytes(text: str = "", encoding: str = "latin1") -> bytes:
    """How Python 3 pickles bytes for protocol 2 (`_codecs.encode(text, 'latin1')`, `bytes()` when empty)."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError("bytes in an unexpected encoding")
    return text.encode("latin1")


# Every global a CIFAR batch may name, by (module, name) as written in the file (Python 2's cPickle, or
# Python 3 with any protocol, numpy 1 or 2), mapped to what it may build. Anything else is refused.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _array,
    ("numpy._core.multiarray", "_reconstruct"): _array,
    ("numpy.core.numeric", "_frombuffer"): _array_from_buffer,
    ("numpy._core.numeric", "_frombuffer"): _array_from_buffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_bytes,
    ("builtins", "bytes"): _latin1_bytes,
    ("__builtin__", "bytes"): _latin1_bytes,
}


class _RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.qualified = f"{module}.{name}"


class _CifarUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only _CIFAR_GLOBALS: no import, no call of anything else."""

    def find_class(self, module: str, name: str):
        try:
            return _CIFAR_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(module, name) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("a persistent id")


def _unpickle(path: Path) -> dict:
    """A CIFAR batch as a dict, or one sentence (UserError) when the file is anything else."""
    fix = "delete the folder and let the download (data.download = true) fetch the dataset again"
    try:
        with open(path, "rb") as handle:
            batch = _CifarUnpickler(handle, encoding="bytes").load()
    except _RefusedGlobal as refused:
        raise UserError(f"CIFAR file '{path}' was refused without running it: it asks for "
                        f"'{refused.qualified}', which a CIFAR batch never contains; {fix}.") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError) as error:
        raise UserError(f"CIFAR file '{path}' is not a CIFAR batch ({type(error).__name__}); {fix}.") from None
    if not isinstance(batch, dict) or not isinstance(batch.get(b"data"), np.ndarray):
        raise UserError(f"CIFAR file '{path}' is not a CIFAR batch (no b'data' array in a dict); {fix}.")
    return batch


def read_cifar(folder: Path, dataset: str) -> tuple[ImageSet, ImageSet]:
    """(train, test) from torchvision's on-disk CIFAR folder; images (N, 3, 32, 32).

    Each file is a pickled dict with b'data', uint8 (N, 3072) rows of three 32x32 row-major planes
    (R, G, B), and the labels under b'labels' (CIFAR-10) or b'fine_labels' (CIFAR-100).
    """
    train_files, test_files, label_key = CIFAR_FILES[dataset]

    def read(names: list[str]) -> ImageSet:
        batches = [_unpickle(folder / name) for name in names]
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
    val = make_dataset(str(folder / "val"), train.class_to_idx, IMG_EXTENSIONS, allow_empty=True)
    if not val:
        raise UserError(f"image folder '{folder / 'val'}' holds no images of train/'s classes; it is the test "
                        "split, so put the held-out images there, one folder per class.")

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
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "does not exist"
            raise DatasetNotFoundError(f"config field 'data.root' (--data-root) = '{root}' is invalid: it {what}; "
                                       f"pass the folder that holds the {dataset} dataset.")
        return [folder]
    folders = [Path(p).expanduser() for p in (os.environ.get("HAMJEPA_DATA", ""),) if p]
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


# -- subsets and splits -----------------------------------------------------------------------------

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


def split_indices(labels: torch.Tensor, subset: int, val_fraction: float,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices into a full training set: the subset first, then val held out from it."""
    generator = torch.Generator().manual_seed(seed)
    pool = torch.arange(len(labels))
    if subset:
        pool = stratified_indices(labels, subset, generator)
    n_val = round(len(pool) * val_fraction)
    held_out = torch.zeros(len(pool), dtype=torch.bool)
    held_out[stratified_indices(labels[pool], n_val, generator)] = True
    return pool[~held_out], pool[held_out]


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) on the 0-1 scale of uint8 (N, C, H, W) images."""
    pixels = images.double().div(255).transpose(0, 1).reshape(images.shape[1], -1)  # (C, N*H*W)
    return tuple(pixels.mean(1).tolist()), tuple(pixels.std(1).tolist())


def load_splits(cfg: DataConfig, channels: int, root: str | None = None) -> Splits:
    """Train / validation / test splits of a run (module docstring: order, sizes, normalisation).

    channels: the encoder's input channels (1 or 3); root overrides cfg.root.
    """
    train, test, num_classes = load_full(cfg, channels, root)
    if cfg.subset > len(train):
        raise ConfigError(f"config field 'data.subset' = {cfg.subset} is invalid: dataset '{cfg.dataset}' has "
                          f"{len(train)} training images.")
    train_idx, val_idx = split_indices(train.labels, cfg.subset, cfg.val_fraction, cfg.seed)
    val, train = train.subset(val_idx), train.subset(train_idx)
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
                raise _undecodable(path, error) from None


# -- torch datasets -----------------------------------------------------------------------------------

class TwoViewDataset(Dataset):
    """(view_a, view_b), two independent augmentations of each image: float32 (C, S, S) each.

    `__getitems__` augments a whole batch of indices at once (per-sample randomness, see augment.py); the
    DataLoader calls it with each batch from its sampler (e.g. a DistributedSampler) and its default collate
    stacks the pairs into (B, C, S, S) x 2.
    """

    def __init__(self, images: ImageSet, augmentation: Callable[[torch.Tensor], torch.Tensor]):
        self.images, self.augmentation = images, augmentation

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batch = self.images.load(indices)  # uint8 (B, C, S, S)
        view_a, view_b = self.augmentation(batch), self.augmentation(batch)
        return list(zip(view_a.unbind(0), view_b.unbind(0)))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([index])[0]


class LabelledDataset(Dataset):
    """(image, label) through a deterministic batch transform (e.g. Normalise), for feature extraction."""

    def __init__(self, images: ImageSet, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x = self.transform(self.images.load(indices))  # (B, C, S, S)
        return list(zip(x.unbind(0), self.images.labels[torch.as_tensor(indices, dtype=torch.long)].unbind(0)))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([index])[0]


def two_view_dataset(splits: Splits, augment: AugmentConfig) -> TwoViewDataset:
    """The training Dataset of a run: two augmented views of every training image."""
    augmentation = Augmentation(augment, splits.image_size, splits.channels, splits.mean, splits.std)
    return TwoViewDataset(splits.train, augmentation)


def eval_loader(images: ImageSet, splits: Splits, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Un-augmented, normalised (image, label) batches in dataset order."""
    return DataLoader(LabelledDataset(images, splits.normalise()), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers)


# -- how training batches reach the device (data.augment_on) --------------------------------------------

# data.augment_on = auto on a CPU: the placement `python -m hamjepa.bench step --part placement` measured faster
# on this project's 2-core machine, at the quick profile's real epoch (4,480 Fashion-MNIST images, batch 128, one
# loader worker; medians of 3 alternating epochs, one run): device 608 images/s, loader 515, 1.18x; data wait 1.8%
# and 2.1% of the epoch. In the loop, augmenting a 28-px batch costs milliseconds of a 200 ms step; a loader worker
# process takes a core from the training's two threads for the whole epoch (README "Where augmentation runs").
CPU_AUTO_PLACEMENT = "device"


def augment_placement(augment_on: str, device: torch.device | str) -> str:
    """'device' or 'loader': data.augment_on with auto resolved (the device on a GPU; CPU_AUTO_PLACEMENT)."""
    if augment_on != "auto":
        return augment_on
    return CPU_AUTO_PLACEMENT if torch.device(device).type == "cpu" else "device"


def shard_indices(n: int, world: int, rank: int, seed: int, epoch: int) -> torch.Tensor:
    """This rank's share of an epoch's order, int64 (n // world,): DistributedSampler(shuffle=True, drop_last=True).

    The order is torch.randperm(n) from a CPU generator seeded with seed + epoch, cut to a multiple of world,
    and rank r takes every world-th index from r. Drawn on the CPU once per epoch (n indices, about a
    millisecond for 50,000) rather than on the device, whose generator would give another order: a seed then
    means the same sample order whatever data.augment_on is.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    return order[: n // world * world][rank::world]


class _DeviceViews:
    """The two views of uint8 batches already on the device, augmented there with a per-epoch generator."""

    def __init__(self, augmentation: Augmentation, device: torch.device, memory_format: torch.memory_format):
        self.augmentation, self.device, self.memory_format = augmentation, device, memory_format
        self.generator = torch.Generator(device=device)

    def set_seed(self, augment_seed: int) -> None:
        self.generator.manual_seed(augment_seed)

    def views(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, C, S, S) on the device -> two float32 views (B, C, S, S)."""
        view_a = self.augmentation(batch, self.generator)
        view_b = self.augmentation(batch, self.generator)
        return view_a.contiguous(memory_format=self.memory_format), view_b.contiguous(memory_format=self.memory_format)


class ResidentFeed(_DeviceViews):
    """augment_on = device for in-memory images: held on the device as uint8, sliced and augmented there.

    Per epoch a rank iterates len(self) batches of batch_size consecutive indices of its shard_indices, as a
    DataLoader with a DistributedSampler and drop_last would. Nothing per batch goes to or from the host.
    """

    def __init__(self, images: ImageSet, augmentation: Augmentation, batch_size: int, world: int, rank: int,
                 seed: int, device: torch.device, memory_format: torch.memory_format = torch.contiguous_format):
        super().__init__(augmentation, device, memory_format)
        self.images = images.images.to(device)  # uint8 (N, C, S, S): CIFAR-100's 45,000 are 138 MB
        self.batch_size, self.world, self.rank, self.seed = batch_size, world, rank, seed
        self.indices = torch.empty(0, dtype=torch.long, device=device)

    def __len__(self) -> int:
        return len(self.images) // self.world // self.batch_size

    def set_epoch(self, epoch: int, augment_seed: int) -> None:
        self.indices = shard_indices(len(self.images), self.world, self.rank, self.seed, epoch).to(self.device)
        self.set_seed(augment_seed)

    def __iter__(self):
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield self.views(self.images[self.indices[start:start + self.batch_size]])  # (B, C, S, S) uint8


class _Uint8Images(Dataset):
    """uint8 (C, S, S) images for a DataLoader that only decodes (image folders on the device path)."""

    def __init__(self, images: ImageSet):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: Sequence[int]) -> list[torch.Tensor]:
        return list(self.images.load(indices).unbind(0))

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.__getitems__([index])[0]


class _Loaded:
    """A DataLoader over `dataset` with DistributedSampler's order: what both loader-backed feeds share."""

    def __init__(self, dataset: Dataset, batch_size: int, world: int, rank: int, seed: int, num_workers: int,
                 device: torch.device):
        self.sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                          drop_last=True)
        self.loader_generator = torch.Generator()  # seeds the workers' RNGs (torch draws their base seed from it)
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, drop_last=True,
                                 num_workers=num_workers, pin_memory=device.type == "cuda",
                                 generator=self.loader_generator, persistent_workers=False)

    def __len__(self) -> int:
        return len(self.loader)


class StreamFeed(_Loaded, _DeviceViews):
    """augment_on = device for image folders: workers decode uint8 batches, the device augments them."""

    def __init__(self, images: ImageSet, augmentation: Augmentation, batch_size: int, world: int, rank: int,
                 seed: int, num_workers: int, device: torch.device,
                 memory_format: torch.memory_format = torch.contiguous_format):
        _Loaded.__init__(self, _Uint8Images(images), batch_size, world, rank, seed, num_workers, device)
        _DeviceViews.__init__(self, augmentation, device, memory_format)

    def set_epoch(self, epoch: int, augment_seed: int) -> None:
        self.sampler.set_epoch(epoch)
        self.loader_generator.manual_seed(augment_seed)
        self.set_seed(augment_seed)

    def __iter__(self):
        for batch in self.loader:  # uint8 (B, C, S, S), pinned on CUDA
            yield self.views(batch.to(self.device, non_blocking=True))


class LoaderFeed(_Loaded):
    """augment_on = loader: DataLoader workers augment (TwoViewDataset); the float views are copied over.

    Randomness: each worker's RNG, seeded by torch from loader_generator (augment_seed), or, without workers,
    torch's global RNG, which the training loop seeds per epoch.
    """

    def __init__(self, images: ImageSet, augmentation: Augmentation, batch_size: int, world: int, rank: int,
                 seed: int, num_workers: int, device: torch.device,
                 memory_format: torch.memory_format = torch.contiguous_format):
        super().__init__(TwoViewDataset(images, augmentation), batch_size, world, rank, seed, num_workers, device)
        self.device, self.memory_format = device, memory_format

    def set_epoch(self, epoch: int, augment_seed: int) -> None:
        self.sampler.set_epoch(epoch)
        self.loader_generator.manual_seed(augment_seed)

    def __iter__(self):
        for view_a, view_b in self.loader:
            yield (view_a.to(self.device, non_blocking=True, memory_format=self.memory_format),
                   view_b.to(self.device, non_blocking=True, memory_format=self.memory_format))


def two_view_feed(splits: Splits, augment: AugmentConfig, data_cfg: DataConfig, batch_size: int, world: int,
                  rank: int, seed: int, device: torch.device | str,
                  channels_last: bool = False) -> ResidentFeed | StreamFeed | LoaderFeed:
    """The training batches of one worker: batch_size images (two views each) per step, on `device`.

    Which feed follows data_cfg.augment_on (module docstring); seed fixes the sample order with the epoch.
    `channels_last` (compute.channels_last) gives the views in NHWC memory format.
    """
    device = torch.device(device)
    augmentation = Augmentation(augment, splits.image_size, splits.channels, splits.mean, splits.std)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    common = dict(batch_size=batch_size, world=world, rank=rank, seed=seed, device=device,
                  memory_format=memory_format)
    if augment_placement(data_cfg.augment_on, device) == "loader":
        return LoaderFeed(splits.train, augmentation, num_workers=data_cfg.num_workers, **common)
    if splits.train.images is not None:
        return ResidentFeed(splits.train, augmentation, **common)
    return StreamFeed(splits.train, augmentation, num_workers=data_cfg.num_workers, **common)
