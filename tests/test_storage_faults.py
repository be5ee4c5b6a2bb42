"""Storage that cannot take a checkpoint (full, over quota, read-only): recognised, refused before a torn write,
a torn folder removed, and a reason that says what to do. No Ray; the fault in a real run is in
test_fault_injection.py (slow tier)."""

from __future__ import annotations

import errno
import os
from datetime import datetime, timedelta

import pyarrow.fs
import pytest

from hamjepa.train import checkpoints, storage_faults


@pytest.mark.parametrize(("error", "number"), [
    (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), errno.EDQUOT),
    (OSError(errno.EROFS, "Read-only file system"), errno.EROFS),
    # pyarrow's own wording, with the errno only in its text (measured: a checkpoint copy to a full tmpfs)
    (OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device"), errno.ENOSPC),
    (OSError(errno.EIO, "Input/output error"), None),  # a fault a retry may cure: Ray's to retry
    (OSError(errno.ENOENT, "No such file or directory"), None),
    (RuntimeError("No space left on device"), None),  # not an OS error: some other bug
])
def test_only_faults_a_retry_cannot_cure_are_storage_faults(error, number):
    assert storage_faults.storage_errno(error) == number


def test_a_checkpoint_that_does_not_fit_is_refused_before_it_is_written(tmp_path, monkeypatch):
    local = tmp_path / "local"
    local.mkdir()
    (local / "state.pt").write_bytes(b"x" * 4096)
    fs = pyarrow.fs.LocalFileSystem()
    run_folder = str(tmp_path / "storage" / "run")  # not there yet: the nearest existing folder's disk is asked
    storage_faults.check_room(str(local), fs, run_folder)  # this machine's disk has room for 4 KiB

    class Usage:
        free = storage_faults.HEADROOM_BYTES + 4095  # one byte short
    monkeypatch.setattr(storage_faults.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(OSError) as raised:
        storage_faults.check_room(str(local), fs, run_folder)
    assert raised.value.errno == errno.ENOSPC and storage_faults.storage_errno(raised.value) == errno.ENOSPC
    assert not os.path.exists(run_folder)


def test_a_torn_checkpoint_folder_is_removed_and_a_missing_one_is_fine(tmp_path):
    fs = pyarrow.fs.LocalFileSystem()
    torn = tmp_path / storage_faults.checkpoint_folder_name()
    torn.mkdir()
    (torn / checkpoints.STATE_FILE).write_bytes(b"")
    storage_faults.remove_torn(fs, str(torn))
    assert not torn.exists()
    storage_faults.remove_torn(fs, str(torn))


def test_folder_names_keep_rays_format_so_names_order_checkpoints(tmp_path):
    now = datetime(2026, 12, 7, 1, 40, 16, 857615)
    names = [storage_faults.checkpoint_folder_name(now + timedelta(seconds=s)) for s in (0, 9, 70)]
    assert names[0] == "checkpoint_2026-12-07_01-40-16.857615"
    for name in names:
        (tmp_path / name).mkdir()
    assert checkpoints.folder_names(pyarrow.fs.LocalFileSystem(), str(tmp_path)) == names[::-1]


def test_the_reason_says_what_failed_what_is_kept_and_how_to_go_on():
    said = storage_faults.reason(errno.ENOSPC, "/data/ray/run1", 3)
    assert said.startswith("storage fault, not retried: no space left on the device")
    assert "/data/ray/run1" in said and "epoch 3" in said and "rerun the same --name" in said
    assert "free space there, then rerun" in said
    read_only = storage_faults.reason(errno.EROFS, "/data/ray/run1", -1)
    assert "no checkpoint was written" in read_only and "make it writable, then rerun" in read_only
