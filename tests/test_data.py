"""Datasets: the readers on files in the exact on-disk formats, the not-found sentence, subsets and splits."""

import dataclasses
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from hamjepa.config import AugmentConfig, ConfigError, DataConfig
from hamjepa.data import sources as data
from hamjepa.data.augment import Augmentation, Normalise
from hamjepa.data.feeds import (
    CPU_AUTO_PLACEMENT,
    LoaderFeed,
    ResidentFeed,
    StreamFeed,
    TwoViewDataset,
    augment_placement,
    shard_indices,
    two_view_feed,
)
from hamjepa.data.sources import DatasetNotFoundError, ImageSet
from hamjepa.data.splits import (
    KNOWN_STATS,
    check_image_files,
    load_splits,
    split_digest,
    split_indices,
    stratified_indices,
)
from hamjepa.errors import UserError

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _no_ambient_data(tmp_path, monkeypatch):
    """No test sees the machine's $HAMJEPA_DATA, download cache or Debian packages unless it asks."""
    monkeypatch.delenv("HAMJEPA_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "DEBIAN_DIRS", {"fashion_mnist": tmp_path / "no-debian-package"})


# -- writers of the on-disk formats ----------------------------------------------------------------------

def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def write_fashion(folder: Path, n_train: int = 30, n_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte.gz": np.arange(n_train) % 10,
              "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte.gz": (np.arange(n_test) * 7) % 10}
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(folder / name, array)
    return arrays


def write_cifar_file(path: Path, pixels: np.ndarray, labels: list[int], label_key: bytes) -> None:
    record = {b"batch_label": b"test batch", label_key: labels, b"data": pixels, b"filenames": [b"x.png"] * len(labels)}
    if label_key == b"fine_labels":
        record[b"coarse_labels"] = [label // 5 for label in labels]
    with open(path, "wb") as handle:
        pickle.dump(record, handle, protocol=2)


def write_cifar(root: Path, dataset: str, per_file: int = 12, seed: int = 0) -> dict[str, tuple[np.ndarray, list]]:
    """Files in torchvision's layout; returns {file name: (pixels (N, 3072), labels)}."""
    rng = np.random.default_rng(seed)
    folder = root / data.CIFAR_FOLDERS[dataset]
    folder.mkdir(parents=True)
    train, test, key = data.CIFAR_FILES[dataset]
    classes = data.NUM_CLASSES[dataset]
    written = {}
    for name in train + test:
        pixels = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, classes, per_file)]
        write_cifar_file(folder / name, pixels, labels, key)
        written[name] = (pixels, labels)
    return written


