"""One seed mixer: derived seeds are deterministic, in range, and unrelated across seeds, streams and counters."""

import itertools

import torch

from hamjepa.data import feeds as data
from hamjepa.seeds import Stream, derive


def test_derive_is_deterministic_and_fits_torch_and_the_sampler():
    assert derive(1, Stream.AUGMENT, 3, 0) == derive(1, Stream.AUGMENT, 3, 0)
    values = [derive(seed, stream, epoch) for seed in range(4) for stream in Stream for epoch in range(4)]
    assert all(0 <= v < 2 ** 62 for v in values)  # DistributedSampler adds the epoch: stays below 2**63
    torch.Generator().manual_seed(max(values) + 1000)  # accepted by torch


def test_every_seed_stream_and_counter_gets_its_own_seed():
    inputs = list(itertools.product(range(5), Stream, range(5), range(2)))
    assert len({derive(*parts) for parts in inputs}) == len(inputs)
    # The arithmetic mixers this replaced collided on neighbours: (s, e + 1) vs (s + 1, e) must not.
    assert derive(1, Stream.AUGMENT, 2) != derive(2, Stream.AUGMENT, 1)
    assert derive(1, 2) != derive(2, 1) and derive(0, 1) != derive(1)
    # SeedSequence pads with zero words and splits big integers into 32-bit words: neither may collide here.
    assert derive(5, Stream.AUGMENT) != derive(5, Stream.AUGMENT, 0) != derive(5, Stream.AUGMENT, 0, 0)
    assert derive(0, 1) != derive(2 ** 32) and derive(2 ** 40, 3) != derive(0, 256, 3)


def test_paired_seeds_do_not_share_an_epochs_sample_order():
    """With `seed + epoch` on raw seeds, seed 2's first epoch was seed 1's second; derived seeds are far apart."""
    order = {(seed, epoch): data.shard_indices(1000, 1, 0, derive(seed, Stream.SAMPLE_ORDER), epoch)
             for seed in (1, 2, 3) for epoch in range(4)}
    for (a, b) in itertools.combinations(order, 2):
        assert not torch.equal(order[a], order[b]), (a, b)
