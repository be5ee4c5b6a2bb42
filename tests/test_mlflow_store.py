"""cluster/mlflow_store.py: the head's MLflow store survives `ray down` through dated copies, and is never clobbered.

Every store here is a real MLflow SQLite store (MLflow's own schema, runs made by MlflowClient); the remote is a
file:// folder, which exercises the same pyarrow calls as s3://.
"""

import datetime as dt
import importlib.util
import json
import re
import shutil
import sqlite3
from pathlib import Path

import pytest
from mlflow import MlflowClient

from hamjepa.backup_log import backup_warning

ROOT = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location("cluster_mlflow_store", ROOT / "cluster" / "mlflow_store.py")
STORE = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(STORE)

T0 = dt.datetime(2025, 6, 1, 10, 0, 0, tzinfo=dt.UTC)


def _at(minutes):
    return T0 + dt.timedelta(minutes=minutes)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """An empty migrated MLflow store with one experiment (migrations take seconds, so once per module)."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").create_experiment("study", artifact_location=str(path.parent / "artifacts"))
    return path


def _new_store(template, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(template, path)
    return path


def _add_runs(path, count, finish=True):
    """`count` runs with a metric each, finished unless `finish` is False; returns their ids."""
    client = MlflowClient(f"sqlite:///{path}")
    experiment = client.get_experiment_by_name("study").experiment_id
    ids = []
    for i in range(count):
        run = client.create_run(experiment).info.run_id
        client.log_metric(run, "loss", 1.0 / (i + 1))
        if finish:
            client.set_terminated(run)
        ids.append(run)
    return ids


def _run_ids(path):
    with sqlite3.connect(path) as db:
        return {row[0] for row in db.execute("SELECT run_uuid FROM runs")}


def _folder(remote):
    return Path(remote.removeprefix("file://"))


def _listing(remote):
    return sorted(p.name for p in _folder(remote).iterdir())


def _manifest(remote):
    return json.loads((_folder(remote) / "manifest.json").read_text())


@pytest.fixture
def remote(tmp_path):
    return (tmp_path / "bucket" / "mlflow" / "backups").as_uri()


def test_a_smaller_or_older_or_unrelated_store_never_replaces_the_remote_copy(template, tmp_path, remote):
    head = _new_store(template, tmp_path / "head" / "mlflow.db")
    _add_runs(head, 1)
    stale = tmp_path / "stale" / "mlflow.db"
    stale.parent.mkdir()
    shutil.copy(head, stale)  # the store as it was before the second run: smaller
    running = _add_runs(head, 1, finish=False)[0]
    while_running = tmp_path / "while-running" / "mlflow.db"
    while_running.parent.mkdir()
    shutil.copy(head, while_running)  # same runs, but before the second one ended: older
    MlflowClient(f"sqlite:///{head}").set_terminated(running)
    assert STORE.backup(head, remote, now=_at(0)).state == "ok"
    before = (_listing(remote), _manifest(remote))
    assert before[1]["versions"][0]["runs"] == 2

    with pytest.raises(STORE.StoreError, match=r"holds 2 runs, more than the 1 in .*--force"):
        STORE.backup(stale, remote, now=_at(10))
    with pytest.raises(STORE.StoreError, match=r"later than .*an older store never replaces a newer copy"):
        STORE.backup(while_running, remote, now=_at(10))
    unrelated = _new_store(template, tmp_path / "unrelated" / "mlflow.db")  # e.g. a head that started empty
    _add_runs(unrelated, 3)
    with pytest.raises(STORE.StoreError, match=rf"lacks run {running}, the newest run of the copy"):
        STORE.backup(unrelated, remote, now=_at(10))
    assert (_listing(remote), _manifest(remote)) == before  # nothing uploaded, nothing pruned

    # a store that continues the copy (more runs, later) is backed up; --force overrides the rule
    _add_runs(head, 1)
    assert STORE.backup(head, remote, now=_at(20)).message.endswith("as mlflow-20250601T102000Z.db; versions kept: 2")
    forced = STORE.backup(stale, remote, force=True, now=_at(30))
    assert forced.state == "ok" and _manifest(remote)["latest"] == "mlflow-20250601T103000Z.db"
    assert [v["runs"] for v in _manifest(remote)["versions"]] == [1, 3, 2]  # the larger copies are still kept


def test_backups_are_dated_versions_and_only_the_newest_n_are_kept(template, tmp_path, remote):
    head = _new_store(template, tmp_path / "head" / "mlflow.db")
    for minute in range(0, 70, 10):
        _add_runs(head, 1)
        STORE.backup(head, remote, keep=3, now=_at(minute))
    names = ["mlflow-20250601T110000Z.db", "mlflow-20250601T105000Z.db", "mlflow-20250601T104000Z.db"]
    assert _listing(remote) == sorted([*names, "latest.db", "manifest.json"])  # no partial or older file left
    assert (_folder(remote) / "latest.db").read_bytes() == (_folder(remote) / names[0]).read_bytes()
    manifest = _manifest(remote)
    assert manifest["latest"] == names[0]
    assert [(v["name"], v["runs"]) for v in manifest["versions"]] == list(zip(names, [7, 6, 5]))
    assert manifest["versions"][0]["bytes"] == (_folder(remote) / names[0]).stat().st_size
    assert _run_ids(_folder(remote) / names[0]) == _run_ids(head)

    unchanged = STORE.backup(head, remote, keep=3, now=_at(80))  # an idle store uses up no version
    assert "unchanged since mlflow-20250601T110000Z.db" in unchanged.message
    assert _manifest(remote) == manifest

    new_head = tmp_path / "new-head" / "mlflow.db"
    assert STORE.restore(new_head, remote) == ("ok", f"restored {new_head} (7 runs) from latest.db ({names[0]}) in "
                                                     f"{remote}")
    assert _run_ids(new_head) == _run_ids(head)

    # a head whose clock is behind, or a second backup in the same second, still files the new copy as the newest
    _add_runs(head, 1)
    behind = STORE.backup(head, remote, keep=3, now=_at(5))
    assert behind.message.endswith("as mlflow-20250601T110001Z.db; versions kept: 3")
    assert _listing(remote) == ["latest.db", "manifest.json", *sorted([*names[:2], "mlflow-20250601T110001Z.db"])]
    assert _manifest(remote)["versions"][0]["runs"] == 8


def test_backup_is_consistent_while_the_server_writes_and_restore_never_overwrites(template, tmp_path, remote):
    store = _new_store(template, tmp_path / "head" / "mlflow.db")
    assert STORE.restore(tmp_path / "empty" / "mlflow.db", remote).message.startswith("no backup in")
    (run,) = _add_runs(store, 1)
    server = sqlite3.connect(store)
    server.execute("UPDATE runs SET name = 'uncommitted'")  # a write in flight during the backup
    assert STORE.backup(store, remote, now=_at(0)).state == "ok"
    server.rollback()
    server.close()

    new_head = tmp_path / "new-head" / "mlflow.db"
    assert STORE.restore(new_head, remote).state == "ok"
    with sqlite3.connect(new_head) as db:
        assert db.execute("SELECT name FROM runs").fetchall() != [("uncommitted",)]  # committed data only
    _add_runs(new_head, 1)
    assert STORE.restore(new_head, remote).message == f"kept the existing store {new_head}"  # a live store wins
    assert _run_ids(new_head) > {run}


def _two_versions(template, tmp_path, remote):
    """A remote with an older version (1 run) and a newer one (2 runs); returns the newer's path."""
    head = _new_store(template, tmp_path / "head" / "mlflow.db")
    _add_runs(head, 1)
    STORE.backup(head, remote, now=_at(0))
    _add_runs(head, 1)
    STORE.backup(head, remote, now=_at(10))
    return _folder(remote) / "mlflow-20250601T101000Z.db"