# -- readers ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_reader_round_trips_pixels_and_labels(tmp_path, dataset):
    written = write_cifar(tmp_path, dataset)
    train, test = data.read_cifar(tmp_path / data.CIFAR_FOLDERS[dataset], dataset)
    train_names, test_names, _ = data.CIFAR_FILES[dataset]
    pixels = np.concatenate([written[n][0] for n in train_names])
    labels = sum((written[n][1] for n in train_names), [])
    assert train.images.shape == (12 * len(train_names), 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and train.labels.tolist() == labels
    # b'data' rows are three row-major 32x32 planes: R, G, B
    i, c, y, x = 5, 2, 7, 30
    assert train.images[i, c, y, x].item() == pixels[i, c * 1024 + y * 32 + x]
    assert np.array_equal(train.images.reshape(len(train), -1).numpy(), pixels)
    assert np.array_equal(test.images.reshape(len(test), -1).numpy(), written[test_names[0]][0])
    assert test.labels.tolist() == written[test_names[0]][1]


def test_cifar100_through_load_splits(tmp_path):
    write_cifar(tmp_path, "cifar100", per_file=200)
    splits = load_splits(DataConfig(dataset="cifar100", root=str(tmp_path), download=False, val_size=20),
                         channels=3)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (180, 20, 200)
    assert splits.num_classes == 100 and splits.channels == 3 and splits.image_size == 32
    assert splits.mean == KNOWN_STATS["cifar100"][0]


def test_a_test_limit_keeps_a_stratified_seeded_part_of_the_test_split(tmp_path):
    write_cifar(tmp_path, "cifar10", per_file=200)
    config = DataConfig(dataset="cifar10", root=str(tmp_path), download=False, val_size=20)
    whole = load_splits(config, channels=3).test
    part = load_splits(dataclasses.replace(config, test_limit=50), channels=3).test
    assert len(whole) == 200 and len(part) == 50
    share = torch.bincount(whole.labels, minlength=10).double() * 50 / 200  # each class keeps its share
    assert (torch.bincount(part.labels, minlength=10) - share).abs().max() < 1
    rows = {tuple(x.flatten().tolist()) for x in whole.images}
    assert all(tuple(x.flatten().tolist()) in rows for x in part.images)  # test images, not others
    assert torch.equal(load_splits(dataclasses.replace(config, test_limit=50), channels=3).test.labels, part.labels)
    assert torch.equal(load_splits(dataclasses.replace(config, test_limit=201), channels=3).test.labels,
                       whole.labels)  # a limit above the split's size keeps all of it


def test_fashion_mnist_reader_on_written_idx_files(tmp_path):
    arrays = write_fashion(tmp_path / "fm")
    train, test = data.read_fashion_mnist(tmp_path / "fm")
    assert train.images.shape == (30, 1, 28, 28) and test.images.shape == (20, 1, 28, 28)
    assert np.array_equal(train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte.gz"])
    assert train.labels.tolist() == arrays["train-labels-idx1-ubyte.gz"].tolist()
    assert test.labels.tolist() == arrays["t10k-labels-idx1-ubyte.gz"].tolist()


def test_fashion_mnist_found_through_hamjepa_data_and_resized_on_load(tmp_path, monkeypatch):
    arrays = write_fashion(tmp_path / "env" / "fashion-mnist", n_train=100)
    monkeypatch.setenv("HAMJEPA_DATA", str(tmp_path / "env"))
    splits = load_splits(DataConfig(dataset="fashion_mnist", image_size=28, download=False, val_size=10), channels=1)
    assert (len(splits.train), len(splits.val), splits.num_classes) == (90, 10, 10)
    assert splits.mean == (0.2860,) and splits.std == (0.3530,)
    full = torch.cat([splits.train.images, splits.val.images])
    assert sorted(full.flatten().tolist()) == sorted(arrays["train-images-idx3-ubyte.gz"].flatten().tolist())
    bigger = load_splits(DataConfig(dataset="fashion_mnist", image_size=32, download=False, val_size=10), channels=1)
    assert bigger.train.images.shape[1:] == (1, 32, 32) and bigger.test.images.shape == (20, 1, 32, 32)


def test_hamjepa_data_naming_a_file_is_refused_not_passed_over(tmp_path, monkeypatch):
    """A $HAMJEPA_DATA that is a file is a mistake to say, not a place to skip on the way to another copy;
    one that does not exist yet is where a download goes."""
    (tmp_path / "datasets.txt").write_text("not a folder")
    monkeypatch.setenv("HAMJEPA_DATA", str(tmp_path / "datasets.txt"))
    with pytest.raises(DatasetNotFoundError, match=r"^\$HAMJEPA_DATA = '.*datasets.txt' is invalid: it is not a "
                                                   r"folder; .*unset it\.$"):
        data.candidate_folders("fashion_mnist")
    monkeypatch.setenv("HAMJEPA_DATA", str(tmp_path / "later"))
    assert data.candidate_folders("fashion_mnist")[0] == tmp_path / "later"


def test_truncated_idx_file_is_refused(tmp_path):
    path = tmp_path / "bad.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + bytes(5))
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(path)


@pytest.mark.skipif(not all((DEBIAN_FASHION / f).exists() for f in data.FASHION_FILES),
                    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
def test_debian_fashion_mnist():
    train, test = data.read_fashion_mnist(DEBIAN_FASHION)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    mean = train.images.double().mean().item() / 255
    assert mean == pytest.approx(KNOWN_STATS["fashion_mnist"][0][0], abs=1e-3)


# -- not found ---------------------------------------------------------------------------------------------

def _assert_one_sentence(message: str) -> None:
    assert message.endswith(".") and message.count(". ") == 0 and "\n" not in message


def test_missing_dataset_without_download_names_the_fix(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError) as caught:
        load_splits(DataConfig(dataset="fashion_mnist", root=str(tmp_path / "empty"), download=False), channels=1)
    message = str(caught.value)
    _assert_one_sentence(message)
    assert "'fashion_mnist'" in message and str(tmp_path / "empty") in message
    assert "apt-get install dataset-fashion-mnist" in message and "--data-root DIR" in message
    assert isinstance(caught.value, UserError)  # the CLI prints UserErrors without a traceback


@pytest.mark.parametrize("dataset", ["fashion_mnist", "cifar100"])
def test_failed_download_becomes_the_sentence(tmp_path, monkeypatch, dataset):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    for name in ("FashionMNIST", "CIFAR10", "CIFAR100"):
        monkeypatch.setattr(torchvision.datasets, name, offline)
    (tmp_path / "root").mkdir()
    with pytest.raises(DatasetNotFoundError) as caught:
        load_splits(DataConfig(dataset=dataset, root=str(tmp_path / "root"), download=True), channels=1 + 2 * (
            dataset != "fashion_mnist"))
    message = str(caught.value)
    _assert_one_sentence(message)
    assert "download" in message and "failed (OSError)" in message and "--data-root DIR" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_a_given_root_is_the_only_place_looked(tmp_path, monkeypatch):
    """--data-root that does not exist is refused, never replaced by a copy found through $HAMJEPA_DATA."""
    write_fashion(tmp_path / "env")
    monkeypatch.setenv("HAMJEPA_DATA", str(tmp_path / "env"))
    with pytest.raises(DatasetNotFoundError, match="'data.root' .* does not exist"):
        load_splits(DataConfig(dataset="fashion_mnist", image_size=28, root=str(tmp_path / "typo")), channels=1)
    (tmp_path / "typo").mkdir()
    with pytest.raises(DatasetNotFoundError, match="was not found in " + str(tmp_path / "typo") + " and"):
        load_splits(DataConfig(dataset="fashion_mnist", image_size=28, root=str(tmp_path / "typo"), download=False),
                    channels=1)


@pytest.mark.parametrize("content,words", [
    (b"plain bytes", r"not a complete gzip file \(BadGzipFile\)"),
    (gzip.compress(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + bytes(10))[:-9], "not a complete gzip file"),
    (gzip.compress(bytes([0, 0, 9, 1]) + struct.pack(">I", 2) + bytes(2)), "bad magic number"),
    (gzip.compress(bytes([0, 0, 8, 3])), "header is incomplete"),
])
def test_broken_idx_files_are_one_sentence(tmp_path, content, words):
    path = tmp_path / "x-idx1-ubyte.gz"
    path.write_bytes(content)
    with pytest.raises(UserError, match=words) as caught:
        data.read_idx(path)
    message = str(caught.value)
    assert str(path) in message and message.endswith(".") and "\n" not in message


def test_fashion_files_of_the_wrong_shape_are_refused(tmp_path):
    write_fashion(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(19) % 10)  # 20 test images, 19 labels
    with pytest.raises(UserError, match=r"labels of shape \(19,\)"):
        data.read_fashion_mnist(tmp_path)


def test_image_files_are_checked_before_the_run(tmp_path):
    """Every file's header is opened by check_image_files (preflight); a bad one is named."""
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("ant", "bee"):  # two classes: one is refused (tests/test_bad_inputs.py)
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (10, 10)).save(tmp_path / split / cls / f"{i}.png")
    (tmp_path / "val" / "ant" / "2.png").write_bytes(b"GIF89a but not really")
    splits = load_splits(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=8, val_size=0),
                         channels=3)
    with pytest.raises(UserError, match="'.*val/ant/2.png' cannot be decoded"):
        check_image_files(splits)


def test_missing_image_folder_names_the_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="train/ and val/ with one folder of images per class"):
        load_splits(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16), channels=3)


