"""Local paths checked for shape and kind before they are opened: one sentence instead of a traceback or a hang.

Shape: a component longer than the file system's name limit (NAME_MAX, 255 bytes on ext4, xfs, tmpfs) or a path
longer than PATH_MAX makes every later call raise `OSError: File name too long` wherever it happens to be first
touched (a stat deep in Ray, MLflow or SQLAlchemy); the limits are asked of the nearest existing folder.
Kind: opening a named pipe blocks until a writer comes (a data file replaced by a FIFO hung the preflight), a
device can stream forever, a folder cannot be read as a file. So each input says what it must be, and anything
else is refused naming what it is.
Writable: a file or folder a command will write is tried before any work (an anonymous temporary file in the
nearest existing folder, a file opened for appending), so a read-only place is refused before the work it would
otherwise have cost, not at the first write after it.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from hamjepa.errors import UserError

DEFAULT_NAME_MAX = 255  # bytes, where the file system does not say (pathconf unsupported)
DEFAULT_PATH_MAX = 4096

KINDS = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"),
         (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def kind(path: str | Path) -> str:
    """What is at `path` (links followed): 'a regular file', 'a folder', 'a named pipe', ..., or 'missing'."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # the latter: a component above it is a file
        return "missing"
    except OSError as error:
        if error.errno == 36:  # ENAMETOOLONG: check_length says it better
            return "missing"
        raise
    return next((name for test, name in KINDS if test(mode)), "something that is neither a file nor a folder")


def _limits(path: Path) -> tuple[int, int]:
    existing = next((p for p in (path, *path.parents) if _exists(p)), Path("/"))
    try:
        return os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):
        return DEFAULT_NAME_MAX, DEFAULT_PATH_MAX


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a too-long name raises instead of answering
        return False


def check_length(what: str, path: str | Path) -> None:
    """One sentence (UserError) when a component of `path` or the whole is longer than its file system allows."""
    path = Path(path)
    name_max, path_max = _limits(path)
    for part in path.parts:
        if len(os.fsencode(part)) > name_max:
            raise UserError(f"{what} '{str(path)[:80]}...' is invalid: its component '{part[:40]}...' is "
                            f"{len(os.fsencode(part))} bytes, longer than the {name_max} this file system allows; "
                            "use a shorter name.")
    if len(os.fsencode(str(path))) >= path_max:
        raise UserError(f"{what} '{str(path)[:80]}...' is invalid: it is {len(os.fsencode(str(path)))} bytes, longer "
                        f"than the {path_max} this system allows; use a shorter path.")


def require(what: str, path: str | Path, wanted: str, fix: str) -> None:
    """`path` has a valid length and is `wanted` ('a regular file' or 'a folder'), or one sentence naming what it
    is instead (missing included)."""
    check_length(what, path)
    found = kind(path)
    if found != wanted:
        is_ = "does not exist" if found == "missing" else f"is {found}, not {wanted}"
        raise UserError(f"{what} '{path}' {is_}; {fix}.")


# -- writable places -------------------------------------------------------------------------------------------

def can_write_in(folder: Path) -> bool:
    """Whether a file can be created in `folder`: tried with an anonymous temporary file, which leaves nothing behind.

    Tried rather than asked (os.access): root passes every permission check, yet cannot write a read-only mount.
    """
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def opens_for_writing(path: Path) -> bool:
    """Whether the existing regular file `path` opens for reading and writing (nothing is written)."""
    try:
        with open(path, "r+b"):
            return True
    except OSError:
        return False


def nearest_existing(path: Path) -> Path:
    """`path`, or the closest folder above it that exists (the one a write would have to create folders in)."""
    return next(p for p in (path, *path.parents) if p.exists())


def require_writable_folder(what: str, path: str | Path, fix: str) -> None:
    """`path` is a folder, or missing and creatable: the nearest existing path above it is a folder this user can
    write in; one sentence otherwise."""
    check_length(what, path)
    found = kind(path)
    if found not in ("a folder", "missing"):
        raise UserError(f"{what} '{path}' is {found}, not a folder; {fix}.")
    existing = nearest_existing(Path(path))
    if not existing.is_dir() or not can_write_in(existing):
        raise UserError(f"{what} '{path}' cannot be written: '{existing}' is not a folder this user can write in; "
                        f"{fix}.")


def require_writable_file(what: str, path: str | Path, fix: str) -> None:
    """`path` is a regular file this user can write, or missing with a folder above it that takes new files (the
    folders between are created by the write); one sentence otherwise."""
    check_length(what, path)
    found = kind(path)
    if found == "a regular file" and not opens_for_writing(Path(path)):
        raise UserError(f"{what} '{path}' cannot be written (permission denied); {fix}.")
    if found not in ("a regular file", "missing"):
        raise UserError(f"{what} '{path}' is {found}, not a regular file; {fix}.")
    existing = nearest_existing(Path(path).parent)
    if found == "missing" and (not existing.is_dir() or not can_write_in(existing)):
        raise UserError(f"{what} '{path}' cannot be created: '{existing}' is not a folder this user can write in; "
                        f"{fix}.")