def _corrupt(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = b"\xff" * 4096  # a page in the middle overwritten
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["pages", "truncated"])
def test_a_corrupt_newest_version_falls_back_to_the_previous_one(template, tmp_path, remote, damage):
    newest = _two_versions(template, tmp_path, remote)
    for copy in (newest, _folder(remote) / "latest.db"):
        if damage == "pages":
            _corrupt(copy)
        else:
            copy.write_bytes(copy.read_bytes()[:8192])
    new_head = tmp_path / "new-head" / "mlflow.db"
    outcome = STORE.restore(new_head, remote)
    assert outcome.state == "warning"
    assert outcome.message.startswith(f"restored {new_head} (1 runs) from mlflow-20250601T100000Z.db")
    assert "an older version, because latest.db does not match the SHA-256" in outcome.message
    assert "mlflow-20250601T101000Z.db does not match the SHA-256" in outcome.message
    assert len(_run_ids(new_head)) == 1
    assert sorted(p.name for p in new_head.parent.iterdir()) == ["mlflow.db"]  # no temporary file left


@pytest.mark.parametrize("manifest", ["missing", "garbled"])
def test_without_a_manifest_the_integrity_check_alone_catches_a_corrupt_copy(template, tmp_path, remote, manifest):
    newest = _two_versions(template, tmp_path, remote)
    if manifest == "missing":
        (_folder(remote) / "manifest.json").unlink()
    else:  # a hand edit: entries without their markers are not trusted
        (_folder(remote) / "manifest.json").write_text('{"versions": [{"name": "mlflow-20250601T101000Z.db"}]}')
    _corrupt(newest)
    _corrupt(_folder(remote) / "latest.db")
    new_head = tmp_path / "new-head" / "mlflow.db"
    outcome = STORE.restore(new_head, remote)
    assert outcome.state == "warning"  # said loudly: nothing vouched for the copy but SQLite's own check
    assert "has no readable manifest.json, so the copy was checked by SQLite's integrity check only" in outcome.message
    assert "mlflow-20250601T101000Z.db failed SQLite's integrity check" in outcome.message
    # and a backup with no manifest compares against the newest version that passes the checks
    smaller = _new_store(template, tmp_path / "smaller" / "mlflow.db")
    with pytest.raises(STORE.StoreError, match="more than the 0 in"):
        STORE.backup(smaller, remote, now=_at(20))


