"""Two-view augmentation throughput through the training DataLoader, in images/s (two views per image).

Random uint8 images in memory, the training Dataset (data.feeds.TwoViewDataset with augment.Augmentation at the
paper's settings), shuffled batches, the worker count training uses (DataConfig.num_workers). Timing starts
when the first batch arrives, so worker start-up is left out. For reference, the same in the main process
on one thread, per second of CPU time: the cost per core that training's DataLoader workers take from the
model, and a figure that other load on the machine does not change.
"""

from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader

from hamjepa import checks
from hamjepa.arguments import Parser
from hamjepa.config import AugmentConfig, DataConfig
from hamjepa.config.sections import MAX_BATCH
from hamjepa.data.augment import Augmentation
from hamjepa.data.feeds import TwoViewDataset
from hamjepa.data.sources import ImageSet

SETTINGS = (("32 px RGB (CIFAR)", 3, 32), ("28 px grey (Fashion-MNIST)", 1, 28))


def throughput(channels: int, size: int, images: int, batch_size: int, workers: int,
               clock=time.perf_counter) -> float:
    """Two-view images per second of `clock` (wall time, or CPU time of this process), steady state."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (images, channels, size, size), dtype=torch.uint8, generator=generator)
    dataset = TwoViewDataset(ImageSet(torch.zeros(images, dtype=torch.long), images=pixels),
                             Augmentation(AugmentConfig(), size, channels, (0.5,) * channels, (0.25,) * channels))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers)
    batches = iter(loader)
    next(batches)
    started, count = clock(), 0
    for view_a, _ in batches:
        count += len(view_a)
    return count / (clock() - started)


def main(argv: list[str]) -> None:
    parser = Parser(prog="python -m hamjepa.bench augment", description=__doc__)
    parser.add_argument("--workers", type=int, default=DataConfig().num_workers, help="DataLoader worker processes")
    parser.add_argument("--images", type=int, default=20480, help="images per measurement")
    parser.add_argument("--batch", type=int, default=256, help="images per batch")
    args = parser.parse_args(argv)
    checks.integer("--workers", args.workers, 0)
    checks.integer("--batch", args.batch, 1, MAX_BATCH)
    checks.integer("--images", args.images, 2 * args.batch)  # twice --batch: the first batch is not timed

    threads = torch.get_num_threads()
    print(f"two-view augmentation: {args.images} images, batch {args.batch}, torch {torch.__version__}")
    for name, channels, size in SETTINGS:
        with_workers = throughput(channels, size, args.images, args.batch, args.workers)
        torch.set_num_threads(1)
        try:
            per_cpu_second = throughput(channels, size, args.images, args.batch, 0, clock=time.process_time)
        finally:
            torch.set_num_threads(threads)
        print(f"  {name:28s} {with_workers:8,.0f} images/s with {args.workers} worker(s); "
              f"{per_cpu_second:8,.0f} images per CPU-second in the main process on 1 thread")
