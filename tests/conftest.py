"""Shared test fixtures. Tests use small real data and tiny models; anything slow is marked `slow`."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # Deterministic tests; 2 intra-op threads match the 2-core machines this suite runs on.
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield
