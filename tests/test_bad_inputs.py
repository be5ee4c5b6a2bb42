"""A catalogue of bad inputs to every command line, each refused before any work.

Each entry runs in-process, in an empty working directory, and must end with exit code 2, exactly one line on
stderr that names the field, nothing on stdout, nothing created in the working directory (no MLflow store, no
pointer file, no ray_results), and neither Ray nor MLflow reached: `ray.init`, `hamjepa.launch.connect_ray`,
MLflow's client and fluent entry points, and the study runners all fail the test when called. A control test
runs each command's base arguments (valid) and sees it get as far as connecting Ray, so every entry is refused
for its own bad part. The machine is pinned at 2 CPUs and no GPU, so capacity entries mean the same everywhere.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from hamjepa import checks, cli
from hamjepa.data import sources as data
from tests.path_makers import folder, named_pipe, text_file

ROOT = Path(__file__).resolve().parents[1]


class Reached(AssertionError):
    """Work started: Ray, MLflow or a study runner was called."""


# -- inputs ------------------------------------------------------------------------------------------------------

def write_idx(path: Path, array: np.ndarray, magic: bytes = b"\x00\x00\x08") -> None:
    header = magic + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def fashion(folder: Path, n_train: int = 200, n_test: int = 40, image: int = 28, label_count: int | None = None,
            label_max: int = 10) -> Path:
    """Fashion-MNIST's four idx.gz files, random pixels, balanced labels."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, image, image)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(label_count or n) % label_max)
    return folder


