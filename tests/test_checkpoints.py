"""Checkpoints that can be trusted: checksummed, tied to their config, an older one used when the newest is bad."""

import json
import os

import pytest
import torch

from hamjepa.train import checkpoints
from hamjepa.train.checkpoints import CheckpointError

CONFIG = {"method": "hamjepa", "optim": {"epochs": 4, "lr": 0.004}, "seed": 0}


def _write(folder, epoch, config=CONFIG):
    os.makedirs(folder)
    checkpoints.write(str(folder), {"epoch": epoch, "config": config, "weights": torch.arange(6.0) * epoch})
    return str(folder)


def _run_folder(tmp_path):
    """A run's folder as Ray Train leaves it: two checkpoints (num_to_keep=2), named by time."""
    older = _write(tmp_path / "checkpoint_2026-11-29_10-00-01.000001", epoch=2)
    newer = _write(tmp_path / "checkpoint_2026-11-29_10-00-09.000002", epoch=3)
    return older, newer


def test_the_newest_checkpoint_is_used_when_it_is_sound(tmp_path):
    older, newer = _run_folder(tmp_path)
    candidates = checkpoints.siblings_newest_first(newer, os.listdir(tmp_path))
    assert candidates == [newer, older]
    state = checkpoints.read_newest_usable(candidates, CONFIG)
    assert state["epoch"] == 3 and torch.equal(state["weights"], torch.arange(6.0) * 3)


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "drop the manifest"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_older_one_with_a_warning(tmp_path, capsys, damage):
    older, newer = _run_folder(tmp_path)
    state_file = os.path.join(newer, checkpoints.STATE_FILE)
    data = bytearray(open(state_file, "rb").read())
    if damage == "flip a byte":
        data[len(data) // 2] ^= 0xFF
        open(state_file, "wb").write(bytes(data))
    elif damage == "truncate":
        open(state_file, "wb").write(bytes(data[: len(data) // 3]))
    else:
        os.remove(os.path.join(newer, checkpoints.MANIFEST_FILE))
    state = checkpoints.read_newest_usable(checkpoints.siblings_newest_first(newer, os.listdir(tmp_path)), CONFIG)
    assert state["epoch"] == 2  # the previous checkpoint, not a failure and not a fresh start
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "skipping checkpoint checkpoint_2026-11-29_10-00-09.000002" in warning[0]


def test_no_usable_checkpoint_fails_the_run_in_one_sentence(tmp_path):
    older, newer = _run_folder(tmp_path)
    for folder in (older, newer):
        path = os.path.join(folder, checkpoints.STATE_FILE)
        open(path, "wb").write(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"no checkpoint of this run is usable \(.*checksum.*\); start it"):
        checkpoints.read_newest_usable(checkpoints.siblings_newest_first(newer, os.listdir(tmp_path)), CONFIG)


def test_a_checkpoint_of_another_config_is_refused_naming_the_keys(tmp_path):
    older, newer = _run_folder(tmp_path)
    changed = {**CONFIG, "optim": {"epochs": 8, "lr": 0.004}}
    with pytest.raises(CheckpointError, match=r"written by a different config \(differs in optim.epochs\)"):
        checkpoints.read_newest_usable([newer, older], changed)


def test_the_manifest_records_the_checksum_and_the_config(tmp_path):
    folder = _write(tmp_path / "checkpoint_1", epoch=1)
    manifest = json.loads(open(os.path.join(folder, checkpoints.MANIFEST_FILE)).read())
    assert manifest["epoch"] == 1 and len(manifest["sha256"]) == 64
    assert manifest["config_hash"] == checkpoints.config_hash({"seed": 0, "optim": {"lr": 0.004, "epochs": 4},
                                                               "method": "hamjepa"})  # key order is irrelevant
    assert manifest["config_hash"] != checkpoints.config_hash({**CONFIG, "seed": 1})
