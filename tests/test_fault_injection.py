"""Faults injected into real `hamjepa train` runs (the quick profile on a 640-image subset, joining the session's
Ray): a full disk, a tracking store made read-only mid-run, a tracking store deleted mid-run. Each must end in
one sentence with nothing lost (docs/design.md "What happens when things fail"); Ctrl-C in a study's compare
phase is test_study.py's.

They mount file systems (a tmpfs of a chosen size, a read-only bind mount), so they need root, which CI has.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from hamjepa.store_faults import sqlite_file
from hamjepa.tracking import REASON_TAG, STATUS_TAG
from hamjepa.train import checkpoints

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs or a read-only bind mount needs root")]

SUBSET = 640


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@pytest.fixture()
def mounts():
    """Mount points to unmount at the end, whatever happened."""
    points: list[Path] = []
    yield points
    for point in reversed(points):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def train_command(ray_cluster: str, name: str, storage: Path, store: Path, epochs: int) -> list[str]:
    return [sys.executable, "-m", "hamjepa", "train", "--profile", "quick", "--epochs", str(epochs), "--subset",
            str(SUBSET), "--name", name, "--address", ray_cluster, "--storage-path", str(storage),
            "--tracking-uri", f"sqlite:///{store}"]


def run(command: list[str], cwd: Path, inject: Callable[[], None] | None = None, after: str = "epoch 1/",
        env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run `command`; call `inject` once stdout shows a line containing `after`. Returns (exit code, out, err)."""
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **(env or {})})
    out = []
    for line in process.stdout:
        out.append(line)
        if inject is not None and after in line:
            inject()
            inject = None
    err = process.stderr.read()
    return process.wait(timeout=600), "".join(out), err


def our_lines(err: str, kind: str) -> list[str]:
    return [line[line.index("hamjepa: "):] for line in err.splitlines() if f"hamjepa: {kind}:" in line]


def the_run(uri: str, name: str):
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`hamjepa.key` = '{name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def epochs_logged(client: MlflowClient, run) -> list[int]:
    return sorted(int(m.step) for m in client.get_metric_history(run.info.run_id, "epoch"))


def checkpoint_sizes() -> tuple[int, int]:
    """Bytes of the quick profile's checkpoint at epoch 0 (weights) and after an epoch (weights + AdamW's state)."""
    from hamjepa.config import profile
    from hamjepa.method.model import JEPAModel

    model = JEPAModel(profile("quick", {}))
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    parameters = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights, weights + 2 * parameters


def fill(folder: Path) -> None:
    """Write into `folder` until its file system is full."""
    with open(folder / "filler", "wb") as stream:
        try:
            while True:
                stream.write(b"\0" * (1 << 16))
                stream.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC


def test_a_full_disk_fails_the_run_once_in_a_sentence_and_the_run_resumes_when_there_is_room(
        ray_cluster, tmp_path, mounts):
    """Storage and store on one small tmpfs: the first epoch's checkpoint cannot fit. Measured before: Ray Train
    retried twice, left two 0-byte checkpoints and a torn state.pt, and marking the run failed raised a raw
    sqlite3 traceback. Wanted: no retry, no torn checkpoint, one sentence; the record saved elsewhere when the
    store's disk is full too; `hamjepa recover` marks it FAILED once there is room; rerunning the name resumes."""
    disk = tmp_path / "disk"
    disk.mkdir()
    first, later = checkpoint_sizes()
    store_bytes, headroom = 3 << 19, 1 << 20  # an MLflow store with one run (about 1.1 MiB), and check_room's
    size = store_bytes + first + headroom + later // 2  # epoch 0's checkpoint fits, epoch 1's does not
    mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk))
    mounts.append(disk)
    elsewhere = tmp_path / "temporary"
    elsewhere.mkdir()
    command = train_command(ray_cluster, "full", disk / "ray", disk / "mlflow.db", epochs=2)

    # The store's disk fills too once epoch 1 is reported (before the run's end writes its record).
    code, out, err = run(command, tmp_path, inject=lambda: fill(disk), env={"TMPDIR": str(elsewhere)})
    assert code == 1, err[-3000:]
    assert "Traceback" not in err
    assert "failed (storage fault, not retried: no space left on the device writing a checkpoint" in out
    assert "the checkpoint of epoch 0 is kept" in out
    errors = our_lines(err, "error")
    recovery = elsewhere / "hamjepa-record-full.json"
    assert len(errors) == 1 and "is on a full disk, so the run is not marked failed there" in errors[0], err[-2000:]
    assert str(recovery) in errors[0] and recovery.is_file()
    # No retry, nothing torn: only epoch 0's checkpoint, and it verifies.
    folders = [p for p in (disk / "ray" / "full").iterdir()
               if p.is_dir() and p.name.startswith(checkpoints.FOLDER_PREFIX)]
    assert len(folders) == 1
    config = torch.load(folders[0] / checkpoints.STATE_FILE, weights_only=True)["config"]
    assert checkpoints.read(str(folders[0]), config, "cpu")["epoch"] == 0  # its manifest's checksum holds

    (disk / "filler").unlink()  # room again: the filler gone, and the disk grown to hold the checkpoints Ray keeps
    mount("-o", "remount,size=64m", str(disk))
    uri = f"sqlite:///{disk / 'mlflow.db'}"
    done = subprocess.run([sys.executable, "-m", "hamjepa", "recover", str(recovery)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    client, record = the_run(uri, "full")
    assert record.info.status == "FAILED" and record.data.tags[STATUS_TAG] == "failed"
    assert record.data.tags[REASON_TAG].startswith("storage fault, not retried")

    code, out, err = run(command, tmp_path)
    assert code == 0, out[-2000:] + err[-2000:]
    client, record = the_run(uri, "full")
    assert record.info.status == "FINISHED" and REASON_TAG not in record.data.tags
    assert epochs_logged(client, record) == [0, 1, 2]  # every epoch once, across the fault and the resume


@pytest.mark.parametrize("fault", ["read-only", "deleted"])
def test_a_store_that_fails_mid_run_never_stops_training_and_the_record_is_recovered(
        ray_cluster, tmp_path, mounts, fault):
    """The store made read-only, or deleted, after epoch 1. Measured before: the MLflow callback's error killed a
    run that had just checkpointed (a Ray Train ControllerError, a traceback), leaving it RUNNING or gone. Wanted:
    training finishes; one warning when the store first refuses and one error sentence at the end naming the
    recovery file; a deleted store is not recreated; `hamjepa recover` writes the whole record."""
    store_folder = tmp_path / "store"
    store_folder.mkdir()
    store = store_folder / "mlflow.db"
    uri = f"sqlite:///{store}"

    def inject() -> None:
        if fault == "read-only":
            mount("--bind", str(store_folder), str(store_folder))
            mounts.append(store_folder)
            mount("-o", "remount,bind,ro", str(store_folder))
        else:
            store.unlink()

    code, out, err = run(train_command(ray_cluster, fault, tmp_path / "ray", store, epochs=3), tmp_path, inject)
    assert code == 1, err[-3000:]
    assert "Traceback" not in err and "hamjepa on fashion_mnist: finished" in out and "epoch 3/3" in out
    said = "is read-only" if fault == "read-only" else "was deleted"
    warnings, errors = our_lines(err, "warning"), our_lines(err, "error")
    assert len(warnings) == 1 and f"{said}; training goes on" in warnings[0], err[-2000:]
    recovery = tmp_path / "ray" / fault / f"hamjepa-record-{fault}.json"
    assert len(errors) == 1 and f"{said}, so the run is not marked finished there" in errors[0]
    assert str(recovery) in errors[0] and recovery.is_file()

    if fault == "read-only":
        subprocess.run(["umount", str(store_folder)], check=True)
        target = uri
        recover = [str(recovery)]
    else:
        assert not store.exists()  # not silently recreated
        refused = subprocess.run([sys.executable, "-m", "hamjepa", "recover", str(recovery)], cwd=tmp_path,
                                 capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2 and "names no file" in refused.stderr and not store.exists()
        target = f"sqlite:///{tmp_path / 'restored.db'}"
        recover = [str(recovery), "--tracking-uri", target]
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "hamjepa", "recover", *recover], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 120
    client, record = the_run(target, fault)
    assert record.info.status == "FINISHED" and record.data.tags[STATUS_TAG] == "finished"
    assert epochs_logged(client, record) == [0, 1, 2, 3]
    assert "test_knn20_top1_q" in record.data.metrics and "init/test_knn20_top1_q" in record.data.metrics
    artifacts = {a.path for a in client.list_artifacts(record.info.run_id, "model")}
    assert "model/encoder.pt" in artifacts
    assert sqlite_file(target).is_file()
