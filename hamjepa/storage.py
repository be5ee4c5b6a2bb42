"""Where a study keeps its Tune and Train state: a local folder or a URI every node can reach (s3://, gs://).

Ray reads and writes both through pyarrow's filesystems; the few small files of our own (the pointer to a
study's latest invocation) go the same way, so `--storage-path s3://bucket/studies` works unchanged on a
cluster. Paths are strings, not `pathlib.Path`: a Path would mangle `s3://` into `s3:/`.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from hamjepa import paths
from hamjepa.errors import UserError
from hamjepa.redact import mask_text, mask_uri

DEFAULT = "ray_results"
ENVIRONMENT_VARIABLE = "HAMJEPA_STORAGE_PATH"  # cluster/aws.yaml sets it to s3://<bucket>/ray


def is_uri(path: str) -> bool:
    return "://" in path


def resolve(path: str | None = None) -> str:
    """The storage location: `path`, else $HAMJEPA_STORAGE_PATH, else ./ray_results; local paths made absolute.

    Absolute, because Ray workers run in other working directories.
    """
    path = path or os.environ.get(ENVIRONMENT_VARIABLE) or DEFAULT
    return path.rstrip("/") if is_uri(path) else str(Path(path).resolve())


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def filesystem(path: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(path) if is_uri(path) else (pyarrow.fs.LocalFileSystem(), path)


def read_text(path: str) -> str | None:
    """The file's text, or None when it does not exist; one sentence if the location cannot be read."""
    import pyarrow.fs

    try:
        fs, inner = filesystem(path)
        if fs.get_file_info(inner).type != pyarrow.fs.FileType.File:
            return None
        with fs.open_input_stream(inner) as stream:
            return stream.read().decode()
    except (OSError, ValueError) as error:
        raise _unreachable(path, "read", error) from None


def write_text(path: str, text: str, atomic: bool = False) -> None:
    """Write a small file, creating its folder; one sentence if the location cannot be written.

    `atomic`: readers see the old file or the new one, never a half-written one (written beside, then
    renamed; an object store's put is atomic already).
    """
    try:
        fs, inner = filesystem(path)
        fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
        staged = f"{inner}.tmp-{os.getpid()}-{secrets.token_hex(3)}" if atomic and not is_uri(path) else inner
        with fs.open_output_stream(staged) as stream:
            stream.write(text.encode())
        if staged != inner:
            fs.move(staged, inner)
    except (OSError, ValueError) as error:
        raise _unreachable(path, "written", error) from None


def _unreachable(path: str, verb: str, error: Exception) -> UserError:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return UserError(f"--storage-path cannot be {verb} at '{mask_uri(path)}' ({mask_text(first_line)}); pass a "
                     "folder, or a bucket this machine has credentials for.")


REMOTE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")  # pyarrow's; reached only by Ray's nodes


def check_writable(path: str | None = None) -> None:
    """Before any work: a local storage folder (or the nearest folder above it) must be a writable folder.

    Nothing is created here. A remote URI is checked only for its scheme: reaching a bucket costs a network call
    and needs the credentials the cluster's nodes have, so its errors come from Ray, at the first write.
    """
    location = resolve(path)
    if is_uri(location):
        scheme = location.split("://", 1)[0]
        if scheme == "file":
            return check_writable(location[len("file://"):] or "/")
        if scheme not in REMOTE_SCHEMES:
            raise UserError(f"--storage-path = '{mask_uri(location)}' is invalid: use a folder, file://, or one of "
                            f"{', '.join(s + '://' for s in REMOTE_SCHEMES)}.")
        return None
    paths.check_length("--storage-path", location)
    existing = paths.nearest_existing(Path(location))
    if not existing.is_dir() or not paths.can_write_in(existing):
        raise UserError(f"--storage-path = '{location}' is not writable: '{existing}' is not a folder this user can "
                        "write; pass a writable folder (or set $HAMJEPA_STORAGE_PATH).")
    return None
