"""cluster/mlflow_store.py: the head's MLflow store survives `ray down` through a copy in the bucket."""

import runpy
import sqlite3
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STORE = runpy.run_path(str(ROOT / "cluster" / "mlflow_store.py"))


def _rows(path):
    with sqlite3.connect(path) as db:
        return db.execute("SELECT name FROM runs ORDER BY name").fetchall()


def test_backup_is_consistent_while_the_server_writes_and_restore_never_overwrites(tmp_path):
    store, remote = tmp_path / "head" / "mlflow.db", (tmp_path / "bucket" / "mlflow.db").as_uri()
    assert "no backup" in STORE["restore"](store, remote) and not store.exists()

    store.parent.mkdir()
    server = sqlite3.connect(store)
    server.execute("CREATE TABLE runs (name TEXT)")
    server.execute("INSERT INTO runs VALUES ('finished')")
    server.commit()
    server.execute("INSERT INTO runs VALUES ('uncommitted')")  # a write in flight during the backup
    assert "backed up" in STORE["backup"](store, remote)
    server.rollback()
    server.close()

    new_head = tmp_path / "new-head" / "mlflow.db"
    assert "restored" in STORE["restore"](new_head, remote)
    assert _rows(new_head) == [("finished",)]  # committed data only, a valid database

    with sqlite3.connect(new_head) as db:
        db.execute("INSERT INTO runs VALUES ('newer')")
    assert "kept the existing store" in STORE["restore"](new_head, remote)  # a live store wins over a backup
    assert _rows(new_head) == [("finished",), ("newer",)]


def test_the_bucket_comes_from_the_cluster_environment(monkeypatch, capsys):
    monkeypatch.delenv("HAMJEPA_BUCKET", raising=False)
    assert STORE["default_remote"]() is None
    with pytest.raises(SystemExit):
        STORE["main"](["backup"])
    assert "--remote is required when $HAMJEPA_BUCKET is not set" in capsys.readouterr().err
    monkeypatch.setenv("HAMJEPA_BUCKET", "example-bucket")
    assert STORE["default_remote"]() == "s3://example-bucket/mlflow/mlflow.db"