def broken_fashion(how: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        fashion(folder)
        target = folder / "train-images-idx3-ubyte.gz"
        if how == "truncated":
            target.write_bytes(target.read_bytes()[:200])
        elif how == "not-gzip":
            target.write_bytes(b"plain bytes, not gzip")
        elif how == "magic":
            write_idx(target, np.zeros((200, 28, 28)), magic=b"\x00\x00\x0d")
        elif how == "shape":
            write_idx(target, np.zeros((200, 20, 20)))
        elif how == "labels":
            fashion(folder, label_count=150)
        elif how == "label-range":
            fashion(folder, label_max=13)
        return folder
    return make


def image_folder(how: str) -> Callable[[Path], Path]:
    """train/ and val/ with a class folder each of small PNGs, broken as `how` says."""
    def make(folder: Path) -> Path:
        from PIL import Image

        classes = ("ant",) if how == "one-class" else ("ant", "bee")
        for split in ("train", "val"):
            for cls in classes:
                (folder / split / cls).mkdir(parents=True)
                if how == "empty-val" and split == "val":
                    continue
                for i in range(8):
                    Image.new("L", (12, 12), color=i * 20).save(folder / split / cls / f"{i}.png")
        if how == "undecodable":
            (folder / "train" / "ant" / "3.png").write_bytes(b"not an image")
        if how == "empty-class":
            (folder / "train" / "cat").mkdir()
        if how == "named-pipe":  # named like an image: opening it would block until a writer came
            (folder / "train" / "ant" / "3.png").unlink()
            os.mkfifo(folder / "train" / "ant" / "3.png")
        return folder
    return make


def bad_cifar(folder: Path, first: Callable[[Path], object] | None = None) -> Path:
    """CIFAR-10's six batch files, each an empty pickled dict; `first` replaces the first batch file."""
    (folder / "cifar-10-batches-py").mkdir(parents=True)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        (folder / "cifar-10-batches-py" / name).write_bytes(b"\x80\x02}q\x00.")  # an empty pickled dict
    if first is not None:
        (folder / "cifar-10-batches-py" / "data_batch_1").unlink()
        first(folder / "cifar-10-batches-py" / "data_batch_1")
    return folder


def fashion_with_a_pipe(folder: Path) -> Path:
    """Fashion-MNIST whose training images file was replaced by a named pipe (reading it would block forever)."""
    fashion(folder)
    (folder / "train-images-idx3-ubyte.gz").unlink()
    os.mkfifo(folder / "train-images-idx3-ubyte.gz")
    return folder


LONG = "x" * 300  # a path component longer than NAME_MAX (255 bytes) on every Linux file system


def sqlite_file(tables: tuple[str, ...], revision: str | None = None) -> Callable[[Path], Path]:
    """A SQLite database with these (empty) tables and, with `revision`, MLflow's alembic_version row: what
    store_file.py reads of a user's database or of an MLflow store of another schema."""
    def make(path: Path) -> Path:
        import sqlite3

        connection = sqlite3.connect(path)
        with connection:
            for table in tables:
                connection.execute(f"CREATE TABLE {table} (id INTEGER)")
            if revision is not None:
                connection.execute("CREATE TABLE alembic_version (version_num TEXT)")
                connection.execute("INSERT INTO alembic_version VALUES (?)", (revision,))
        connection.close()
        return path
    return make


def older_mlflow_revision() -> str:
    from hamjepa import store_file

    return store_file._migrations().get_revision(store_file.head_revision()).down_revision


STUDY_ID = "energy_budget-20250101-120000-abcdef"


def study_folder(pointer: bytes, identity: bytes | None = None) -> Callable[[Path], Path]:
    """A --storage-path whose energy_budget study has this latest.json and, with `identity`, this study.json."""
    def make(path: Path) -> Path:
        root = path / "energy_budget"
        (root / STUDY_ID).mkdir(parents=True)
        (root / "latest.json").write_bytes(pointer)
        if identity is not None:
            (root / STUDY_ID / "study.json").write_bytes(identity)
        return path
    return make


def study_folder_of(name: str, identity: bytes) -> Callable[[Path], Path]:
    """A --storage-path with one invocation of study `name` (the latest), whose study.json is `identity`."""
    def make(path: Path) -> Path:
        study_id = json.loads(identity)["id"]
        (path / name / study_id).mkdir(parents=True)
        (path / name / "latest.json").write_text(json.dumps({"id": study_id}))
        (path / name / study_id / "study.json").write_bytes(identity)
        return path
    return make


GOOD_POINTER = b'{"id": "' + STUDY_ID.encode() + b'"}'


# -- the catalogue ---------------------------------------------------------------------------------------------

@dataclass
class Case:
    """One bad input: `argv` after the command's base arguments; `{in}` is a folder outside the working directory,
    `{made}` what `make` built there. `words` must appear in the one line on stderr."""

    id: str
    command: str  # train | config | study | reproduce
    argv: list[str]
    words: str
    make: Callable[[Path], Path] | None = None


DATA = ["--set", "data.dataset=imagefolder", "--set", "optim.batch_size=4", "--set", "eval.knn_k=2",
        "--set", "eval.knn_train_limit=4"]
CIFAR = ["--set", "data.dataset=cifar10", "--set", "encoder.in_channels=3", "--set", "data.image_size=32"]

CASES = [
    # config values: type, range, finiteness, cross-field, parsing
    Case("dt-inf", "train", ["--set", "predictor.dt=inf"], "'predictor.dt' = inf"),
    Case("dt-nan", "train", ["--set", "predictor.dt=.nan"], "'predictor.dt' = nan"),
    Case("dt-unparsable", "train", ["--set", "predictor.dt=[1"], "'predictor.dt'"),
    Case("dt-negative", "train", ["--set", "predictor.dt=-0.1"], "'predictor.dt'"),
    Case("steps-zero", "train", ["--set", "predictor.steps=0"], "'predictor.steps'"),
    Case("steps-word", "train", ["--set", "predictor.steps=two"], "'predictor.steps'"),
    Case("steps-fraction", "train", ["--set", "predictor.steps=2.5"], "'predictor.steps'"),
    Case("steps-billion", "train", ["--set", "predictor.steps=1000000000"], "'predictor.steps' = 1000000000"),
    Case("epochs-huge", "train", ["--epochs", "100000"], "'optim.epochs' = 100000"),
    Case("subset-huge", "train", ["--set", "data.subset=1000000000"], "'data.subset' = 1000000000"),
    Case("batch-huge", "train", ["--set", "optim.batch_size=1048576"], "'optim.batch_size' = 1048576"),
    Case("workers-huge", "train", ["--workers", "100000"], "--workers = 100000"),
    Case("study-steps-billion", "study", ["--set", "predictor.steps=1000000000"], "'predictor.steps'"),
    Case("key-typo", "train", ["--set", "predictor.stepz=3"], "predictor.stepz"),
    Case("section-set", "train", ["--set", "predictor=3"], "'predictor' is a section"),
    Case("set-without-equals", "train", ["--set", "predictor.steps"], "dotted.key=value"),
    Case("lr-negative", "train", ["--set", "optim.lr=-1"], "'optim.lr'"),
    Case("lr-infinite", "train", ["--set", "optim.lr=1e999"], "'optim.lr'"),
    Case("seed-negative", "train", ["--set", "seed=-1"], "'seed'"),
    Case("seed-64-bit", "train", ["--set", "data.seed=18446744073709551615"], "'data.seed'"),
    Case("channels-two", "train", ["--set", "encoder.in_channels=2"], "'encoder.in_channels'"),
    Case("blur-kernel-too-big", "train", ["--set", "augment.blur_kernel=99"], "'augment.blur_kernel'"),
    Case("knn-k-above-limit", "train", ["--set", "eval.knn_k=5000"], "'eval.knn_k'"),
    Case("eigmax-above-one", "train", ["--set", "hamjepa_loss.eigmax_ceiling_q=2"],
         "'hamjepa_loss.eigmax_ceiling_q'"),
    Case("final-lr-ratio", "train", ["--set", "optim.final_lr_ratio=2"], "'optim.final_lr_ratio'"),
    Case("bool-as-number", "train", ["--set", "data.download=3"], "'data.download'"),
    Case("method-empty", "train", ["--set", "method="], "'method'"),
    # --config files
    Case("config-not-utf8", "train", ["--config", "{made}"], "not UTF-8", text_file(b"predictor:\n  dt: \xff\n")),
    Case("config-duplicate-section", "train", ["--config", "{made}"], "'predictor' is written twice",
         text_file(b"predictor:\n  dt: 0.1\noptim:\n  lr: 0.1\npredictor:\n  steps: 3\n")),
    Case("config-duplicate-key", "train", ["--config", "{made}"], "'dt' is written twice",
         text_file(b"predictor:\n  dt: 0.1\n  dt: 0.2\n")),
    Case("config-syntax", "train", ["--config", "{made}"], "not valid YAML", text_file(b"predictor: [1\n")),
    Case("config-list", "train", ["--config", "{made}"], "holds a list", text_file(b"- 1\n- 2\n")),
    Case("config-false", "train", ["--config", "{made}"], "holds a boolean (False), not a mapping",
         text_file(b"false\n")),
    Case("config-empty-list", "train", ["--config", "{made}"], "holds a list ([]), not a mapping",
         text_file(b"[]\n")),
    Case("config-number", "study", ["--config", "{made}"], "holds a number", text_file(b"0\n")),
    Case("config-string", "config", ["--config", "{made}"], "holds a string", text_file(b"predictor.steps=3\n")),
    Case("config-unknown-key", "train", ["--config", "{made}"], "predictor.leapfrog_steps",
         text_file(b"predictor:\n  leapfrog_steps: 3\n")),
    Case("config-missing", "train", ["--config", "{in}/nope.yaml"], "does not exist"),
    Case("config-named-pipe", "train", ["--config", "{made}"], "is a named pipe, not a regular file", named_pipe),
    Case("config-device", "config", ["--config", "/dev/zero"], "is a character device, not a regular file"),
    Case("config-long-name", "train", ["--config", "{in}/" + LONG + ".yaml"], "longer than the 255"),
    Case("data-root-long-name", "train", ["--data-root", "{in}/" + LONG], "longer than the 255"),
    Case("storage-long-name", "train", ["--storage-path", "{in}/" + LONG], "longer than the 255"),
    Case("tracking-long-name", "train", ["--tracking-uri", "sqlite:///{in}/" + LONG + ".db"], "longer than the 255"),
    Case("study-storage-long-name", "study", ["--storage-path", "{in}/" + LONG + "/ray"], "longer than the 255"),
    Case("data-file-named-pipe", "train", ["--data-root", "{made}"], "is a named pipe", fashion_with_a_pipe),
    Case("tracking-named-pipe", "train", ["--tracking-uri", "sqlite:///{made}"], "is not writable", named_pipe),
    Case("config-folder", "train", ["--config", "{made}"], "is a folder", folder),
    # resources and run flags
    Case("cpus-nan", "train", ["--cpus-per-worker", "nan"], "--cpus-per-worker = nan"),
    Case("cpus-inf", "train", ["--cpus-per-worker", "inf"], "--cpus-per-worker = inf"),
    Case("cpus-zero", "train", ["--cpus-per-worker", "0"], "--cpus-per-worker = 0"),
    Case("gpus-negative", "train", ["--gpus-per-worker", "-1"], "--gpus-per-worker = -1"),
    Case("gpus-absent", "train", ["--gpus-per-worker", "1"], "--gpus-per-worker = 1"),
    Case("workers-zero", "train", ["--workers", "0"], "--workers = 0"),
    Case("workers-beyond-cpus", "train", ["--workers", "3"], "--workers = 3"),
    Case("workers-not-int", "train", ["--workers", "abc"], "--workers"),
    Case("batch-not-divisible", "train", ["--workers", "3", "--cpus-per-worker", "0.5"], "'optim.batch_size'"),
    Case("max-failures-negative", "train", ["--max-failures", "-1"], "--max-failures = -1"),
    Case("profile-unknown", "train", ["--profile", "laptop"], "--profile"),
    Case("name-quote", "train", ["--name", "it's"], "--name"),
    Case("name-path", "train", ["--name", "../elsewhere"], "--name"),
    Case("experiment-quote", "train", ["--experiment", 'a"b'], "--experiment"),
    Case("experiment-blank", "train", ["--experiment", " "], "--experiment"),
    Case("address-malformed", "train", ["--address", "headnode"], "--address"),
    Case("address-closed-port", "train", ["--address", "127.0.0.1:9"], "cannot be reached"),
    Case("study-address-closed-port", "study", ["--address", "ray://127.0.0.1:9"], "cannot be reached"),
    Case("address-auto-no-cluster", "train", ["--address", "auto", "--name", "run1"],
         "--address = 'auto' finds no running Ray cluster"),
    Case("study-address-auto-no-cluster", "study", ["--address", "auto"], "finds no running Ray cluster"),
    Case("address-port", "train", ["--address", "10.0.0.1:99999"], "--address"),
    # where results go
    Case("tracking-folder-missing", "train", ["--tracking-uri", "sqlite:///{in}/missing/m.db"], "tracking URI"),
    Case("tracking-not-sqlite", "train", ["--tracking-uri", "sqlite:///{made}"], "not a SQLite database",
         text_file(b"some notes\n")),
    Case("tracking-empty-file", "train", ["--tracking-uri", "sqlite:///{made}"], "an empty file, not an MLflow store",
         text_file(b"")),
    Case("tracking-user-database", "train", ["--tracking-uri", "sqlite:///{made}"], "is not an MLflow store",
         sqlite_file(("users",))),
    Case("tracking-older-schema", "train", ["--tracking-uri", "sqlite:///{made}"], "mlflow db upgrade",
         sqlite_file(("experiments", "runs"), older_mlflow_revision())),
    Case("tracking-newer-schema", "train", ["--tracking-uri", "sqlite:///{made}"], "does not know",
         sqlite_file(("experiments", "runs"), "ffffffffffff")),
    Case("study-tracking-user-database", "study", ["--tracking-uri", "sqlite:///{made}"], "is not an MLflow store",
         sqlite_file(("users",))),
    Case("tracking-is-folder", "train", ["--tracking-uri", "sqlite:///{made}"], "tracking URI", folder),
    Case("tracking-postgres-no-driver", "train", ["--tracking-uri", "postgresql+nodriver://u:p@db/mlflow"],
         "does not know"),
    Case("tracking-scheme", "train", ["--tracking-uri", "ftp://example.org/m"], "tracking URI"),
    Case("tracking-unreachable", "train", ["--tracking-uri", "http://127.0.0.1:9"], "cannot be reached"),
    Case("tracking-file-store", "train", ["--tracking-uri", "file:///{in}/mlruns"], "no longer writes file stores"),
    Case("storage-under-file", "train", ["--storage-path", "{made}/ray"], "--storage-path", text_file(b"x")),
    Case("storage-scheme", "train", ["--storage-path", "ftp://bucket/x"], "--storage-path"),
    # data: existence, format, shapes, sizes
    Case("data-root-missing", "train", ["--data-root", "{in}/nonexistent"], "'data.root'"),
    Case("data-root-empty", "train", ["--data-root", "{made}"], "'fashion_mnist' was not found", folder),
    Case("gz-truncated", "train", ["--data-root", "{made}"], "not a complete gzip", broken_fashion("truncated")),
    Case("gz-not-gzip", "train", ["--data-root", "{made}"], "not a complete gzip", broken_fashion("not-gzip")),
    Case("idx-magic", "train", ["--data-root", "{made}"], "bad magic number", broken_fashion("magic")),
    Case("idx-shape", "train", ["--data-root", "{made}"], "holds images of shape", broken_fashion("shape")),
    Case("idx-label-count", "train", ["--data-root", "{made}"], "labels of shape", broken_fashion("labels")),
    Case("idx-label-range", "train", ["--data-root", "{made}"], "labels outside", broken_fashion("label-range")),
    Case("image-undecodable", "train", [*DATA, "--data-root", "{made}", "--set", "data.val_size=2"],
         "cannot be decoded", image_folder("undecodable")),
    Case("image-empty-class", "train", [*DATA, "--data-root", "{made}"], "every class folder",
         image_folder("empty-class")),
    Case("image-one-class", "train", [*DATA, "--data-root", "{made}"], "at least 2 classes",
         image_folder("one-class")),
    Case("image-empty-val", "train", [*DATA, "--data-root", "{made}"], "holds no images", image_folder("empty-val")),
    Case("cifar-not-a-batch", "train", [*CIFAR, "--data-root", "{made}"], "CIFAR file", bad_cifar),
    Case("cifar-batch-named-pipe", "train", [*CIFAR, "--data-root", "{made}"], "is a named pipe, not a regular file",
         lambda path: bad_cifar(path, os.mkfifo)),
    Case("cifar-batch-folder", "train", [*CIFAR, "--data-root", "{made}"], "is a folder, not a regular file",
         lambda path: bad_cifar(path, Path.mkdir)),
    Case("image-named-pipe", "train", [*DATA, "--data-root", "{made}", "--set", "data.val_size=2"],
         "is a named pipe, not a regular file", image_folder("named-pipe")),
    Case("subset-too-big", "train", ["--set", "data.subset=100000"], "'data.subset'"),
    Case("batch-above-split", "train", ["--set", "optim.batch_size=512"], "'optim.batch_size'"),
    Case("val-split-too-large", "train", ["--set", "data.val_size=60000"], "'data.val_size'"),
    # hamjepa config: the same parsing, without running anything
    Case("config-cmd-dt-inf", "config", ["--set", "predictor.dt=inf"], "'predictor.dt'"),
    Case("config-cmd-clip-inf", "config", ["--set", "optim.grad_clip=.inf"], "'optim.grad_clip'"),
    Case("config-cmd-unparsable", "config", ["--set", "predictor.dt=[1"], "'predictor.dt'"),
    Case("config-cmd-not-utf8", "config", ["--config", "{made}"], "not UTF-8", text_file(b"\xfe\xff")),
    Case("config-cmd-duplicate", "config", ["--config", "{made}"], "written twice",
         text_file(b"optim:\n  lr: 1\noptim:\n  lr: 2\n")),
    Case("config-cmd-profile", "config", ["--profile", "laptop"], "--profile"),
    # studies/energy_budget.py
    Case("study-max-concurrent", "study", ["--max-concurrent", "-1"], "--max-concurrent = -1"),
    Case("study-num-samples", "study", ["--num-samples", "0"], "--num-samples = 0"),
    Case("study-seeds", "study", ["--seeds", "-1"], "--seeds = -1"),
    Case("study-sampler-seed", "study", ["--seed", "-1"], "--seed = -1"),
    Case("study-workers", "study", ["--workers", "0"], "--workers = 0"),
    Case("study-workers-beyond-cpus", "study", ["--workers", "4"], "--workers = 4"),
    Case("study-cpus-nan", "study", ["--cpus-per-worker", "nan"], "--cpus-per-worker = nan"),
    Case("study-gpus-absent", "study", ["--gpus-per-worker", "1"], "--gpus-per-worker = 1"),
    Case("study-epochs", "study", ["--epochs", "0"], "'optim.epochs'"),
    Case("study-subset", "study", ["--subset", "-5"], "'data.subset'"),
    Case("study-dataset", "study", ["--dataset", "mnist"], "--dataset"),
    Case("study-ablation", "study", ["--ablation", "byol"], "--ablation"),
    Case("study-primary", "study", ["--primary", "val_knn20_top1"], "--primary"),
    Case("study-no-validation", "study", ["--set", "data.val_size=0"], "'data.val_size'"),
    Case("study-experiment", "study", ["--experiment", "it's"], "--experiment"),
    Case("study-resume-id", "study", ["--resume", "../other"], "--resume"),
    Case("study-tracking", "study", ["--tracking-uri", "sqlite:///{in}/missing/m.db"], "tracking URI"),
    Case("study-storage", "study", ["--storage-path", "{made}/ray"], "--storage-path", text_file(b"x")),
    Case("study-data-root", "study", ["--data-root", "{in}/nonexistent"], "'data.root'"),
    Case("study-data-truncated", "study", ["--data-root", "{made}"], "gzip", broken_fashion("truncated")),
    Case("study-address", "study", ["--address", "ray://"], "--address"),
    # --set on a searched key would only move the first trial's point, inside the range or out of it
    Case("study-set-searched-key", "study", ["--set", "predictor.dt=0.1"], "--freeze predictor.dt --set"),
    Case("study-set-searched-key-outside-its-range", "study", ["--set", "predictor.dt=5"],
         "'predictor.dt' is searched (loguniform(0.01, 0.2))"),
    Case("study-space-named-pipe", "study", ["--space", "{made}"], "search space file", named_pipe),
    Case("study-space-folder", "study", ["--space", "{made}"], "is a folder, not a regular file", folder),
    Case("study-space-not-utf8", "study", ["--space", "{made}"], "is not UTF-8", text_file(b"predictor.dt: \xff\n")),
    Case("study-space-long-name", "study", ["--space", "{in}/" + LONG + ".yaml"], "longer than the 255"),
    Case("study-config-duplicate", "study", ["--config", "{made}"], "written twice",
         text_file(b"predictor:\n  dt: 0.1\npredictor:\n  dt: 0.2\n")),
    # studies/reproduce_paper.py
    Case("reproduce-seeds", "reproduce", ["--seeds", "0"], "--seeds = 0"),
    Case("reproduce-cpus-inf", "reproduce", ["--cpus-per-worker", "inf"], "--cpus-per-worker = inf"),
    Case("reproduce-gpu-profile", "reproduce", ["--profile", "cifar100"], "--gpus-per-worker = 1"),
    Case("reproduce-dt-inf", "reproduce", ["--set", "predictor.dt=inf"], "'predictor.dt'"),
    Case("reproduce-max-concurrent", "reproduce", ["--max-concurrent", "-2"], "--max-concurrent = -2"),
    Case("reproduce-idx-magic", "reproduce", ["--data-root", "{made}"], "bad magic", broken_fashion("magic")),
    Case("reproduce-storage", "reproduce", ["--storage-path", "gopher://x"], "--storage-path"),
    Case("reproduce-not-utf8", "reproduce", ["--config", "{made}"], "not UTF-8", text_file(b"seed: \xe9\n")),
]

NEEDS_STUDY_CHECK = [  # refused by hamjepa.study.invocation.check_resumable
    Case("study-resume-nothing", "study", ["--resume"], "--resume"),
    Case("study-resume-unknown-id", "study", ["--resume", "20240101-000000-abcd"], "--resume"),
    Case("reproduce-resume-nothing", "reproduce", ["--resume"], "--resume"),
    # a resumed study's own files, damaged each way they can be
    Case("latest-empty", "study", ["--resume", "--storage-path", "{made}"], "it is empty", study_folder(b"")),
    Case("latest-truncated", "study", ["--resume", "--storage-path", "{made}"], "is not valid JSON",
         study_folder(GOOD_POINTER[:12])),
    Case("latest-list", "study", ["--resume", "--storage-path", "{made}"], "holds a JSON list", study_folder(b"[]")),
    Case("latest-no-id", "study", ["--resume", "--storage-path", "{made}"], 'has no "id"', study_folder(b"{}")),
    Case("latest-escapes", "study", ["--resume", "--storage-path", "{made}"], "not a study id",
         study_folder(b'{"id": "../elsewhere"}')),
    Case("latest-id-number", "study", ["--resume", "--storage-path", "{made}"], "not a study id",
         study_folder(b'{"id": 7}')),
    Case("identity-truncated", "study", ["--resume", "--storage-path", "{made}"], "is not valid JSON",
         study_folder(GOOD_POINTER, b'{"id": "energy_budget-2025')),
    Case("identity-no-params", "study", ["--resume", "--storage-path", "{made}"], 'has no "params"',
         study_folder(GOOD_POINTER, b'{"id": "' + STUDY_ID.encode() + b'"}')),
    Case("identity-other-study", "study", ["--resume", "--storage-path", "{made}"], "describes study",
         study_folder(GOOD_POINTER, b'{"id": "energy_budget-x", "params": {}}')),
    Case("identity-params-list", "study", ["--resume", "--storage-path", "{made}"], "not a mapping of names",
         study_folder(GOOD_POINTER, b'{"id": "' + STUDY_ID.encode() + b'", "params": [1]}')),
    Case("identity-not-utf8", "study", ["--resume", STUDY_ID, "--storage-path", "{made}"], STUDY_ID,
         study_folder(GOOD_POINTER, b'{"id": "\xff\xfe"}')),
]


# -- running a command in-process --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def energy_budget_space():
    return ROOT / "studies" / "energy_budget.yaml"


@pytest.fixture(scope="module")
def good_data(tmp_path_factory) -> Path:
    return fashion(tmp_path_factory.mktemp("data") / "fashion-mnist")


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """An empty working directory, no ambient settings, a 2-CPU machine without GPUs, and tripwires on work."""
    import mlflow
    import ray
    import ray._private.services

    import hamjepa.study.invocation
    import hamjepa.study.reproduce
    import hamjepa.study.runner
    import hamjepa.train.launch

    def tripwire(what: str):
        def reached(*args, **kwargs):
            raise Reached(f"{what} was called")
        return reached

    for name in ("MLFLOW_TRACKING_URI", "HAMJEPA_STORAGE_PATH", "HAMJEPA_DATA", "CUDA_VISIBLE_DEVICES", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # No Ray cluster runs here (another process's Ray must not answer --address auto): no `ray start` recorded in
    # Ray's temp folder, no raylet among the processes.
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "ray-tmp"))
    monkeypatch.setattr(ray._private.services, "find_gcs_addresses", lambda: frozenset())
    monkeypatch.setattr(data, "DEBIAN_DIRS", {"fashion_mnist": tmp_path / "no-debian-package"})
    monkeypatch.setattr("hamjepa.checks.local_cpus", lambda: 2.0)
    monkeypatch.setattr("hamjepa.checks.local_gpus", lambda: 0)
    monkeypatch.setattr(ray, "init", tripwire("ray.init"))
    monkeypatch.setattr(hamjepa.train.launch, "connect_ray", tripwire("hamjepa.train.launch.connect_ray"))
    monkeypatch.setattr(mlflow.tracking.MlflowClient, "__init__", tripwire("MlflowClient"))
    for name in ("set_tracking_uri", "start_run", "set_experiment", "log_params", "log_metrics"):
        monkeypatch.setattr(mlflow, name, tripwire(f"mlflow.{name}"))
    monkeypatch.setattr(hamjepa.study.runner, "run_study", tripwire("run_study"))
    monkeypatch.setattr(hamjepa.study.reproduce, "run_reproduction", tripwire("run_reproduction"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def base_argv(command: str, good_data: Path) -> list[str]:
    """Valid arguments: the quick profile on a 200-image Fashion-MNIST (40 held out), no download, the rest default."""
    valid = ["--data-root", str(good_data), "--set", "data.download=false", "--set", "optim.batch_size=32",
             "--set", "data.val_size=40"]
    return {"train": ["train", "--profile", "quick", "--set", "data.subset=0", *valid],
            "config": ["config", "--profile", "quick"], "study": ["--subset", "0", *valid],
            "reproduce": ["--profile", "quick", "--subset", "0", *valid]}[command]


def invoke(command: str, argv: list[str], space) -> int:
    try:
        if command in ("train", "config"):
            return cli.main(argv)
        if command == "study":
            return cli.study_main("energy_budget", space, argv)
        return cli.reproduce_main(argv)
    except SystemExit as exit_:  # argparse's refusals
        return exit_.code


REFUSAL_S = 10  # seconds a refusal may take (the slowest, an --address probe, waits 3)


def _contents(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*"))}


def check_refused(case: Case, workdir: Path, good_data: Path, space, capsys) -> None:
    inputs = workdir.parent / "in"
    inputs.mkdir()
    made = case.make(inputs / "made") if case.make else inputs
    argv = [a.replace("{in}", str(inputs)).replace("{made}", str(made)) for a in case.argv]
    before = _contents(inputs)
    started = time.monotonic()
    code = invoke(case.command, [*base_argv(case.command, good_data), *argv], space)
    assert time.monotonic() - started < REFUSAL_S, "a refusal must come at once, not after a wait"
    out, err = capsys.readouterr()
    assert _contents(inputs) == before  # the user's files: not one byte changed, nothing added beside them
    assert code == 2, f"exit {code}; stderr: {err}"
    assert len(err.splitlines()) == 1 and err.endswith("\n"), err
    assert "error: " in err and case.words in err, err
    assert out == ""
    assert list(workdir.iterdir()) == []  # no mlflow.db, no ray_results, no pointer file


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_sentence_before_any_work(case, workdir, good_data, energy_budget_space, capsys):
    check_refused(case, workdir, good_data, energy_budget_space, capsys)


@pytest.mark.parametrize("case", NEEDS_STUDY_CHECK, ids=[c.id for c in NEEDS_STUDY_CHECK])
def test_resume_needs_something_to_resume(case, workdir, good_data, energy_budget_space, capsys):
    check_refused(case, workdir, good_data, energy_budget_space, capsys)


@pytest.mark.parametrize("command,flag,started,now", [("study", "--seeds", "3", "5"),
                                                     ("study", "--num-samples", "4", "6"),
                                                     ("study", "--reference", "3", "5"),
                                                     ("reproduce", "--seeds", "1", "2")])
def test_resume_with_another_study_flag_is_refused_before_ray(command, flag, started, now, workdir, good_data,
                                                              energy_budget_space, capsys, monkeypatch):
    """A study started with `flag started`, resumed with `flag now`: refused naming the flag and both values, and
    `flag started` with --resume gets as far as Ray (so the flag is the only difference)."""
    import hamjepa.study.invocation

    def stored(params: dict) -> Callable[[Path], Path]:
        name = "energy_budget" if command == "study" else "reproduce_paper"
        return study_folder_of(name, json.dumps({"id": f"{name}-{STUDY_ID[14:]}", "params": params}).encode())

    # What the command with `flag started` stores: captured where --resume compares it, as if started without any.
    def capture(study_id, was, params):
        raise Reached(params)

    scratch = stored({})(workdir.parent / "scratch")
    with monkeypatch.context() as patched:
        patched.setattr(hamjepa.study.invocation, "_refuse_changes", capture)
        with pytest.raises(Reached) as captured:
            invoke(command, [*base_argv(command, good_data), flag, started, "--resume", "--storage-path", str(scratch)],
                   energy_budget_space)
    shutil.rmtree(scratch)
    case = Case("resume-another-flag", command, [flag, now, "--resume", "--storage-path", "{made}"],
                f"{flag} was {started}, now {now}", stored(captured.value.args[0]))
    check_refused(case, workdir, good_data, energy_budget_space, capsys)
    with pytest.raises(Reached, match="connect_ray"):
        invoke(command, [*base_argv(command, good_data), flag, started, "--resume", "--storage-path",
                         str(workdir.parent / "in" / "made")], energy_budget_space)


def test_catalogue_is_large_and_covers_every_command():
    assert len(CASES) + len(NEEDS_STUDY_CHECK) >= 60
    assert {c.command for c in CASES} == {"train", "config", "study", "reproduce"}
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("command", ["train", "study", "reproduce"])
def test_base_arguments_get_as_far_as_ray_and_create_nothing(command, workdir, good_data, energy_budget_space):
    """The control: the entries above differ from a valid command line only in their bad part."""
    with pytest.raises(Reached, match="connect_ray"):
        invoke(command, base_argv(command, good_data), energy_budget_space)
    assert list(workdir.iterdir()) == []


REAL_LOCAL_GPUS = checks.local_gpus  # before the fixture pins it at 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine may have a GPU 7, and torch caches its count")
@pytest.mark.parametrize("command,argv", [("train", []), ("train", ["--gpus-per-worker", "1"]),
                                          ("study", ["--gpus-per-worker", "1"])])
def test_cuda_visible_devices_naming_a_gpu_that_is_not_there_is_refused_before_ray(
        command, argv, workdir, good_data, energy_budget_space, capsys, monkeypatch):
    """Ray counts CUDA_VISIBLE_DEVICES' entries as GPUs, so `7` is one GPU to Ray (and `hamjepa train` asks for it by
    default); torch, which the workers use, sees none here: refused naming the variable, not a hang in Ray."""
    monkeypatch.setattr("hamjepa.checks.local_gpus", REAL_LOCAL_GPUS)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    words = "CUDA_VISIBLE_DEVICES = '7' names GPUs that are not there"
    check_refused(Case("cuda-visible-devices-absent", command, argv, words), workdir, good_data, energy_budget_space,
                  capsys)


def test_gpus_ray_counts_but_torch_does_not_see_are_refused_naming_the_driver(monkeypatch):
    from hamjepa.errors import UserError

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(checks, "local_cpus", lambda: 2.0)
    monkeypatch.setattr(checks, "local_gpus", lambda: 2)  # /dev/nvidia0 and 1, as Ray counts them
    monkeypatch.setattr(checks, "cuda_devices", lambda: 0)  # a driver that does not work
    with pytest.raises(UserError, match=r"needs 1 GPUs for 1 worker\(s\) but torch sees 0 on this machine: check the "
                                        "NVIDIA driver"):
        checks.local_capacity("--workers", 1, 1.0, 1.0)
    monkeypatch.setattr(checks, "cuda_devices", lambda: 1)
    checks.local_capacity("--workers", 1, 1.0, 1.0)  # one asked, one seen
    with pytest.raises(UserError, match="needs 2 GPUs for 2 worker"):
        checks.local_capacity("--workers", 2, 1.0, 1.0)
    monkeypatch.setattr(checks, "cuda_devices", lambda: 1 / 0)  # never asked when no GPU is
    checks.local_capacity("--workers", 1, 1.0, 0.0)


@pytest.mark.parametrize("command", ["train", "study", "reproduce"])
def test_paths_with_spaces_and_non_ascii_letters_are_accepted(command, workdir, good_data, energy_budget_space):
    """A storage folder, a SQLite tracking store, a config file and a data folder at paths with spaces and 'ü': every
    check passes them, the command gets as far as Ray, and nothing is created yet."""
    inputs = workdir.parent / "in ü"
    (inputs / "store ü").mkdir(parents=True)
    config = inputs / "conf dir ü" / "c ü.yaml"
    config.parent.mkdir()
    config.write_text("predictor:\n  steps: 2\n")
    data = shutil.copytree(good_data, inputs / "data dir ü" / "fashion mnist ü")
    argv = [*base_argv(command, good_data), "--storage-path", str(inputs / "ray dir ü"), "--tracking-uri",
            f"sqlite:///{inputs}/store ü/m ü.db", "--config", str(config), "--data-root", str(data)]
    before = _contents(inputs)
    with pytest.raises(Reached, match="connect_ray"):
        invoke(command, argv, energy_budget_space)
    assert _contents(inputs) == before and list(workdir.iterdir()) == []


def test_config_base_arguments_print_the_config(workdir, good_data, capsys):
    assert invoke("config", base_argv("config", good_data), None) == 0
    assert "predictor:" in capsys.readouterr().out