# -- subsets and splits ------------------------------------------------------------------------------------

def test_stratified_subset_keeps_class_proportions_and_is_seeded():
    labels = torch.cat([torch.full((500,), 0), torch.full((300,), 1), torch.full((200,), 2)])[torch.randperm(1000)]
    chosen = stratified_indices(labels, 100, torch.Generator().manual_seed(1))
    assert torch.bincount(labels[chosen]).tolist() == [50, 30, 20]
    assert len(set(chosen.tolist())) == 100
    again = stratified_indices(labels, 100, torch.Generator().manual_seed(1))
    other = stratified_indices(labels, 100, torch.Generator().manual_seed(2))
    assert torch.equal(chosen, again) and not torch.equal(chosen, other)
    # largest remainders: 7 of (500, 300, 200) -> exact (3.5, 2.1, 1.4) -> (4, 2, 1)
    assert torch.bincount(labels[stratified_indices(labels, 7, torch.Generator())]).tolist() == [4, 2, 1]


def test_validation_held_out_first_then_the_training_subset_from_the_rest():
    labels = torch.arange(10).repeat_interleave(100)  # 10 classes x 100
    train, val = split_indices(labels, subset=300, val_size=500, seed=3)  # a validation split larger than training
    assert (len(train), len(val)) == (300, 500)
    assert not set(train.tolist()) & set(val.tolist())  # never trains on a validation image
    assert torch.bincount(labels[train]).tolist() == [30] * 10 and torch.bincount(labels[val]).tolist() == [50] * 10
    same = split_indices(labels, subset=300, val_size=500, seed=3)
    other = split_indices(labels, subset=300, val_size=500, seed=4)
    assert torch.equal(train, same[0]) and torch.equal(val, same[1]) and not torch.equal(val, other[1])
    assert torch.equal(split_indices(labels, subset=100, val_size=500, seed=3)[1], val)  # the subset leaves val be
    everything, none = split_indices(labels, subset=0, val_size=0, seed=0)
    assert len(everything) == 1000 and len(none) == 0
    rest, held = split_indices(labels, subset=0, val_size=100, seed=0)
    assert len(rest) == 900 and len(held) == 100


