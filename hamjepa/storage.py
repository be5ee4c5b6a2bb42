"""Where a study keeps its Tune and Train state: a local folder or a URI every node can reach (s3://, gs://).

Ray reads and writes both through pyarrow's filesystems; the few small files of our own (the pointer to a
study's latest invocation) go the same way, so `--storage-path s3://bucket/studies` works unchanged on a
cluster. Paths are strings, not `pathlib.Path`: a Path would mangle `s3://` into `s3:/`.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import ConfigError
from .redact import mask_text, mask_uri

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


def _filesystem(path: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(path) if is_uri(path) else (pyarrow.fs.LocalFileSystem(), path)


def read_text(path: str) -> str | None:
    """The file's text, or None when it does not exist; one sentence if the location cannot be read."""
    import pyarrow.fs

    try:
        fs, inner = _filesystem(path)
        if fs.get_file_info(inner).type != pyarrow.fs.FileType.File:
            return None
        with fs.open_input_stream(inner) as stream:
            return stream.read().decode()
    except (OSError, ValueError) as error:
        raise _unreachable(path, "read", error) from None


def write_text(path: str, text: str) -> None:
    """Write a small file, creating its folder; one sentence if the location cannot be written."""
    try:
        fs, inner = _filesystem(path)
        fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(inner) as stream:
            stream.write(text.encode())
    except (OSError, ValueError) as error:
        raise _unreachable(path, "written", error) from None


def _unreachable(path: str, verb: str, error: Exception) -> ConfigError:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ConfigError(f"--storage-path cannot be {verb} at '{mask_uri(path)}' ({mask_text(first_line)}); pass a "
                       "folder, or a bucket this machine has credentials for.")
