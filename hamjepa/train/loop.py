"""One training run: the per-worker loop (Ray Train) and the TorchTrainer wrapper around it.

Per worker: build the method, feed it its shard of each epoch (data.feeds.two_view_feed: DistributedSampler's order,
augmented on the device or in DataLoader workers, data.augment_on), train with AdamW + warm-up/cosine,
report once per epoch (rank 0's metrics reach Ray), checkpoint every epoch, resume from the latest
checkpoint. Batch statistics are global because the objectives all-reduce their sufficient statistics.

Reported metrics (names from names.py): `epoch`, `train/<loss term or diagnostic>`, `train/images_per_s`,
`train/data_wait_fraction` (seconds the step loop waited for its next batch / seconds of the epoch), `train/lr`,
the objective `val_knn{k}_top1` (percent), `diverged` (0/1), `resumed_from_epoch`, and where it ran
(`nodes`, `device`, strings that MLflow keeps as tags `hamjepa.nodes`, `hamjepa.device`); after the last epoch
also the final metrics of `readouts.final_metrics`. Before the first step a fresh run reports epoch 0: the
objective and the final metrics (under `init/`) of the encoder at initialisation, so every run can show what
training gained. A diverged run reports `diverged = 1`, its `diverged_reason`, and finite worst-case
accuracies, and returns normally. The last epoch also reports the theory check (`theory.final_metrics`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hamjepa import names, storage
from hamjepa.config import Config
from hamjepa.data.feeds import two_view_feed
from hamjepa.data.splits import load_splits
from hamjepa.evaluation import flow_picture, readouts, theory
from hamjepa.evaluation.probes import recording_probes
from hamjepa.method.distributed import local_statistics
from hamjepa.method.encoder import split_state
from hamjepa.method.model import JEPAModel
from hamjepa.method.objectives import spectral_floor
from hamjepa.method.predictors import HamiltonianPredictor
from hamjepa.seeds import Stream, derive
from hamjepa.train import checkpoints, storage_faults
from hamjepa.train.divergence import check_interval, diverged_on_device, reason_of, watched_values, worst_case
from hamjepa.train.optim import build_optimizer, build_scheduler
from hamjepa.train.resources import (
    Resources,  # also the name Tune experiments pickled before resources.py find it under
)

# Set in every worker's environment unless --verbose (launch.connect_ray): Ray Train then keeps its per-report
# and per-checkpoint info messages to the worker's own log instead of the user's console.
QUIET_WORKERS = "HAMJEPA_QUIET_WORKERS"
FLOW_PICTURE = "flow.png"  # a finished HamJEPA run's picture of its learned potential (plots/flow.png)


# -- helpers of the loop ------------------------------------------------------------------------------

@torch.no_grad()
def diagnostics(model: JEPAModel, z: torch.Tensor) -> dict[str, float]:
    """Per-epoch state diagnostics from one batch of embeddings z (N, 2d), for every method.

    Mean |q|^2/d and |p|^2/d, minimum per-dimension std, logdet/k, PR/k and eigmax fraction of q and p,
    and for HamJEPA the batch variance of the potential V(q).
    """
    z = z.float()
    q, p = split_state(z)
    out: dict[str, float] = {}
    k = min(model.projection_q.k, z.shape[0] - 1)
    for name, x in (("q", q), ("p", p)):
        out[f"{name}_energy"] = (x * x).mean().item()
        out[f"{name}_min_std"] = x.std(0).min().item()
        projection = torch.eye(x.shape[1], k, device=x.device)  # fixed coordinates: comparable across epochs
        _, stats = spectral_floor(x, projection, logdet_floor=0.0)
        out.update({f"{name}_{key}": value.item() for key, value in stats.items()})
    potential = getattr(model.predictor, "potential", None)
    if potential is not None:
        out["potential_var"] = potential(q).var().item()
    return out


def placement(world: int, device: torch.device) -> dict[str, str]:
    """Where a run trains, as strings MLflow keeps as tags: its workers' Ray node ids and their device.

    Every worker must call it (it gathers across the process group).
    """
    import ray

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    here = (ray.get_runtime_context().get_node_id(), name)
    gathered = [here]
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, here)
    devices = sorted({d for _, d in gathered})
    return {"nodes": ",".join(sorted({node for node, _ in gathered})),
            "device": f"{world} x " + "/".join(devices)}


def _training_state(model: JEPAModel, optimizer, scheduler, epoch: int, cfg: Config,
                    history: list[dict[str, Any]], pictures: dict[str, bytes] | None = None) -> dict[str, Any]:
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "epoch": epoch, "config": cfg.to_dict(), "torch_rng": torch.get_rng_state(), "history": history,
        # PNGs drawn at the end (plots/<name> in MLflow), as uint8 tensors so the checkpoint loads weights-only
        "pictures": {name: torch.frombuffer(bytearray(png), dtype=torch.uint8)
                     for name, png in (pictures or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _report(rank: int, metrics: dict[str, Any], state: dict[str, Any] | None) -> int | None:
    """Every worker reports (Ray Train requires it); rank 0 attaches the checkpoint of `state`. Returns the errno of a
    storage fault that kept the checkpoint out of storage (train/storage_faults.py), else None.

    Ray's Result carries the metrics of the latest *checkpoint*, so even a diverged run's last report
    comes with a (model-less) checkpoint: the outcome survives, and a rerun of the run sees it.
    """
    import ray.train

    if rank != 0 or state is None:
        ray.train.report(metrics)
        return None
    storage_context = ray.train.get_context().get_storage()
    fs, run_folder = storage_context.storage_filesystem, storage_context.experiment_fs_path
    name = storage_faults.checkpoint_folder_name()
    with tempfile.TemporaryDirectory() as directory:
        try:
            checkpoints.write(directory, state)
            storage_faults.check_room(directory, fs, run_folder)
        except OSError as error:
            if (number := storage_faults.storage_errno(error)) is None:
                raise
            ray.train.report(metrics)  # the other ranks wait for rank 0 inside report
            return number
        try:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name=name)
        except OSError as error:
            if (number := storage_faults.storage_errno(error)) is None:
                raise
            storage_faults.remove_torn(fs, f"{run_folder}/{name}")
            return number
    return None


def _any_rank(fault: bool, world: int, device: torch.device) -> bool:
    """Whether any worker saw a fault: every rank must stop at the same report, or the others wait forever."""
    if world == 1:
        return fault
    flag = torch.tensor([int(fault)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def _read_checkpoint(checkpoint, device, cfg: Config) -> dict[str, Any]:
    """The newest usable checkpoint of this run: Ray's latest, else the older one it kept (checkpoints.py)."""
    import ray.train

    fs, parent = checkpoint.filesystem, os.path.dirname(checkpoint.path.rstrip("/"))
    candidates = checkpoints.siblings_newest_first(checkpoint.path, checkpoints.folder_names(fs, parent))
    return checkpoints.read_newest_usable(
        candidates, cfg.to_dict(), device,
        fetch=lambda path: ray.train.Checkpoint(path=path, filesystem=fs).as_directory())


def _restore(state: dict[str, Any], model: JEPAModel, optimizer, scheduler) -> int:
    """Restore a training state; returns the last completed epoch."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"].cpu())
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
    return int(state["epoch"])


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    """A report as built-in types, which a weights-only checkpoint load accepts (numpy scalars it refuses)."""
    return {k: v if isinstance(v, (str, int)) and not isinstance(v, bool) else float(v) for k, v in metrics.items()}


# -- the per-worker loop ------------------------------------------------------------------------------

@dataclass
class _Worker:
    """One Ray Train worker's run: its config and place in the group, its data, model and optimiser, and every
    epoch's report so far (kept in the checkpoint, so a restarted worker can replay them)."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    splits: Any
    feed: Any  # data.ResidentFeed | StreamFeed | LoaderFeed: set_epoch(epoch, seed), len, (view_a, view_b) batches
    model: JEPAModel
    optimizer: Any
    scheduler: Any
    placement: dict[str, str] = field(default_factory=dict)  # the Ray nodes and device it trains on (names.WHERE)
    history: list[dict[str, Any]] = field(default_factory=list)
    failure: dict[str, Any] | None = None  # rank 0: why the run ended early (a storage fault), Ray Train's return value
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(names.TIME_PARTS, 0.0))  # cumulative

    def timings(self) -> dict[str, float]:
        """The run's time so far, per part (names.TIME_PARTS), as report metrics."""
        return {names.time_metric(part): seconds for part, seconds in self.seconds.items()}

    @property
    def iters_per_epoch(self) -> int:
        return len(self.feed)

    def report(self, metrics: dict[str, Any], epoch: int, pictures: dict[str, bytes] | None = None) -> bool:
        """Report an epoch (rank 0 with the checkpoint of the training state after it, and any pictures); False when
        storage could not take the checkpoint, and the run must end (rank 0 then holds the `failure`)."""
        started = time.perf_counter()
        self.history.append(_plain(metrics))
        state = (_training_state(self.model, self.optimizer, self.scheduler, epoch, self.cfg, self.history,
                                 pictures) if self.rank == 0 else None)
        fault = _report(self.rank, metrics, state)
        # Shows in the next report: this one is already on its way.
        self.seconds["checkpoint"] += time.perf_counter() - started
        if fault is not None:
            import ray.train

            run_folder = ray.train.get_context().get_storage().experiment_fs_path
            self.failure = {names.FAILED: 1, names.FAILURE_REASON: storage_faults.reason(fault, run_folder, epoch - 1)}
        return not _any_rank(fault is not None, self.world, self.device)


def _quiet_ray_train_loggers() -> None:
    """Ray Train's info messages in this worker down to warnings: the `ray.train` logger, and every logger Ray names
    after its own file (`logging.getLogger(__file__)`), which `ray.train`'s level does not reach. The one that writes
    `Reporting training result N: TrainingReport(...)` (2 KB, once per epoch) is such a logger; its module is loaded
    before this function runs (it holds the worker's train context), so the loop over existing loggers finds it."""
    import ray

    ray_folder = os.path.dirname(ray.__file__)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(ray_folder):
            logging.getLogger(name).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train entry point; loop_config = {"cfg": Config, "started_at": the trial's start (time.time())}.

    Returns (rank 0, as Ray Train's `Result.return_value`) the failure that ended the run early without an error
    Ray should retry (a storage fault: names.FAILED and its reason), else None."""
    if os.environ.get(QUIET_WORKERS):
        _quiet_ray_train_loggers()
    worker = _set_up(loop_config["cfg"])
    # Ray Train's start-up (controller, worker group), the data and the model, until the loop can start.
    worker.seconds["startup"] = max(0.0, time.time() - loop_config["started_at"])
    last_epoch = _start_or_resume(worker)
    if last_epoch is None:  # a diverged run stays diverged when it is run again; or epoch 0 found storage full
        return worker.failure
    use_cuda = worker.device.type == "cuda"
    net = (DistributedDataParallel(worker.model, device_ids=[worker.device] if use_cuda else None)
           if worker.world > 1 else worker.model)
    for epoch in range(last_epoch + 1, worker.cfg.optim.epochs + 1):
        if not _run_epoch(worker, net, epoch, resumed_from=last_epoch):
            break
    return worker.failure


def _set_up(cfg: Config) -> _Worker:
    """This Ray Train worker's run: its rank and device from Ray, then build_worker."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    worker = build_worker(cfg, rank, world, device)
    worker.placement = placement(world, device)
    return worker


def build_worker(cfg: Config, rank: int, world: int, device: torch.device | str) -> _Worker:
    """One worker's data (its shard of each epoch), model, optimiser and schedule; no Ray (benchmarks, tests)."""
    device = torch.device(device)
    use_cuda = device.type == "cuda"
    if use_cuda:  # fixed input shapes: let cuDNN time its kernels once and keep the fastest (GPU runs are then
        torch.backends.cudnn.benchmark = True  # not bit-reproducible, which bf16 autocast already gives up)
    torch.manual_seed(cfg.seed)  # identical initial weights on every worker

    splits = load_splits(cfg.data, channels=cfg.encoder.in_channels)
    feed = two_view_feed(splits, cfg.augment, cfg.data, cfg.optim.batch_size // world, world, rank,
                         derive(cfg.seed, Stream.SAMPLE_ORDER), device,
                         channels_last=cfg.compute.channels_last)
    model = JEPAModel(cfg).to(device)
    if cfg.compute.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world > 1 and use_cuda:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # encoder BN over the global batch too
    if cfg.compute.compile_encoder:
        model.encoder.compile()  # in place: the module and its state_dict keys stay, so checkpoints do not change
    if cfg.compute.compile_predictor:
        model.compile_predictor()
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, len(feed), cfg.optim)
    return _Worker(cfg, rank, world, device, splits, feed, model, optimizer, scheduler)


def _start_or_resume(worker: _Worker) -> int | None:
    """Restore the newest usable checkpoint and replay its reports, or report epoch 0 (the encoder at
    initialisation, measured as at the end); returns the last completed epoch, None if the run had diverged or storage
    could not take its first checkpoint."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        metrics = {names.EPOCH: 0, names.DIVERGED: 0, names.RESUMED_FROM: 0, **worker.placement,
                   names.DATA_DIGEST: worker.splits.digest, names.DATA_SIZES: worker.splits.sizes}
        started = time.perf_counter()
        if worker.rank == 0:
            metrics.update(initial_readouts(worker.model, worker.splits, worker.cfg, worker.device))
        worker.seconds["eval_init"] += time.perf_counter() - started
        return 0 if worker.report({**metrics, **worker.timings()}, epoch=0) else None
    state = _read_checkpoint(checkpoint, worker.device, worker.cfg)
    if "diverged" in state:
        _report(worker.rank, state["diverged"], state)
        return None
    last_epoch = _restore(state, worker.model, worker.optimizer, worker.scheduler)
    worker.history = list(state.get("history", []))
    last = worker.history[-1] if worker.history else {}
    for part in names.TIME_PARTS:  # cumulative across the restart; this start-up adds to the first one
        worker.seconds[part] += float(last.get(names.time_metric(part), 0.0))
    # A report checkpointed just before an interruption may never have reached MLflow: replay them all (without
    # a checkpoint); the loggers skip the epochs they already have.
    for past in worker.history:
        _report(worker.rank, past, None)
    return last_epoch


def train_one_epoch(worker: _Worker, net: nn.Module, epoch: int) -> EpochOutcome:
    """Seed the epoch, then optimise over it (no evaluation, no report)."""
    cfg, rank = worker.cfg, worker.rank
    # Augmentation randomness is a function of (seed, epoch, rank): a resumed epoch replays exactly, and
    # two methods run on the same seed see the same sample order and augmentation stream (paired seeds).
    torch.manual_seed(derive(cfg.seed, Stream.TORCH_GLOBAL, epoch, rank))
    worker.feed.set_epoch(epoch, derive(cfg.seed, Stream.AUGMENT, epoch, rank))
    worker.model.set_epoch(epoch)
    return _train_epoch(net, worker.model, worker.feed, worker.optimizer, worker.scheduler, cfg, epoch,
                        worker.iters_per_epoch, worker.device)


def _run_epoch(worker: _Worker, net: nn.Module, epoch: int, resumed_from: int) -> bool:
    """Train one epoch, evaluate (rank 0), report with a checkpoint; False when the run diverged or storage could
    not take its checkpoint."""
    cfg, rank = worker.cfg, worker.rank
    sums, reason, elapsed, waited, last_views = train_one_epoch(worker, net, epoch)
    worker.seconds["train"] += elapsed
    if reason is not None:
        metrics = {names.EPOCH: epoch, names.DIVERGED: 1, names.DIVERGED_REASON: f"epoch {epoch}: {reason}",
                   names.RESUMED_FROM: resumed_from, **worst_case(names.final_accuracies(cfg.method, cfg.eval.knn_k))}
        _report(rank, metrics, {"diverged": metrics, "config": cfg.to_dict()})
        return False
    steps = worker.iters_per_epoch
    metrics: dict[str, Any] = {names.EPOCH: epoch, names.DIVERGED: 0, names.RESUMED_FROM: resumed_from,
                               **worker.placement, f"{names.TRAIN}lr": worker.scheduler.get_last_lr()[0],
                               names.IMAGES_PER_S: steps * cfg.optim.batch_size / elapsed,
                               names.DATA_WAIT_FRACTION: waited / elapsed}
    if sums:  # the epoch's averages, read from the device in one transfer
        averages = (torch.stack([v.double() for v in sums.values()]) / steps).tolist()
        metrics.update({f"{names.TRAIN}{k}": v for k, v in zip(sums, averages, strict=True)})
    final = epoch == cfg.optim.epochs
    pictures = {}
    if rank == 0:
        metrics.update(_evaluate_epoch(worker.model, last_views, worker.splits, cfg, worker.device, final,
                                       worker.seconds))
        started = time.perf_counter()
        if final and isinstance(worker.model.predictor, HamiltonianPredictor):
            states = readouts.held_out_states(worker.model, worker.splits, cfg, worker.device)
            if len(states):
                pictures[FLOW_PICTURE] = flow_picture.draw(worker.model.predictor, states)
        worker.seconds["theory"] += time.perf_counter() - started
    return worker.report({**metrics, **worker.timings()}, epoch, pictures)


class EpochOutcome(NamedTuple):
    """What one epoch of optimisation returns."""

    sums: dict[str, torch.Tensor]  # per-step stats summed over the epoch's steps
    reason: str | None  # why the run diverged, or None
    seconds: float  # wall time of the epoch, from before its first batch to after its last step
    waited: float  # of which the step loop waited for its next batch (loading, augmenting, copying)
    last_views: torch.Tensor | None  # the last step's first view, for the end-of-epoch diagnostics


class _Waiting:
    """Iterate batches, adding the seconds each `next` took to `seconds`: the time the step loop waited for input.

    On a GPU the device path's `next` only queues the augmentation's kernels (no host-device synchronisation),
    so a batch the device is still augmenting costs the loop no wait here; that time shows in images/s.
    """

    def __init__(self, batches):
        self.iterator, self.seconds = iter(batches), 0.0

    def __iter__(self):
        return self

    def __next__(self):
        started = time.perf_counter()
        try:
            return next(self.iterator)
        finally:
            self.seconds += time.perf_counter() - started


def _train_epoch(net, model: JEPAModel, feed, optimizer, scheduler, cfg: Config, epoch: int, iters_per_epoch: int,
                 device: torch.device) -> EpochOutcome:
    """One epoch of optimisation over `feed`'s (view_a, view_b) batches, already on `device`."""
    use_cuda = device.type == "cuda"
    net.train()
    sums: dict[str, torch.Tensor] = {}
    started = time.perf_counter()
    view_a = None
    batches = _Waiting(feed)
    # No host sync inside a step: the divergence rule runs on the device, into a flag and the first bad step's
    # values, and the host reads them every `every` steps and after the epoch's last (train/divergence.py).
    every = check_interval(cfg.compute.divergence_check_every, iters_per_epoch * cfg.optim.epochs)
    flag = first_bad = None
    for iteration, (view_a, view_b) in enumerate(batches):
        step = (epoch - 1) * iters_per_epoch + iteration
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_cuda):
            loss, stats = net(view_a, view_b, step)
        values = watched_values(loss, stats)
        bad = diverged_on_device(values)
        first_bad = values if first_bad is None else torch.where(flag, first_bad, values)
        flag = bad if flag is None else flag | bad
        if (iteration + 1) % every == 0 or iteration + 1 == iters_per_epoch:
            if flag.item():  # every worker sees the same global loss, so all stop together
                return EpochOutcome(sums, reason_of(first_bad), time.perf_counter() - started, batches.seconds,
                                    view_a)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:  # the method's protocol: HamJEPA clipped, SIGReg not (docs/method.md §5)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + value
    return EpochOutcome(sums, None, time.perf_counter() - started, batches.seconds, view_a)


def _evaluate_epoch(model: JEPAModel, views: torch.Tensor, splits, cfg: Config, device: torch.device,
                    final: bool, seconds: dict[str, float] | None = None) -> dict[str, float]:
    """Rank 0, end of an epoch: eval-mode state diagnostics, the objective, and after the last epoch the final
    readouts and the theory check; the time of each added to `seconds` (names.TIME_PARTS)."""
    seconds = seconds if seconds is not None else dict.fromkeys(names.TIME_PARTS, 0.0)
    started = time.perf_counter()
    use_cuda = device.type == "cuda"
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_cuda):
        z = model.encoder(views)
    with local_statistics():
        metrics = {f"{names.STATE}{k}": v for k, v in diagnostics(model, z).items()}
    # No validation split (fixed runs on the whole training set): no objective. After the last epoch the final
    # readouts measure it, from the features they extract anyway.
    if len(splits.val) and cfg.eval.objective_every_epoch and not final:
        metrics[names.objective(cfg.eval.knn_k)] = readouts.validation_knn(model, splits, cfg, device)
    seconds["eval_objective"] += time.perf_counter() - started
    if final:
        started = time.perf_counter()
        with recording_probes() as probes:  # the theory check measures the probes the final readouts train
            metrics.update(readouts.final_metrics(model, splits, cfg, device))
        seconds["eval_final"] += time.perf_counter() - started
        started = time.perf_counter()
        metrics.update(theory.final_metrics(cfg.method, model.predictor, z, probes))
        seconds["theory"] += time.perf_counter() - started
    return metrics


def initial_readouts(model: JEPAModel, splits, cfg: Config, device: torch.device) -> dict[str, float]:
    """Epoch 0: the objective and every final readout (under `init/`) of the encoder at initialisation.

    A randomly initialised ResNet is already a strong kNN baseline on small images, so what a run learned is
    its final readout minus this one, never the final readout alone. With `eval.initial_readouts` off (search
    trials), the objective only: Tune needs it in every report.
    """
    if not cfg.eval.initial_readouts:
        return {names.objective(cfg.eval.knn_k): readouts.validation_knn(model, splits, cfg, device)} if len(
            splits.val) else {}
    final = readouts.final_metrics(model, splits, cfg, device)
    metrics = {names.init(k): v for k, v in final.items()}
    objective = names.objective(cfg.eval.knn_k)
    if objective in final:  # epoch 0's objective, for the curves Tune and MLflow draw
        metrics[objective] = final[objective]
    return metrics


# -- the TorchTrainer wrapper -------------------------------------------------------------------------

# Ray Train retries a controller that cannot start its workers without limit by default: a run whose placement
# group can never be scheduled (another Ray instance holding the machine, a node gone) would hang forever.
# Three tries, each bounded by Ray's worker-group start timeout, then the run fails with the reason.
CONTROLLER_FAILURE_LIMIT = 3


def make_trainer(cfg: Config, resources: Resources, name: str, storage_path: str | None = None,
                 max_failures: int = 2, callbacks: Sequence[Any] = ()):
    """A TorchTrainer for one run of `cfg`: gloo on CPU, nccl on GPU, restarts from the last checkpoint.

    The caller has checked `resources` against `cfg` (Resources.check_batch): `hamjepa train` and a study's base
    before Ray starts, a study's trial in its driver.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # A frozen dataclass travels through Ray as it is; the clock starts when the trial makes its trainer.
    loop_config: dict[str, Any] = {"cfg": cfg, "started_at": time.time()}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if resources.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=resources.workers, use_gpu=resources.use_gpu,
                                     resources_per_worker=resources.per_worker),
        run_config=RunConfig(
            name=name,
            storage_path=storage.resolve(storage_path),
            failure_config=FailureConfig(max_failures=max_failures, controller_failure_limit=CONTROLLER_FAILURE_LIMIT),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
        ),
    )