def test_synthetic_splits():
    splits = load_splits(DataConfig(dataset="synthetic", image_size=16, subset=800, val_size=200), channels=3)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (800, 200, 500)
    assert splits.train.images.shape == (800, 3, 16, 16) and splits.train.images.dtype == torch.uint8
    assert torch.bincount(splits.val.labels).tolist() == [20] * 10
    pixels = splits.train.images.double() / 255
    assert splits.mean == pytest.approx(pixels.mean(dim=(0, 2, 3)).tolist())
    assert splits.std == pytest.approx(pixels.std(dim=(0, 2, 3)).tolist(), rel=1e-3)
    with pytest.raises(ConfigError, match="data.subset.*at most 1800 can train"):
        load_splits(DataConfig(dataset="synthetic", subset=1900, val_size=200), channels=3)
    with pytest.raises(ConfigError, match="data.val_size"):
        load_splits(DataConfig(dataset="synthetic", val_size=2000), channels=3)


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, classes in (("train", ("ant", "bee", "cat")), ("val", ("ant", "cat"))):
        for cls in classes:
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(4):
                array = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)  # 30 high, 40 wide
                Image.fromarray(array).save(tmp_path / split / cls / f"{i}.png")
    splits = load_splits(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16, val_size=3),
                         channels=3)
    assert splits.num_classes == 3 and (len(splits.train), len(splits.val), len(splits.test)) == (9, 3, 8)
    assert splits.test.labels.tolist() == [0] * 4 + [2] * 4  # val/ keeps train/'s class indices
    batch = splits.train.load([0, 1])
    assert batch.shape == (2, 3, 16, 16) and batch.dtype == torch.uint8
    assert len(splits.mean) == 3 and all(0 < s < 1 for s in splits.std)


