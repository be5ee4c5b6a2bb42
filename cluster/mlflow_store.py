"""Keep the cluster's MLflow store in S3, so terminating the head (`ray down`) loses no run.

The MLflow server on the head keeps runs, params and metrics in SQLite on the head's disk (artifacts already go
to S3). cluster/aws.yaml restores that file from S3 when a head starts and backs it up every 10 minutes; back it
up once more before `ray down`:

    python cluster/mlflow_store.py restore   # only when there is no local store yet: never overwrites one
    python cluster/mlflow_store.py backup    # a consistent snapshot (SQLite's backup API), then upload

Defaults: the store ~/mlflow/mlflow.db, the copy s3://$HAMJEPA_BUCKET/mlflow/mlflow.db; any pyarrow URI works
(file:// in the tests).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
from pathlib import Path


def _copy(source: str, destination: str) -> None:
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(destination) if "://" in destination else (
        pyarrow.fs.LocalFileSystem(), destination)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)  # a no-op on S3, needed in a folder
    pyarrow.fs.copy_files(source, destination)


def default_remote() -> str | None:
    """s3://$HAMJEPA_BUCKET/mlflow/mlflow.db, the bucket cluster/aws.yaml names; None outside a cluster."""
    bucket = os.environ.get("HAMJEPA_BUCKET")
    return f"s3://{bucket}/mlflow/mlflow.db" if bucket else None


def _exists(uri: str) -> bool:
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    return fs.get_file_info(path).type == pyarrow.fs.FileType.File


def restore(store: Path, remote: str) -> str:
    """Fetch the remote copy unless a local store exists (a running server's store is newer than any backup)."""
    if store.exists():
        return f"kept the existing store {store}"
    if not _exists(remote):
        return f"no backup at {remote}; MLflow starts an empty store"
    store.parent.mkdir(parents=True, exist_ok=True)
    _copy(remote, str(store))
    return f"restored {store} from {remote}"


def backup(store: Path, remote: str) -> str:
    """Snapshot the store with SQLite's online backup (consistent while the server writes), then upload it."""
    if not store.exists():
        return f"nothing to back up: {store} does not exist"
    with tempfile.TemporaryDirectory() as folder:
        snapshot = Path(folder) / store.name
        source, target = sqlite3.connect(store), sqlite3.connect(snapshot)
        try:
            source.backup(target)
        finally:
            source.close()
            target.close()
        _copy(str(snapshot), remote)
    return f"backed up {store} to {remote}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["restore", "backup"])
    parser.add_argument("--store", default=str(Path.home() / "mlflow" / "mlflow.db"), help="the SQLite file")
    parser.add_argument("--remote", help="where the copy lives (default s3://$HAMJEPA_BUCKET/mlflow/mlflow.db)")
    args = parser.parse_args(argv)
    remote = args.remote or default_remote()
    if remote is None:
        parser.error("--remote is required when $HAMJEPA_BUCKET is not set")
    try:  # installed on every node (aws.yaml); credentials in a --remote URI are never printed
        from hamjepa.redact import mask_text
    except ImportError:  # pragma: no cover - outside the project
        def mask_text(text):
            return text
    print(mask_text((restore if args.action == "restore" else backup)(Path(args.store).expanduser(), remote)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
