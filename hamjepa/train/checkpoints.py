"""A training checkpoint that can be trusted: written with a manifest, read back verified, with a fallback.

Each checkpoint folder holds the training state (`state.pt`) and `manifest.json` with the state file's
SHA-256 and the hash of the config that wrote it. Reading one checks both; a checkpoint that fails (a torn
upload, a flipped byte, a file that does not load) is skipped with a warning for the next older one Ray
kept (`CheckpointConfig(num_to_keep=2)`), and only when none is usable does the run fail, with a sentence.
A checkpoint written by a different config is never used: that run is another run under the same name.

No Ray import: the same code reads a checkpoint in a Ray Train worker and in a test.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch

from hamjepa.config import flatten_dict

STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
FOLDER_PREFIX = "checkpoint_"  # how Ray Train names the checkpoint folders of a run


class CheckpointError(RuntimeError):
    """No checkpoint of the run can be used; the message is one sentence saying why."""


def config_hash(config: Mapping[str, Any]) -> str:
    """A config tree's identity: SHA-256 of its canonical JSON."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _file_hash(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write(directory: str, state: Mapping[str, Any]) -> None:
    """Write `state` (which carries its "config") and its manifest into `directory`."""
    path = os.path.join(directory, STATE_FILE)
    torch.save(dict(state), path)
    manifest = {"sha256": _file_hash(path), "config_hash": config_hash(state.get("config", {})),
                "epoch": state.get("epoch")}
    with open(os.path.join(directory, MANIFEST_FILE), "w") as stream:
        json.dump(manifest, stream)


def read(directory: str, config: Mapping[str, Any], device: torch.device | str = "cpu") -> dict[str, Any]:
    """The state in `directory`, verified against its manifest and `config`; CheckpointError if unusable.

    `directory` is a checkpoint Ray Train restored, holding the files `write` made, not a path a user names: so no
    kind check (paths.py) before the reads; a damaged or replaced file fails the manifest instead."""
    state_path, manifest_path = os.path.join(directory, STATE_FILE), os.path.join(directory, MANIFEST_FILE)
    try:
        with open(manifest_path) as stream:
            manifest = json.load(stream)
        digest = _file_hash(state_path)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"it cannot be read ({type(error).__name__}: {error})") from None
    if digest != manifest.get("sha256"):
        raise CheckpointError("its state file does not match its checksum (a torn or corrupted write)")
    if manifest.get("config_hash") != config_hash(config):
        raise ConfigMismatch(_differences(directory, config, device))
    try:
        return torch.load(state_path, map_location=device, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the same: unusable
        raise CheckpointError(f"its state does not load ({type(error).__name__})") from None


class ConfigMismatch(CheckpointError):
    """The checkpoint belongs to a run of another config under the same name."""


def _differences(directory: str, config: Mapping[str, Any], device) -> str:
    try:
        stored = torch.load(os.path.join(directory, STATE_FILE), map_location=device, weights_only=True)["config"]
    except Exception:  # noqa: BLE001 - the hashes differ; which keys is a courtesy
        return "it was written by a different config"
    before, now = flatten_dict(stored), flatten_dict(config)
    keys = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    return f"it was written by a different config (differs in {', '.join(keys[:6])})"


def read_newest_usable(candidates: list[str], config: Mapping[str, Any],
                       device: torch.device | str = "cpu", fetch=None) -> dict[str, Any]:
    """The state of the first usable checkpoint in `candidates` (newest first), warning for each one skipped.

    `fetch(candidate)` is a context manager giving a local folder (Ray's `Checkpoint.as_directory`); by
    default candidates are local folders. A config mismatch is not skipped: it fails the run at once.
    """
    fetch = fetch or contextlib.nullcontext  # local folders need no fetching
    reasons = []
    for candidate in candidates:
        try:
            with fetch(candidate) as directory:
                return read(directory, config, device)
        except ConfigMismatch as error:
            raise CheckpointError(f"checkpoint {os.path.basename(candidate.rstrip('/'))} cannot resume this run: "
                                  f"{error}; use another run name, or the config it was started with.") from None
        except CheckpointError as error:
            reasons.append(f"{os.path.basename(candidate.rstrip('/'))}: {error}")
            print(f"hamjepa: warning: skipping checkpoint {reasons[-1]}", file=sys.stderr)
    raise CheckpointError(f"no checkpoint of this run is usable ({'; '.join(reasons) or 'none found'}); start it "
                          "again under a new name.")


def folder_names(fs, parent: str) -> list[str]:
    """The names of the checkpoint folders under `parent` on pyarrow filesystem `fs`, newest first (Ray names them
    checkpoint_<timestamp>, so the name orders them; Ray keeps files and folders of its own beside them)."""
    import pyarrow.fs

    return sorted((info.base_name for info in fs.get_file_info(pyarrow.fs.FileSelector(parent))
                   if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith(FOLDER_PREFIX)),
                  reverse=True)


def siblings_newest_first(latest: str, listing: list[str]) -> list[str]:
    """The latest checkpoint, then the other checkpoint folders of its run (`listing`: the names beside it),
    newest first. Ray names them checkpoint_<timestamp>, so the name orders them."""
    parent, name = os.path.split(latest.rstrip("/"))
    older = sorted((n for n in listing if n.startswith(FOLDER_PREFIX) and n != name), reverse=True)
    return [latest, *(os.path.join(parent, n) for n in older)]
