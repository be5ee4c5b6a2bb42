"""Shared test fixtures. Tests use small real data and tiny models; anything slow is marked `slow`."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # Deterministic tests; 2 intra-op threads match the 2-core machines this suite runs on.
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole test session, sized for 2 CPUs, shut down at the end.

    Token authentication is off so that subprocesses (a study driver started by a test) can join it.
    """
    import os

    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    from hamjepa.run import DRIVER_RESOURCE

    ray.init(num_cpus=2, resources={DRIVER_RESOURCE: 10_000}, include_dashboard=True,
             configure_logging=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def tiny_config(**overrides):
    """The smoke configuration (Fashion-MNIST subset, narrow ResNet, 2 epochs) plus overrides."""
    from hamjepa.config import SMOKE_OVERRIDES, profile

    return profile("quick", {**SMOKE_OVERRIDES, **overrides})
