"""The random streams of a training run derive from its one seed (config field `seed`) through `derive`.

Why one mixer: streams derived by arithmetic on the seed overlap across seeds (with `seed + epoch`, seed 2's
first epoch is seed 1's second), and paired seeds must be independent draws. `derive` hashes the seed, a named
stream and its counters with numpy's SeedSequence, so nearby seeds and counters give unrelated 62-bit seeds
(62 bits: torch's DistributedSampler adds the epoch to its seed, which must stay below 2**63).

Two arms of a paired comparison share a seed and therefore every stream below: data order, augmentation and
initial weights are the same, only the method differs (docs/design.md, "Data flow of a study", Pairing). Seeded
from the raw seeds directly, on purpose: the initial weights (`torch.manual_seed(seed)`, one draw), the evaluation
(linear probe and spectrum subsample, `seed`) and the data split (`data.seed`, fixed across training seeds).
"""

from __future__ import annotations

import enum

import numpy as np


class Stream(enum.IntEnum):
    """The named random streams of a training run."""

    SAMPLE_ORDER = 1  # the epoch's order of training images (DistributedSampler's seed; it adds the epoch)
    AUGMENT = 2  # the two-view augmentation, per (epoch, rank)
    TORCH_GLOBAL = 3  # torch's global RNG, reseeded per (epoch, rank): augmentation in a worker-less loader
    PROJECTION_Q = 4  # the spectral floor's random projections of q, redrawn every spectral_redraw_every steps
    PROJECTION_P = 5  # ... and of p, independent of q's
    SIGREG_DIRECTIONS = 6  # SIGReg's random directions, fresh every step


def derive(seed: int, *parts: int) -> int:
    """A seed in [0, 2**62) for (seed, *parts), each in [0, 2**64): deterministic, and unrelated for distinct inputs.

    SeedSequence reads its entropy as 32-bit words and pads it with zeros, so (s,) and (s, 0) would hash alike, as
    would 2**32 and (0, 1): fixed-width 64-bit words and the count of parts in front keep every input distinct.
    """
    words = np.array([len(parts), seed, *parts], dtype=np.uint64)
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0]) >> 2
