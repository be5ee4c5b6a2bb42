"""Every random stream of a run derives from its one seed (config field `seed`) through `derive`.

Why one mixer: streams derived by arithmetic on the seed overlap across seeds (with `seed + epoch`, seed 2's
first epoch is seed 1's second), and paired seeds must be independent draws. `derive` hashes the seed, a named
stream and its counters with numpy's SeedSequence, so nearby seeds and counters give unrelated 62-bit seeds
(62 bits: torch's DistributedSampler adds the epoch to its seed, which must stay below 2**63).

Two arms of a paired comparison share a seed and therefore every stream below: data order, augmentation and
initial weights are the same, only the method differs (docs/design.md, "Data flow of a study", Pairing).
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
    """A seed in [0, 2**62) for (seed, *parts): deterministic, and unrelated for any two distinct inputs."""
    state = np.random.SeedSequence([int(seed), *(int(part) for part in parts)]).generate_state(1, dtype=np.uint64)
    return int(state[0]) >> 2