# -- torch datasets ----------------------------------------------------------------------------------------

def test_two_view_batches_through_a_distributed_sampler():
    splits = load_splits(DataConfig(dataset="synthetic", image_size=16, subset=180, val_size=100), channels=1)
    augmentation = Augmentation(AugmentConfig(), splits.image_size, splits.channels, splits.mean, splits.std)
    dataset = TwoViewDataset(splits.train, augmentation)
    sampler = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=0, drop_last=True)
    batches = list(DataLoader(dataset, batch_size=32, sampler=sampler, drop_last=True))
    assert len(batches) == 90 // 32
    view_a, view_b = batches[0]
    assert view_a.shape == view_b.shape == (32, 1, 16, 16) and view_a.dtype == torch.float32
    assert not torch.allclose(view_a, view_b)
    single_a, _ = dataset[3]
    assert single_a.shape == (1, 16, 16)


def test_image_set_needs_one_source():
    with pytest.raises(ValueError):
        ImageSet(torch.zeros(2))


def test_a_split_digest_names_exactly_which_images_train_and_validate():
    base = split_digest("fashion_mnist", [3, 1, 2], [0])
    assert base == split_digest("fashion_mnist", torch.tensor([3, 1, 2]), torch.tensor([0]))  # type-independent
    assert len({base, split_digest("fashion_mnist", [1, 2, 3], [0]), split_digest("fashion_mnist", [3, 1], [2, 0]),
                split_digest("cifar10", [3, 1, 2], [0])}) == 4  # order, membership and dataset all count


# -- feeds: how training batches reach the device (data.augment_on) -----------------------------------------

# Every random step off and whole-image crops: a view is the image on the [0, 1] scale, so it names its image.
IDENTITY = AugmentConfig(crop_scale_min=1.0, crop_scale_max=1.0, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
                         blur_p=0.0, solarize_p=0.0)


def _numbered(n, size=4):
    """ImageSet whose image i is filled with the value i (n <= 256), one channel."""
    pixels = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, size, size).contiguous()
    return ImageSet(torch.arange(n) % 10, images=pixels)


def _which(view):
    """Image indices of identity views (B, 1, S, S) normalised with mean 0, std 1."""
    return (view[:, 0, 0, 0] * 255).round().long().tolist()


@pytest.mark.parametrize("n,world,seed,epoch", [(100, 2, 0, 1), (101, 2, 5, 3), (37, 3, 1, 0), (64, 1, 2, 7)])
def test_shard_indices_are_distributed_samplers(n, world, seed, epoch):
    shards = []
    for rank in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        sampler.set_epoch(epoch)
        shard = shard_indices(n, world, rank, seed, epoch)
        assert shard.tolist() == list(sampler)
        shards.append(set(shard.tolist()))
    assert sum(len(s) for s in shards) == n // world * world == len(set().union(*shards))  # disjoint
    assert not torch.equal(shard_indices(n, world, 0, seed, epoch), shard_indices(n, world, 0, seed,
                                                                                              epoch + 1))