def test_restore_leaves_no_file_at_the_target_when_every_copy_is_corrupt_or_the_copy_fails(
        template, tmp_path, remote, monkeypatch):
    newest = _two_versions(template, tmp_path, remote)
    target = tmp_path / "new-head" / "mlflow.db"

    def broken_download(fs, path, local):
        local.write_bytes(b"SQLite format 3\x00" + b"\x00" * 1000)  # half a file, then the network goes
        raise OSError("connection reset")

    monkeypatch.setattr(STORE, "_download", broken_download)
    with pytest.raises(STORE.StoreError, match=r"^fetching latest.db from .* failed \(connection"):
        STORE.restore(target, remote)  # a failed transfer is not a corrupt copy: no silent fallback
    assert list(target.parent.iterdir()) == []
    monkeypatch.undo()

    for version in (newest, _folder(remote) / "mlflow-20250601T100000Z.db", _folder(remote) / "latest.db"):
        _corrupt(version)
    with pytest.raises(STORE.StoreError, match=r"^no version in .* passed the checks .* empty store over them$"):
        STORE.restore(target, remote)
    assert list(target.parent.iterdir()) == []


def test_status_shows_the_last_failure_and_the_versions_kept(template, tmp_path, remote, capsys):
    head = _new_store(template, tmp_path / "head" / "mlflow.db")
    _add_runs(head, 2)
    options = ["--store", str(head), "--remote", remote]
    assert STORE.main(["backup", *options]) == 0
    status_file = head.parent / "backup-status.log"
    assert backup_warning(status_file) is None

    smaller = _new_store(template, tmp_path / "smaller" / "mlflow.db")
    capsys.readouterr()
    assert STORE.main(["backup", "--store", str(smaller), "--remote", remote, "--status-file", str(status_file)]) == 1
    error = capsys.readouterr().err.splitlines()
    assert len(error) == 1 and " backup FAILED: the copy in " in error[0] and "holds 2 runs" in error[0]

    assert STORE.main(["status", *options]) == 1  # non-zero while the last backup failed
    shown = capsys.readouterr().out.splitlines()
    assert shown[0] == f"last backup: {error[0]}"
    assert re.fullmatch(r"last successful backup: 20\d\d-\d\d-\d\dT\d\d:\d\d:\d\dZ \(0 minutes ago\)", shown[1])
    assert shown[2] == f"versions in {remote}: 1" and shown[3].endswith(".db  2 runs")
    warning = backup_warning(status_file)
    assert warning.startswith("the MLflow store's last backup failed: ") and "holds 2 runs" in warning

    _add_runs(head, 1)
    assert STORE.main(["backup", *options]) == 0
    assert STORE.main(["status", *options]) == 0
    assert " backup ok: backed up " in capsys.readouterr().out
    assert backup_warning(status_file) is None
    records = status_file.read_text().splitlines()
    assert [line.split(" ")[1:3] for line in records] == [["backup", "ok:"], ["backup", "FAILED:"], ["backup", "ok:"]]
    # a loop that stopped records nothing, so silence is reported too
    later = dt.datetime.strptime(records[-1][:20], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    assert backup_warning(status_file, now=later + dt.timedelta(minutes=29)) is None
    assert backup_warning(status_file, now=later + dt.timedelta(minutes=45)).startswith(
        "the MLflow store's last backup was 45 minutes ago, so its backup loop has stopped")


def test_restore_outcomes_are_recorded_and_a_failed_restore_exits_non_zero(template, tmp_path, remote, capsys):
    newest = _two_versions(template, tmp_path, remote)
    _corrupt(newest)
    _corrupt(_folder(remote) / "latest.db")
    target = tmp_path / "new-head" / "mlflow.db"
    assert STORE.main(["restore", "--store", str(target), "--remote", remote]) == 0
    assert " restore warning: restored " in capsys.readouterr().err  # the fallback is said where ray up shows it
    target.unlink()
    _corrupt(_folder(remote) / "mlflow-20250601T100000Z.db")
    assert STORE.main(["restore", "--store", str(target), "--remote", remote]) == 1
    assert not target.exists()
    states = [line.split(" ")[1:3] for line in (target.parent / "backup-status.log").read_text().splitlines()]
    assert states == [["restore", "warning:"], ["restore", "FAILED:"]]


def test_flags_are_checked_and_the_bucket_comes_from_the_cluster_environment(monkeypatch, capsys):
    monkeypatch.delenv("HAMJEPA_BUCKET", raising=False)
    assert STORE.default_remote() is None
    with pytest.raises(SystemExit):
        STORE.main(["backup"])
    assert "--remote is required when $HAMJEPA_BUCKET is not set" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        STORE.main(["backup", "--remote", "file:///tmp/x", "--keep", "0"])
    assert "argument --keep: must be a whole number of versions, at least 1, not '0'" in capsys.readouterr().err
    monkeypatch.setenv("HAMJEPA_BUCKET", "example-bucket")
    assert STORE.default_remote() == "s3://example-bucket/backups/mlflow"  # outside MLflow's artifact root


def test_a_copy_the_manifest_does_not_list_is_refused_loudly(template, tmp_path, remote):
    _two_versions(template, tmp_path, remote)
    planted = _new_store(template, tmp_path / "planted" / "mlflow.db")  # newer, larger, but nothing vouches for it
    _add_runs(planted, 5)
    shutil.copy(planted, _folder(remote) / "mlflow-20250601T120000Z.db")
    new_head = tmp_path / "new-head" / "mlflow.db"
    outcome = STORE.restore(new_head, remote)
    assert outcome.state == "warning" and "(2 runs) from latest.db (mlflow-20250601T101000Z.db)" in outcome.message
    assert "mlflow-20250601T120000Z.db is not listed in the manifest, so nothing vouches for it" in outcome.message
    assert len(_run_ids(new_head)) == 2
    # a latest.db the manifest does not vouch for (replaced after the manifest was written) is refused as well
    new_head.unlink()
    shutil.copy(planted, _folder(remote) / "latest.db")
    outcome = STORE.restore(new_head, remote)
    assert "latest.db does not match the SHA-256" in outcome.message and len(_run_ids(new_head)) == 2
    # only unlisted copies: nothing is restored, and `ray up` stops
    (_folder(remote) / "latest.db").unlink()
    for name in ("mlflow-20250601T100000Z.db", "mlflow-20250601T101000Z.db"):
        (_folder(remote) / name).unlink()
    new_head.unlink()
    with pytest.raises(STORE.StoreError, match="not listed in the manifest"):
        STORE.restore(new_head, remote)
    assert not new_head.exists()


def test_backups_only_add_and_latest_db_outlives_the_expired_dated_copies(template, tmp_path, remote, monkeypatch):
    def refused(*args):  # the head's role on S3: no s3:DeleteObject under backups/
        raise AssertionError("a backup without --keep deleted a copy")

    head = _new_store(template, tmp_path / "head" / "mlflow.db")
    monkeypatch.setattr(STORE, "_prune", refused)
    for minute in range(0, 40, 10):
        _add_runs(head, 1)
        assert STORE.backup(head, remote, now=_at(minute)).state == "ok"  # nothing needs a deletion
    monkeypatch.undo()
    assert len([n for n in _listing(remote) if n.startswith("mlflow-")]) == 4
    for name in _listing(remote):  # the bucket's lifecycle expires the dated copies of an idle store
        if name.startswith("mlflow-"):
            (_folder(remote) / name).unlink()
    new_head = tmp_path / "new-head" / "mlflow.db"
    outcome = STORE.restore(new_head, remote)
    assert outcome == ("ok", f"restored {new_head} (4 runs) from latest.db (mlflow-20250601T103000Z.db) in {remote}")
    _add_runs(new_head, 1)
    assert STORE.backup(new_head, remote, now=_at(50)).state == "ok"  # and the store goes on from there
    assert _manifest(remote)["versions"][0]["runs"] == 5 and len(_manifest(remote)["versions"]) == 1
