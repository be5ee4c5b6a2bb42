"""What one training run reserves on the cluster: workers, and the CPUs and GPUs of each.

Validated in one place: the ranges when a `Resources` is made (checks.resources, one sentence naming the
flag), and whether a config's global batch splits among its workers in `check_batch`, which the caller runs
once before Ray starts (the CLI's preflight, a StudySettings). Light on purpose: no torch or Ray, so the
command line can build and check it before the heavy imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hamjepa import checks
from hamjepa.config import Config, ConfigError


@dataclass(frozen=True)
class Resources:
    """How one training run is spread: workers, and what each worker reserves."""

    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    # The flag that set `workers` (`--workers` for a run and for a study), named in errors.
    flag: str = field(default="--workers", compare=False, repr=False)

    def __post_init__(self) -> None:
        checks.resources(self.flag, self.workers, self.cpus_per_worker, self.gpus_per_worker)

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def per_worker(self) -> dict[str, float]:
        """Ray Train's resources_per_worker."""
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.use_gpu else {})}

    def check_local_capacity(self) -> None:
        """The workers must fit on this machine (a local Ray has nothing else)."""
        checks.local_capacity(self.flag, self.workers, self.cpus_per_worker, self.gpus_per_worker)

    def check_batch(self, cfg: Config) -> None:
        """A global batch that splits evenly among the workers, at least 2 per worker (batch statistics)."""
        batch = cfg.optim.batch_size
        if batch % self.workers:
            raise ConfigError(f"config field 'optim.batch_size' = {batch} is invalid: it is the global batch and "
                              f"must divide evenly among {self.workers} workers.")
        if batch // self.workers < 2:
            raise ConfigError(f"config field 'optim.batch_size' = {batch} is invalid: each of {self.workers} "
                              "workers needs at least 2 samples.")
