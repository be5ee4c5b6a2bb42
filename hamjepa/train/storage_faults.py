"""A checkpoint that storage cannot take: disk full, over quota, read-only. Not a worker fault.

Ray Train restarts workers whose function raises, and a restart is the right answer to a lost node or a crashed
process; to a full disk it is not: every retry fails the same way, and each leaves another empty checkpoint
folder behind (measured: two 0-byte checkpoints and a torn `state.pt` after Ray's two retries). So a storage
fault is recognised where the checkpoint is written, the folder it tore is removed (a resume must never find
it), and the run ends at once, FAILED with a reason that says what to free; the checkpoints before it stay
usable, so rerunning the run's name resumes once there is room (docs/design.md "What happens when things fail").

No Ray import: the worker passes its storage's pyarrow filesystem in.
"""

from __future__ import annotations

import errno
import os
import shutil
from datetime import datetime
from pathlib import Path

from hamjepa import paths

# errno values that a retry cannot cure: the device is full, the user's quota is spent, the mount is read-only.
STORAGE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                  errno.EROFS: "the file system is read-only"}
_REMEDIES = {errno.ENOSPC: "free space there", errno.EDQUOT: "free space there or raise the quota",
             errno.EROFS: "make it writable"}
# pyarrow raises OSError with the errno only in its text ("[errno 28] No space left on device").
_TEXTS = {"no space left on device": errno.ENOSPC, "disk quota exceeded": errno.EDQUOT,
          "read-only file system": errno.EROFS}
# Room a checkpoint needs beyond its own bytes: Ray's checkpoint manager rewrites a small snapshot file beside it.
HEADROOM_BYTES = 1 << 20


def storage_errno(error: BaseException) -> int | None:
    """The errno of a storage fault that retrying cannot cure, or None for any other error."""
    if not isinstance(error, OSError):
        return None
    if error.errno in STORAGE_ERRNOS:
        return error.errno
    text = str(error).lower()
    return next((number for phrase, number in _TEXTS.items() if phrase in text), None)


def checkpoint_folder_name(now: datetime | None = None) -> str:
    """A new checkpoint's folder name, in Ray's own format (checkpoint_<date>_<time>.<microseconds>), so names still
    order checkpoints (checkpoints.folder_names) and the loop knows which folder a failed upload tore."""
    return (now or datetime.now()).strftime("checkpoint_%Y-%m-%d_%H-%M-%S.%f")


def check_room(local_folder: str, fs, run_folder: str) -> None:
    """Raise OSError(ENOSPC) before uploading a checkpoint that a local storage cannot hold (a cloud store has no
    free space to ask; its upload failing is caught the same way)."""
    import pyarrow.fs

    if not isinstance(fs, pyarrow.fs.LocalFileSystem):
        return
    needed = HEADROOM_BYTES + sum(entry.stat().st_size for entry in os.scandir(local_folder))
    free = shutil.disk_usage(paths.nearest_existing(Path(run_folder))).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"No space left on device: the checkpoint needs {_mib(needed)} and {run_folder} "
                                    f"has {_mib(free)} free")


def remove_torn(fs, folder: str) -> None:
    """Delete a checkpoint folder whose upload failed part-way (a missing folder is fine)."""
    import pyarrow.fs

    try:
        if fs.get_file_info(folder).type == pyarrow.fs.FileType.Directory:
            fs.delete_dir(folder)
    except OSError:  # the disk may refuse even this; the manifest check skips a torn checkpoint on resume anyway
        pass


def reason(number: int, run_folder: str, last_epoch: int) -> str:
    """The run's failure reason: what happened, where, and how to go on (`last_epoch` -1: none checkpointed)."""
    kept = f"the checkpoint of epoch {last_epoch} is kept" if last_epoch >= 0 else "no checkpoint was written"
    return (f"storage fault, not retried: {STORAGE_ERRNOS[number]} writing a checkpoint to {run_folder}; {kept}; "
            f"{_REMEDIES[number]}, then rerun the same --name to resume")


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"