def test_device_resident_feed_has_the_loader_paths_batches_under_two_ranks():
    """Two simulated ranks: the resident feed's batches hold exactly the images of the DataLoader path's batches, in
    the same order, and the ranks' images are disjoint."""
    images, cpu = _numbered(203), torch.device("cpu")
    seen = {}
    for rank in (0, 1):
        batches = {}
        for name, cls in (("device", ResidentFeed), ("loader", LoaderFeed)):
            aug = Augmentation(IDENTITY, 4, 1, (0.0,), (1.0,))
            extra = {} if cls is ResidentFeed else {"num_workers": 0}
            feed = cls(images, aug, 16, 2, rank, seed=3, device=cpu, **extra)
            feed.set_epoch(2, augment_seed=11)
            assert len(feed) == 101 // 16
            batches[name] = [(_which(a), _which(b)) for a, b in feed]
        assert batches["device"] == batches["loader"]
        assert all(a == b for a, b in batches["device"])  # the two views of one step show the same images
        seen[rank] = {i for a, _ in batches["device"] for i in a}
    assert len(seen[0]) == len(seen[1]) == 6 * 16 and not seen[0] & seen[1]


def test_a_seeded_device_resident_epoch_replays_exactly():
    splits = load_splits(DataConfig(dataset="synthetic", image_size=16, subset=270, val_size=100), channels=3)
    cfg = DataConfig(dataset="synthetic", augment_on="device")

    def epoch_views(epoch, augment_seed):
        feed = two_view_feed(splits, AugmentConfig(), cfg, 32, 1, 0, seed=0, device="cpu")
        assert isinstance(feed, ResidentFeed)
        feed.set_epoch(epoch, augment_seed)
        return torch.cat([torch.cat(pair) for pair in feed])

    first = epoch_views(1, 5)
    assert first.shape == (8 * 64, 3, 16, 16)
    assert torch.equal(first, epoch_views(1, 5))
    assert not torch.allclose(first, epoch_views(1, 6))  # another augmentation seed: other views
    assert not torch.allclose(first, epoch_views(2, 5))  # another epoch: another order


def test_which_feed_each_placement_and_dataset_takes(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("ant", "bee"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(10):
                Image.fromarray(np.full((12, 14, 3), 20 * i, dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    folder = load_splits(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=8, val_size=4),
                         channels=3)
    memory = load_splits(DataConfig(dataset="synthetic", image_size=8, subset=100, val_size=100), channels=3)
    expected = {("device", "memory"): ResidentFeed, ("device", "folder"): StreamFeed,
                ("loader", "memory"): LoaderFeed, ("loader", "folder"): LoaderFeed}
    for (placement, kind), cls in expected.items():
        splits = memory if kind == "memory" else folder
        feed = two_view_feed(splits, AugmentConfig(), DataConfig(augment_on=placement, num_workers=0), 4, 1, 0,
                                  seed=0, device="cpu")
        assert type(feed) is cls
        feed.set_epoch(1, 7)
        view_a, view_b = next(iter(feed))
        assert view_a.shape == view_b.shape == (4, 3, 8, 8) and view_a.dtype == torch.float32
    # ImageFolder on the device path: decoded in the loader, augmented after it, seeded like the rest
    stream = two_view_feed(folder, IDENTITY, DataConfig(augment_on="device", num_workers=0), 4, 1, 0, 0, "cpu")
    stream.set_epoch(1, 7)
    batches = list(stream)
    assert len(batches) == len(stream) == 16 // 4
    order = shard_indices(16, 1, 0, 0, 1)[:4]
    expected_first = Normalise(folder.mean, folder.std)(folder.train.load(order))
    assert torch.allclose(batches[0][0], expected_first, atol=1e-5)  # the sampler's first four images


def test_placement_auto_and_its_config_key():
    assert augment_placement("auto", "cpu") == CPU_AUTO_PLACEMENT
    assert augment_placement("auto", torch.device("cuda")) == "device"
    assert augment_placement("loader", torch.device("cuda")) == "loader"
    with pytest.raises(ConfigError) as caught:
        DataConfig(augment_on="gpu")
    message = str(caught.value)
    assert message == "config field 'data.augment_on' = 'gpu' is invalid: must be one of auto, device, loader."
