"""A training step never waits for the host, and reduces its statistics in few collectives: counted, on 2 gloo
workers running the real step loop (train.loop._train_epoch) of each method.

Host syncs counted: Tensor.item, .tolist, .cpu, .numpy, bool() and float() of a tensor, called from anywhere but
PyTorch itself (whose optimiser reads its CPU-side step counter).
Collectives counted: torch.distributed.all_reduce calls from Python (the objectives' sums, forward and
backward); DistributedDataParallel's own bucketed gradient all-reduce runs in C++ and is not among them.
Before (the same count on the parent commit, b0ee8a8): HamJEPA and MLP-HJEPA 46 all_reduce calls and 19 host
syncs per step (16 of them reading the global batch size, 3 the divergence check), SIGReg 8 and 3. Now: 4 and 2
collectives per step, and one host read every EVERY steps.
"""

import os
import sys

import pytest
import torch
import torch.distributed as dist
from conftest import on_gloo_workers

WORLD, STEPS, EVERY = 2, 8, 4
TORCH = os.path.dirname(torch.__file__)
SYNCS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__"}
# Collectives per step from Python: HamJEPA and MLP-HJEPA reduce two dependency levels (first moments, then
# centred second moments), each once forward and once backward; SIGReg one level.
COLLECTIVES_PER_STEP = {"hamjepa": 4, "mlp": 4, "sigreg": 2}


def _count(method: str, inject_item: bool) -> dict[str, int]:
    """Run STEPS steps of this worker's real loop, counting host syncs and all_reduce calls inside it."""
    from hamjepa.config import SMOKE_OVERRIDES, profile
    from hamjepa.method import model as model_module
    from hamjepa.train.loop import _train_epoch, build_worker

    cfg = profile("quick", {**SMOKE_OVERRIDES, "method": method, "data.dataset": "synthetic",
                            "data.subset": 16 * STEPS * WORLD, "data.val_size": 0, "data.augment_on": "device",
                            "optim.batch_size": 16 * WORLD, "compute.divergence_check_every": EVERY})
    worker = build_worker(cfg, dist.get_rank(), WORLD, "cpu")
    net = torch.nn.parallel.DistributedDataParallel(worker.model)
    worker.feed.set_epoch(1, augment_seed=dist.get_rank())  # what train_one_epoch does before the step loop
    worker.model.set_epoch(1)
    counts = {"syncs": 0, "all_reduce": 0}
    originals = {name: getattr(torch.Tensor, name) for name in SYNCS}
    all_reduce = dist.all_reduce

    def counted(name):
        def method_(self, *args, **kwargs):
            # Ours, not PyTorch's own bookkeeping (AdamW's step counter lives on the CPU even for a GPU run).
            if not sys._getframe(1).f_code.co_filename.startswith(TORCH):
                counts["syncs"] += 1
            return originals[name](self, *args, **kwargs)
        return method_

    def reduce(*args, **kwargs):
        counts["all_reduce"] += 1
        return all_reduce(*args, **kwargs)

    if inject_item:  # a deliberate host sync inside the step: the count must see it
        forward = model_module.JEPAModel.forward
        model_module.JEPAModel.forward = lambda self, *a: (lambda out: (out[0].item(), out)[1])(forward(self, *a))
    for name in SYNCS:
        setattr(torch.Tensor, name, counted(name))
    dist.all_reduce = reduce
    try:
        outcome = _train_epoch(net, worker.model, worker.feed, worker.optimizer, worker.scheduler, cfg, 1,
                               worker.iters_per_epoch, worker.device)
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        dist.all_reduce = all_reduce
        if inject_item:
            model_module.JEPAModel.forward = forward
    assert outcome.reason is None and worker.iters_per_epoch == STEPS
    return counts


def _counts_of_every_method(rank: int) -> dict[str, dict[str, int]]:
    return {f"{method}/{inject}": _count(method, inject) for method in COLLECTIVES_PER_STEP for inject in (False, True)}


@pytest.fixture(scope="module")
def counts():
    return on_gloo_workers(_counts_of_every_method, WORLD)


@pytest.mark.parametrize("method", list(COLLECTIVES_PER_STEP))
def test_the_step_loop_reads_the_host_only_at_the_divergence_checks(counts, method):
    for rank in range(WORLD):
        assert counts[rank][f"{method}/False"]["syncs"] == STEPS // EVERY  # the flag's reads, nothing else


@pytest.mark.parametrize("method", list(COLLECTIVES_PER_STEP))
def test_a_deliberate_item_in_the_step_is_counted(counts, method):
    """The counter is not blind: one .item() added to the model's forward shows as one sync per step."""
    for rank in range(WORLD):
        assert counts[rank][f"{method}/True"]["syncs"] == STEPS // EVERY + STEPS


@pytest.mark.parametrize("method", list(COLLECTIVES_PER_STEP))
def test_each_objective_reduces_its_statistics_in_one_collective_per_dependency_level(counts, method):
    for rank in range(WORLD):
        assert counts[rank][f"{method}/False"]["all_reduce"] == COLLECTIVES_PER_STEP[method] * STEPS
