"""Feeds: the batches a run's model sees, as torch Datasets, DataLoaders and device-side iterators.

Training batches are two independently augmented views of each image; evaluation batches (eval_loader) are the
images normalised, with their labels, in dataset order.

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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from hamjepa.config import AugmentConfig, DataConfig
from hamjepa.data.augment import Augmentation
from hamjepa.data.sources import ImageSet
from hamjepa.data.splits import Splits

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


# -- how training batches reach the device (data.augment_on) --------------------------------------------

# data.augment_on = auto on a CPU: the placement `python -m hamjepa.bench step --part placement` measured faster
# on this project's 2-core machine, at the quick profile's real epoch (4,480 Fashion-MNIST images, batch 128, one
# loader worker; medians of 3 alternating epochs, one run): device 608 images/s, loader 515, 1.18x; data wait 1.8%
# and 2.1% of the epoch. In the loop, augmenting a 28-px batch costs milliseconds of a 200 ms step; a loader worker
# process takes a core from the training's two threads for the whole epoch (docs/results.md, a4b4034).
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
