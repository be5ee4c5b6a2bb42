"""The one check to run when a CUDA device is at hand: `python -m hamjepa.bench gpu [--out DIR]`.

Within about five minutes on one GPU it measures what docs/results.md "the GPU check" and the defaults rest on, and
writes them as `gpu_check.json` and `gpu_check.md` (one table) in --out:
1. process group: CUDA + NCCL initialised by 2 processes, one all-reduce checked against its exact sum. With
   one GPU both processes share it; NCCL may refuse two ranks on one device, and the record then says so.
2. training step: bf16-autocast steps (forward, backward, AdamW) of HamJEPA and SIGReg at the cifar100
   profile's sizes (ResNet-18 width 1, batch 512, 32 px), eager and with channels_last and/or torch.compile
   of the encoder, and with torch.compile of the predictor's rollout and the objective: which of
   compute.channels_last / compute.compile_encoder / compute.compile_predictor to switch on, and the HamJEPA / SIGReg
   ratio (target: at most 1.10x).
3. augmentation: two-view images/s of the on-device augmentation (data.augment_on = device) at 32 px RGB.
4. data wait: two short epochs of the real training loop (train.loop.train_one_epoch, no Ray) on synthetic
   files in CIFAR-100's on-disk format, each placement; the second epoch's images/s and
   train/data_wait_fraction (target: under 5% of the epoch with the device placement).
5. host syncs: one epoch of the real step loop per method under torch.cuda.set_sync_debug_mode("warn"), the
   divergence flag read only at the epoch's end: every synchronisation CUDA reports, and the lines that caused
   them (target: 1, that read; the CPU counts the loop's own reads instead, tests/test_step_syncs.py).
6. peak GPU memory of each piece (torch.cuda.max_memory_allocated).
A piece that fails is recorded with its error and the others still run. Without a CUDA device the command
stops with one sentence. Every piece also runs on the CPU at tiny sizes (tests/test_bench.py).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hamjepa import checks, paths
from hamjepa.arguments import Parser
from hamjepa.bench.step import fewest_images
from hamjepa.config import AugmentConfig, Config, profile
from hamjepa.data.augment import Augmentation
from hamjepa.data.feeds import augment_placement
from hamjepa.data.sources import CIFAR_FILES, CIFAR_FOLDERS
from hamjepa.method.model import JEPAModel
from hamjepa.train.optim import build_optimizer

NO_CUDA = ("python -m hamjepa.bench gpu needs a CUDA device and torch sees none here "
           f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); run it on a GPU machine.")
# (name, compile the encoder, channels_last, compile the predictor's rollout and the objective)
STEP_VARIANTS = (("eager", False, False, False), ("channels_last", False, True, False), ("compile", True, False, False),
                 ("compile+channels_last", True, True, False), ("compile predictor+objective", False, False, True))
ERROR_CHARS = 300  # an error, as one cell of the table
PROCESS_GROUP_TIMEOUT_S = 120  # NCCL's first init on a cold machine takes tens of seconds


# -- 1. process group ------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _process_group_rank(rank: int, world: int, backend: str, port: int, results) -> None:
    """One rank: init the group, all-reduce rank + 1, put (rank, sum or None, error or None) on the queue."""
    import torch.distributed as dist

    try:
        use_cuda = backend == "nccl"
        device = torch.device("cuda", rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        value = torch.full((1,), float(rank + 1), device=device)
        dist.all_reduce(value)
        results.put((rank, value.item(), None))
        dist.destroy_process_group()
    except Exception as error:  # noqa: BLE001 - the record says why, in the parent
        results.put((rank, None, f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"))


def process_group_check(backend: str = "nccl", world: int = 2) -> dict[str, Any]:
    """Init a `world`-process group with `backend` and all-reduce (1 + 2 + ... + world); the outcome as a record."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    results = context.Queue()
    port, started = _free_port(), time.perf_counter()
    processes = [context.Process(target=_process_group_rank, args=(rank, world, backend, port, results))
                 for rank in range(world)]
    for process in processes:
        process.start()
    outcomes, error = {}, None
    try:
        for _ in range(world):
            rank, value, failure = results.get(timeout=PROCESS_GROUP_TIMEOUT_S)
            outcomes[rank] = value
            error = error or failure
    except Exception:  # noqa: BLE001 - queue.Empty: a rank hung (e.g. waiting for a peer that failed)
        error = error or f"no answer from every rank within {PROCESS_GROUP_TIMEOUT_S} s"
    for process in processes:
        process.join(timeout=10)
        if process.is_alive():
            process.terminate()
    expected = world * (world + 1) / 2
    gpus = torch.cuda.device_count() if backend == "nccl" else 0
    return {"backend": backend, "world": world, "gpus": gpus, "shared_gpu": backend == "nccl" and gpus < world,
            "all_reduce": [outcomes.get(r) for r in range(world)], "expected": expected,
            "ok": error is None and all(outcomes.get(r) == expected for r in range(world)),
            "error": error, "seconds": time.perf_counter() - started}


# -- 2. training step ------------------------------------------------------------------------------------

def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def _timed(fn: Callable[[], object], steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(seconds of the warm-up, which holds any compilation; median-free mean seconds per call after it)."""
    started = time.perf_counter()
    for _ in range(warmup):
        fn()
    _synchronise(device)
    warm = time.perf_counter()
    for _ in range(steps):
        fn()
    _synchronise(device)
    return warm - started, (time.perf_counter() - warm) / steps


def step_throughput(cfg: Config, compile_encoder: bool, channels_last: bool, steps: int, device: torch.device | str,
                    warmup: int = 3, compile_predictor: bool = False) -> dict[str, Any]:
    """Training steps of cfg's method on random views, bf16 autocast on CUDA: images/s, ms/step, warm-up s."""
    device = torch.device(device)
    torch.manual_seed(0)
    model = JEPAModel(cfg).to(device)
    model.set_epoch(cfg.predictor.residual_scale_warmup_epochs)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if compile_encoder:
        model.encoder.compile()
    if compile_predictor:
        model.compile_predictor()
    optimizer = build_optimizer(model, cfg.optim)
    shape = (cfg.optim.batch_size, cfg.encoder.in_channels, cfg.data.image_size, cfg.data.image_size)
    views = [torch.randn(shape, device=device).contiguous(memory_format=memory_format) for _ in range(2)]

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _ = model(*views, step=0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    _reset_peak(device)
    warm, seconds = _timed(step, steps, warmup, device)
    return {"method": cfg.method, "compile": compile_encoder, "channels_last": channels_last,
            "compile_predictor": compile_predictor,
            "batch": cfg.optim.batch_size, "images_per_s": cfg.optim.batch_size / seconds,
            "ms_per_step": 1e3 * seconds, "warmup_s": warm, "peak_gib": _peak_gib(device)}


# -- 3. augmentation -------------------------------------------------------------------------------------

def augment_throughput(device: torch.device | str, batch: int = 512, size: int = 32, channels: int = 3,
                       rounds: int = 20) -> dict[str, Any]:
    """Two-view images/s of the augmentation on `device` (uint8 batch already there, a generator on it)."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8, device=device,
                           generator=generator)
    augmentation = Augmentation(AugmentConfig(), size, channels, (0.5,) * channels, (0.25,) * channels)
    _reset_peak(device)
    _, seconds = _timed(lambda: (augmentation(images, generator), augmentation(images, generator)), rounds, 2, device)
    return {"batch": batch, "size": size, "channels": channels, "images_per_s": batch / seconds,
            "sync_free": device.type != "cpu", "peak_gib": _peak_gib(device)}


# -- 4. data wait of real training epochs ------------------------------------------------------------------

def write_cifar100_files(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Synthetic images in CIFAR-100's on-disk format (torchvision's pickled batches) under root; returns root."""
    rng = np.random.default_rng(seed)
    folder = root / CIFAR_FOLDERS["cifar100"]
    folder.mkdir(parents=True, exist_ok=True)
    (train_name,), (test_name,), label_key = CIFAR_FILES["cifar100"]
    for name, n in ((train_name, n_train), (test_name, n_test)):
        labels = [int(v) for v in np.arange(n) % 100]
        record = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: labels,
                  b"coarse_labels": [v // 5 for v in labels], b"batch_label": b"synthetic"}
        with open(folder / name, "wb") as handle:
            pickle.dump(record, handle, protocol=2)
    return root


def epoch_wait(root: Path, device: torch.device | str, placement: str, overrides: dict[str, Any] | None = None,
               epochs: int = 2) -> dict[str, Any]:
    """`epochs` epochs of the training loop on the CIFAR-100 files under root; the last one's figures."""
    from hamjepa.train.loop import build_worker, train_one_epoch  # the loop itself; no Ray is started

    device = torch.device(device)
    cfg = profile("cifar100", {"data.root": str(root), "data.download": False, "data.augment_on": placement,
                               **(overrides or {})})
    _reset_peak(device)
    worker = build_worker(cfg, 0, 1, device)
    for epoch in range(1, epochs + 1):  # the first epoch pays cuDNN's autotuning and the allocator's warm-up
        outcome = train_one_epoch(worker, worker.model, epoch)
    images = worker.iters_per_epoch * cfg.optim.batch_size
    return {"placement": augment_placement(placement, device), "steps": worker.iters_per_epoch,
            "batch": cfg.optim.batch_size, "images_per_s": images / outcome.seconds,
            "data_wait_fraction": outcome.waited / outcome.seconds, "diverged": outcome.reason,
            "peak_gib": _peak_gib(device)}


# -- 5. host syncs of the step loop -------------------------------------------------------------------------

def step_syncs(root: Path, device: torch.device | str, method: str,
               overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Host syncs CUDA reports in one epoch of the step loop (after a warm-up epoch), with the 3 commonest lines
    that caused them; the divergence flag is read once, at the epoch's end. On the CPU: not measured."""
    import warnings
    from collections import Counter

    from hamjepa.train.loop import build_worker, train_one_epoch

    device = torch.device(device)
    cfg = profile("cifar100", {"method": method, "data.root": str(root), "data.download": False,
                               "data.augment_on": "device", "compute.divergence_check_every": 10 ** 9,
                               **(overrides or {})})
    worker = build_worker(cfg, 0, 1, device)
    train_one_epoch(worker, worker.model, 1)  # cuDNN's autotuning and the allocator's warm-up sync freely
    if device.type != "cuda":
        return {"method": method, "steps": worker.iters_per_epoch, "measured": False}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_one_epoch(worker, worker.model, 2)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs).most_common(3)
    return {"method": method, "steps": worker.iters_per_epoch, "measured": True, "syncs": len(syncs),
            "where": [f"{line} x{count}" for line, count in where]}


# -- the report --------------------------------------------------------------------------------------------

def _rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    group = results.get("process_group", {})
    rows.append(("process group", f"{group.get('backend')} x {group.get('world')} on {group.get('gpus')} GPU(s): "
                 + ("all-reduce exact" if group.get("ok") else f"FAILED ({group.get('error')})")))
    steps = {(s["method"], s["compile"], s["channels_last"], s.get("compile_predictor", False)): s
             for s in results.get("steps", []) if "method" in s}
    for name, *variant in STEP_VARIANTS:
        ham, sig = steps.get(("hamjepa", *variant)), steps.get(("sigreg", *variant))
        if ham and sig:
            ratio = sig["images_per_s"] / ham["images_per_s"]  # time per step, HamJEPA / SIGReg
            rows.append((f"step {name}", f"HamJEPA {ham['images_per_s']:,.0f} images/s, SIGReg "
                         f"{sig['images_per_s']:,.0f} images/s, HamJEPA / SIGReg time {ratio:.2f}x, "
                         f"peak {ham['peak_gib'] or 0:.1f} GiB"))
    if "images_per_s" in results.get("augment", {}):
        rows.append(("augmentation on the device", f"{results['augment']['images_per_s']:,.0f} two-view images/s"))
    for wait in results.get("epochs", []):
        if "data_wait_fraction" in wait:
            rows.append((f"epoch, augment on {wait['placement']}", f"{wait['images_per_s']:,.0f} images/s, data wait "
                         f"{100 * wait['data_wait_fraction']:.1f}% of the epoch, peak {wait['peak_gib'] or 0:.1f} GiB"))
    for record in results.get("syncs", []):
        if record.get("measured"):
            rows.append((f"host syncs, {record['method']}", f"{record['syncs']} in {record['steps']} steps (target 1, "
                         f"the epoch's divergence read); at {', '.join(record['where']) or '-'}"))
        elif "method" in record:
            rows.append((f"host syncs, {record['method']}", "not measured on the CPU (tests/test_step_syncs.py "
                         "counts the loop's own)"))
    rows += [(f"error in {name}", str(error)) for name, error in results.get("errors", {}).items()]
    return rows


def write_report(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """gpu_check.json (every figure) and gpu_check.md (one table) in out."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, table_path = out / "gpu_check.json", out / "gpu_check.md"
    json_path.write_text(json.dumps(results, indent=2, default=str))
    lines = [f"# GPU check: {results.get('device', '?')}, torch {results.get('torch', '?')}", "",
             "| check | result |", "|---|---|"]
    lines += [f"| {check} | {result} |" for check, result in _rows(results)]
    table_path.write_text("\n".join(lines) + "\n")
    return json_path, table_path


def _attempt(results: dict[str, Any], name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), or None with its error recorded under results['errors'][name]: one failing piece spares the rest."""
    try:
        return fn(*args)
    except Exception as error:  # noqa: BLE001 - recorded, reported in the table
        results["errors"][name] = f"{type(error).__name__}: {str(error).strip()[:ERROR_CHARS]}"
        return None


def run_checks(device: torch.device, steps: int, data_images: int, step_overrides: dict[str, Any] | None = None,
               epoch_overrides: dict[str, Any] | None = None, backend: str = "nccl",
               variants=STEP_VARIANTS, augment_batch: int = 512) -> dict[str, Any]:
    """Every piece in turn; a dict of their records (what write_report writes)."""
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                               "torch": torch.__version__, "cuda": torch.version.cuda, "errors": {}}
    results["process_group"] = _attempt(results, "process group", process_group_check, backend) or {}
    results["steps"] = []
    for method in ("hamjepa", "sigreg"):
        cfg = profile("cifar100", {"method": method, **(step_overrides or {})})
        for name, compiled, channels_last, compile_predictor in variants:
            record = _attempt(results, f"step {method} {name}", step_throughput, cfg, compiled, channels_last,
                              steps, device, 3, compile_predictor)
            results["steps"].append(record or {})
    results["augment"] = _attempt(results, "augmentation", augment_throughput, device, augment_batch) or {}
    results["epochs"] = []
    with tempfile.TemporaryDirectory() as folder:
        root = write_cifar100_files(Path(folder), data_images, max(100, data_images // 10))
        held_out = {**(epoch_overrides or {}), "data.val_size": data_images // 10}  # the bench's own files: 10%
        for placement in ("device", "loader"):
            record = _attempt(results, f"epoch {placement}", epoch_wait, root, device, placement, held_out)
            results["epochs"].append(record or {})
        results["syncs"] = [_attempt(results, f"host syncs {method}", step_syncs, root, device, method, held_out)
                            or {} for method in ("hamjepa", "sigreg")]
    return results


def _check_flags(args: argparse.Namespace) -> None:
    """Before any measurement: counts in range, enough images for one cifar100 batch after the 10% held out, and
    an --out folder this user can write (the report is written last, after minutes of measuring)."""
    checks.integer("--steps", args.steps, 1)
    checks.integer("--images", args.images, fewest_images(profile("cifar100").optim.batch_size))
    paths.require_writable_folder("--out", args.out, "pass a folder this user can write (it is created if missing)")


def main(argv: list[str]) -> None:
    parser = Parser(prog="python -m hamjepa.bench gpu", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per variant")
    parser.add_argument("--images", type=int, default=10240, help="synthetic CIFAR-100 training images (10%% are "
                                                                  "held out for validation)")
    args = parser.parse_args(argv)
    _check_flags(args)
    if not torch.cuda.is_available():
        sys.exit(NO_CUDA)
    os.environ.setdefault("NCCL_DEBUG", "WARN")
    torch.backends.cudnn.benchmark = True  # as training does on a GPU
    started = time.perf_counter()
    results = run_checks(torch.device("cuda", 0), args.steps, args.images)
    results["seconds"] = time.perf_counter() - started
    json_path, table_path = write_report(results, Path(args.out))
    print(table_path.read_text(), end="")
    print(f"written: {json_path}, {table_path}")
