"""Shared test fixtures. Tests use small real data and tiny models; anything slow is marked `slow`."""

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # Deterministic tests; 2 intra-op threads match the 2-core machines this suite runs on.
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield


# The session's Ray is a simulated two-node cluster (ray.cluster_utils.Cluster): a head node and one worker node,
# one CPU each, started like `ray start` without flags: no `trial_driver` resource, so every study test proves that a
# study runs on a cluster that lacks it (trial drivers then hold a slice of memory). Custom resources name the nodes,
# so a test can tell where a run trained.
HEAD_NODE_RESOURCE = "sim_head_node"
WORKER_NODE_RESOURCE = "sim_worker_node"


@pytest.fixture(scope="session")
def ray_cluster(ray_test_cluster):
    """The session's Ray (below), by its address."""
    return ray_test_cluster.address


@pytest.fixture(scope="session")
def ray_test_cluster():
    """One local Ray for the whole test session, sized for 2 CPUs, shut down at the end; yields the simulated
    cluster (a test may add a node and remove it again).

    Token authentication is off so that subprocesses (a study driver started by a test) can join it.
    """
    import os

    import ray
    from ray.cluster_utils import Cluster

    os.environ["RAY_AUTH_MODE"] = "disabled"
    node = {"num_cpus": 1, "object_store_memory": 400 * 1024**2}
    cluster = Cluster(initialize_head=True, head_node_args={
        **node, "resources": {HEAD_NODE_RESOURCE: 1}, "include_dashboard": True})
    cluster.add_node(**node, resources={WORKER_NODE_RESOURCE: 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def tiny_config(**overrides):
    """The smoke configuration (Fashion-MNIST subset, narrow ResNet, 2 epochs) plus overrides."""
    from hamjepa.config import SMOKE_OVERRIDES, profile

    return profile("quick", {**SMOKE_OVERRIDES, **overrides})


def euler(q, p, grad_v, dt, steps):
    """Explicit Euler: the non-symplectic contrast of the energy, symplecticity and flow-geometry tests."""
    for _ in range(steps):
        q, p = q + dt * p, p - dt * grad_v(q)
    return q, p


def _gloo_rank(rank: int, world: int, work, init_file: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(work(rank), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def on_gloo_workers(work, world: int = 2) -> list:
    """work(rank) on `world` spawned processes joined in a gloo process group (one thread each); their results,
    by rank. `work` must be a module-level function (it is pickled to the processes) returning tensors/builtins."""
    import tempfile

    import torch
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_gloo_rank, args=(world, work, os.path.join(out_dir, "init"), out_dir), nprocs=world, join=True)
        return [torch.load(os.path.join(out_dir, f"{rank}.pt"), weights_only=True) for rank in range(world)]
