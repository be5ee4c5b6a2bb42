"""Keep the cluster's MLflow store in S3, so terminating the head (`ray down`) loses no run, and never clobber it.

The MLflow server on the head keeps runs, params and metrics in SQLite on the head's disk (artifacts already go
to S3). cluster/aws.yaml restores that file when a head starts and backs it up every 10 minutes; back it up once
more before `ray down`:

    python cluster/mlflow_store.py restore   # only when there is no local store yet: never overwrites one
    python cluster/mlflow_store.py backup    # a checked snapshot, uploaded as a new dated version
    python cluster/mlflow_store.py status    # the last backup's outcome and the versions kept

The remote is a folder (default s3://$HAMJEPA_BUCKET/backups/mlflow, outside MLflow's artifact root, so the
server's artifact proxy never reaches it; any pyarrow URI, file:// in the tests):

    mlflow-20250601T101500Z.db   one dated version per backup, UTC
    latest.db                     the latest version again, under a name that never expires
    manifest.json                 the latest version's name and, per version, its size, SHA-256 and markers

Backups only add: on S3 the head may put objects there but not delete them (cluster/aws_setup.py), and the
bucket's lifecycle expires dated versions after 30 days while latest.db and the manifest stay, so a store idle
for months is still restored. `--keep N` deletes all but the newest N dated versions where the writer may
delete (an NFS or local folder); with S3 leave it out.

Restore trusts the manifest: it takes latest.db, or else the newest dated version, only when the manifest lists
it and its SHA-256 matches; a version the manifest does not list (an upload nothing vouches for) is refused and
named in the outcome. Without a readable manifest it falls back to SQLite's integrity check and says so loudly.

Why a backup can be refused: a new head whose restore was skipped, or a store copied back by hand, is smaller
or older than the bucket's copy, and uploading it would push the real store out of the kept versions. The
markers of a store are its run count, its last update (the latest run start, run end or metric timestamp, in
ms) and its newest run's id; a backup is refused, unless --force, when the latest remote version has more runs,
a later last update, or a newest run the local store lacks (the local store is not a continuation of it).
Deleting runs for good (`mlflow gc`) lowers the count, so the first backup after it needs --force.

Every backup and restore appends one dated line to the status file beside the store (~/mlflow/backup-status.log)
and a failure exits non-zero with one sentence; `status` prints the last backup's line, so a failed backup in
the 10-minute loop is seen with `ray exec` rather than only in the loop's own log.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

from hamjepa import paths
from hamjepa.arguments import Parser
from hamjepa.backup_log import STATUS_FILE, age_of, last_line, record
from hamjepa.errors import UserError
from hamjepa.redact import mask_text  # credentials in a --remote URI are never printed

DATED = re.compile(r"^mlflow-\d{8}T\d{6}Z\.db$")  # fixed width, so the names sort in time order
LATEST = "latest.db"  # the latest version once more, under a name the bucket's lifecycle never expires
MANIFEST = "manifest.json"
FORCE_HINT = "pass --force to upload it anyway"


class StoreError(Exception):
    """A refusal or failure, in one sentence."""


class Corrupt(StoreError):
    """A copy that fails the checks: restore falls back to the previous version, unlike a failed transfer."""


class Markers(NamedTuple):
    """What makes one MLflow store newer than another (see the module docstring for the rule)."""

    runs: int
    last_update_ms: int
    newest_run: str | None


class Outcome(NamedTuple):
    """A finished backup or restore: state is "ok", "warning" or "skipped"; failures raise StoreError."""

    state: str
    message: str


# -- the remote folder ----------------------------------------------------------------------------------------

def default_remote() -> str | None:
    """s3://$HAMJEPA_BUCKET/backups/mlflow, under the bucket cluster/aws.yaml names; None outside a cluster."""
    bucket = os.environ.get("HAMJEPA_BUCKET")
    return f"s3://{bucket}/backups/mlflow" if bucket else None


def _remote(uri: str):
    """(filesystem, folder path) of a remote folder URI."""
    import pyarrow.fs

    try:
        fs, folder = pyarrow.fs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as error:
        raise StoreError(f"the remote {uri} is not a folder URI pyarrow can open ({error})") from error
    return fs, folder.rstrip("/")


def _is_local(fs) -> bool:
    import pyarrow.fs

    return isinstance(fs, pyarrow.fs.LocalFileSystem)


def _versions(fs, folder: str) -> list[str]:
    """The dated versions in the folder, newest first."""
    import pyarrow.fs

    infos = fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
    return sorted((i.base_name for i in infos if DATED.match(i.base_name)), reverse=True)


def _read_manifest(fs, folder: str) -> dict | None:
    """The manifest, or None when it is missing or unreadable (the versions themselves are then the truth)."""
    try:
        with fs.open_input_stream(f"{folder}/{MANIFEST}") as stream:
            manifest = json.loads(stream.read())
    except (OSError, ValueError):
        return None
    versions = manifest.get("versions") if isinstance(manifest, dict) else None
    return manifest if isinstance(versions, list) and all(map(_sound_entry, versions)) else None


def _sound_entry(entry) -> bool:
    """A manifest entry as backup writes it (a hand-edited or truncated one makes the manifest unreadable)."""
    return (isinstance(entry, dict) and isinstance(entry.get("name"), str) and DATED.match(entry["name"]) is not None
            and isinstance(entry.get("runs"), int) and isinstance(entry.get("last_update_ms"), int)
            and isinstance(entry.get("newest_run"), str | None))


def _publish(local: Path, fs, path: str) -> None:
    """Upload a file so that `path` appears only complete.

    An S3 object appears only when its upload completes; a local or NFS folder would show a half-written file,
    so there the upload goes to a hidden name first and is renamed (atomic within one filesystem).
    """
    import pyarrow.fs

    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    target = f"{path.rsplit('/', 1)[0]}/.{path.rsplit('/', 1)[1]}.partial" if _is_local(fs) else path
    try:
        pyarrow.fs.copy_files(str(local), target, source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=fs)
        if target != path:
            fs.move(target, path)
    except OSError:
        with contextlib.suppress(OSError):
            fs.delete_file(target)
        raise


def _download(fs, path: str, local: Path) -> None:
    import pyarrow.fs

    pyarrow.fs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem())


# -- checking a store -----------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check(path: Path, name: str | None = None) -> Markers:
    """SQLite's integrity check, then a read of MLflow's runs and metrics; Corrupt, naming `name`, if either fails."""
    name = name or path.name
    with contextlib.closing(sqlite3.connect(path)) as db:
        try:
            verdict = db.execute("PRAGMA integrity_check").fetchone()[0]
        except sqlite3.Error as error:  # a header or page so damaged that the check itself cannot run
            verdict = str(error)
        if verdict != "ok":
            raise Corrupt(f"{name} failed SQLite's integrity check ({verdict})")
        try:
            runs, started, ended = db.execute("SELECT count(*), max(start_time), max(end_time) FROM runs").fetchone()
            (logged,) = db.execute("SELECT max(timestamp) FROM metrics").fetchone()
            newest = db.execute("SELECT run_uuid FROM runs ORDER BY start_time DESC, run_uuid DESC LIMIT 1").fetchone()
        except sqlite3.Error as error:
            raise Corrupt(f"{name} is not a readable MLflow store ({error})") from error
    last = max((t for t in (started, ended, logged) if t is not None), default=0)
    return Markers(runs, int(last), newest[0] if newest else None)


def _newer_remote(local: Markers, remote: Markers, store: Path, uri: str, lacks_newest: bool) -> str | None:
    """Why the remote copy must not be replaced by the local store, in one sentence, or None."""
    if remote.runs > local.runs:
        return (f"the copy in {uri} holds {remote.runs} runs, more than the {local.runs} in {store}, and a smaller "
                f"store never replaces a larger copy ({FORCE_HINT})")
    if remote.last_update_ms > local.last_update_ms:
        return (f"the copy in {uri} was updated at {_iso_ms(remote.last_update_ms)}, later than {store} "
                f"({_iso_ms(local.last_update_ms)}), and an older store never replaces a newer copy ({FORCE_HINT})")
    if lacks_newest:
        return (f"{store} lacks run {remote.newest_run}, the newest run of the copy in {uri}, so it does not "
                f"continue that copy ({FORCE_HINT})")
    return None


def _has_run(store: Path, run: str | None) -> bool:
    if run is None:
        return True
    with contextlib.closing(sqlite3.connect(store)) as db:
        return db.execute("SELECT 1 FROM runs WHERE run_uuid = ?", (run,)).fetchone() is not None


# -- backup ---------------------------------------------------------------------------------------------------

def _snapshot(store: Path, folder: Path) -> Path:
    """A consistent copy while the server writes (SQLite's online backup), in rollback-journal mode."""
    snapshot = folder / "snapshot.db"
    source, target = sqlite3.connect(store), sqlite3.connect(snapshot)
    try:
        source.backup(target)
        target.execute("PRAGMA journal_mode=DELETE")  # a single self-contained file, whatever the server uses
    finally:
        source.close()
        target.close()
    return snapshot


def _remote_latest(fs, folder: str, manifest: dict | None, work: Path) -> dict | None:
    """The latest remote version's manifest entry; without a manifest, the newest version that passes the checks."""
    if manifest and manifest["versions"]:
        return manifest["versions"][0]
    for name in _versions(fs, folder):
        try:
            return _entry(name, _fetch_checked(fs, folder, name, None, work / name), None)
        except Corrupt:
            continue
    return None


def _entry(name: str, markers: Markers, snapshot: Path | None, created: str | None = None) -> dict:
    entry = {"name": name, "runs": markers.runs, "last_update_ms": markers.last_update_ms,
             "newest_run": markers.newest_run}
    if snapshot is not None:
        entry |= {"bytes": snapshot.stat().st_size, "sha256": _sha256(snapshot), "created": created}
    return entry


def _write_manifest(fs, folder: str, versions: list[dict], work: Path) -> None:
    local = work / MANIFEST
    local.write_text(json.dumps({"latest": versions[0]["name"], "versions": versions}, indent=1) + "\n")
    _publish(local, fs, f"{folder}/{MANIFEST}")


def _next_name(now: dt.datetime, names: list[str]) -> str:
    """The new version's name: its UTC time, but always after the newest name (two backups in one second, or a
    head whose clock is behind), since restore and pruning take the order of the names as the order of the copies."""
    if names:
        newest = dt.datetime.strptime(names[0], "mlflow-%Y%m%dT%H%M%SZ.db").replace(tzinfo=dt.UTC)
        now = max(now, newest + dt.timedelta(seconds=1))
    return f"mlflow-{now:%Y%m%dT%H%M%SZ}.db"


def _prune(fs, folder: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` dated versions (listed, so versions a crash left out of the manifest too)."""
    names = _versions(fs, folder)
    for name in names[keep:]:
        fs.delete_file(f"{folder}/{name}")
    return names[:keep]


@contextlib.contextmanager
def _lock(store: Path):
    """One backup of a store at a time (the 10-minute loop and a manual backup before `ray down` may overlap)."""
    with open(store.parent / f".{store.name}.backup-lock", "w") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            raise StoreError(f"another backup of {store} is running") from error
        yield


def backup(store: Path, remote: str, keep: int | None = None, force: bool = False,
           now: dt.datetime | None = None) -> Outcome:
    """Snapshot and check the store, refuse to replace a newer remote copy, upload a dated version and latest.db,
    then the manifest; with `keep`, delete all but the newest `keep` dated versions."""
    if not store.exists():
        return Outcome("skipped", f"nothing to back up: {store} does not exist")
    now = now or dt.datetime.now(dt.UTC)
    fs, folder = _remote(remote)
    with _lock(store), tempfile.TemporaryDirectory() as work:
        snapshot = _snapshot(store, Path(work))
        markers = check(snapshot, f"the snapshot of {store}")
        manifest = _read_manifest(fs, folder)
        latest = _remote_latest(fs, folder, manifest, Path(work))
        if latest is not None and not force:
            theirs = Markers(latest["runs"], latest["last_update_ms"], latest["newest_run"])
            reason = _newer_remote(markers, theirs, store, remote, not _has_run(snapshot, theirs.newest_run))
            if reason:
                raise StoreError(reason)
        entry = _entry(_next_name(now, _versions(fs, folder)), markers, snapshot, f"{now:%Y-%m-%dT%H:%M:%SZ}")
        if latest is not None and latest.get("sha256") == entry["sha256"]:
            return Outcome("ok", f"{store} is unchanged since {latest['name']} in {remote}; nothing uploaded")
        _publish(snapshot, fs, f"{folder}/{entry['name']}")
        _publish(snapshot, fs, f"{folder}/{LATEST}")  # before the manifest, which then vouches for both
        listed = [entry] + [v for v in (manifest or {"versions": []})["versions"] if v["name"] != entry["name"]]
        kept = set(_versions(fs, folder)[:keep])  # those the lifecycle expired drop out of the manifest too
        _write_manifest(fs, folder, [v for v in listed if v["name"] in kept], Path(work))
        kept = _prune(fs, folder, keep) if keep else _versions(fs, folder)
    return Outcome("ok", f"backed up {store} ({markers.runs} runs) to {remote} as {entry['name']}; "
                         f"versions kept: {len(kept)}")


# -- restore --------------------------------------------------------------------------------------------------

def _fetch_checked(fs, folder: str, name: str, sha256: str | None, local: Path) -> Markers:
    """Download one version to `local` and check it: its recorded SHA-256 when there is one, then `check`."""
    try:
        _download(fs, f"{folder}/{name}", local)
    except OSError as error:  # a failed transfer says nothing about the copy: stop rather than take an older one
        raise StoreError(f"fetching {name} from {folder} failed ({error})") from error
    if sha256 is not None and _sha256(local) != sha256:
        raise Corrupt(f"{name} does not match the SHA-256 recorded at its backup (a truncated or altered copy)")
    return check(local, name)


def _place(store: Path, remote: str, fs, folder: str, name: str, sha256: str | None) -> Markers:
    """Fetch into a temporary file beside the store and move it into place only once it passed the checks."""
    descriptor, partial = tempfile.mkstemp(dir=store.parent, prefix=f".{store.name}.", suffix=".partial")
    os.close(descriptor)
    partial = Path(partial)
    try:
        markers = _fetch_checked(fs, folder, name, sha256, partial)
        os.link(partial, store)  # unlike a rename, a link never replaces a store that appeared meanwhile
    except FileExistsError as error:
        raise StoreError(f"{store} appeared while {name} was fetched from {remote}; it was kept") from error
    finally:
        partial.unlink(missing_ok=True)
    return markers


def _candidates(fs, folder: str) -> tuple[list[tuple[str, str, str | None]], list[str], bool]:
    """([(file, the version it holds, its recorded SHA-256)] newest first, [versions the manifest does not list],
    whether a manifest was read). With a manifest only what it lists is a candidate: latest.db as the version it
    names latest, then the dated versions it lists. Without one, latest.db then every dated version, unverified."""
    import pyarrow.fs

    names = _versions(fs, folder)
    has_latest = fs.get_file_info(f"{folder}/{LATEST}").type == pyarrow.fs.FileType.File
    manifest = _read_manifest(fs, folder)
    if manifest is None:
        return [(LATEST, LATEST, None)] * has_latest + [(name, name, None) for name in names], [], False
    entries = {v["name"]: v for v in manifest["versions"]}
    latest = entries.get(manifest.get("latest"))
    candidates = [(LATEST, latest["name"], latest.get("sha256"))] if has_latest and latest else []
    candidates += [(name, name, entries[name].get("sha256")) for name in names if name in entries]
    return candidates, [name for name in names if name not in entries], True


def restore(store: Path, remote: str) -> Outcome:
    """Fetch the newest version the manifest vouches for that passes the checks, unless a local store exists (a
    live store is newer); flag versions the manifest does not list, and a missing manifest, loudly."""
    if store.exists():
        return Outcome("ok", f"kept the existing store {store}")
    fs, folder = _remote(remote)
    candidates, unlisted, vouched = _candidates(fs, folder)
    problems = [f"{name} is not listed in the manifest, so nothing vouches for it (refused)" for name in unlisted]
    if not candidates and not unlisted:
        return Outcome("ok", f"no backup in {remote}; MLflow starts an empty store")
    store.parent.mkdir(parents=True, exist_ok=True)
    for position, (file, version, sha256) in enumerate(candidates):
        try:
            markers = _place(store, remote, fs, folder, file, sha256)
        except Corrupt as error:
            problems.append(str(error))
            continue
        source = f"{file} ({version})" if file != version else file
        message = f"restored {store} ({markers.runs} runs) from {source} in {remote}"
        if not vouched:
            problems.insert(0, f"{remote} has no readable {MANIFEST}, so the copy was checked by SQLite's integrity "
                               f"check only")
        if not problems:
            return Outcome("ok", message)
        older = ", an older version," if position and candidates[0][1] != version else ""
        return Outcome("warning", f"{message}{older} because {'; '.join(problems)}")
    raise StoreError(f"no version in {remote} passed the checks ({'; '.join(problems)}), and the head does not "
                     f"start an empty store over them")


# -- status ---------------------------------------------------------------------------------------------------

def status(remote: str, status_file: Path, now: dt.datetime | None = None) -> tuple[str, int]:
    """(the last backup's outcome, the last success and the versions kept, as text; 1 if the last backup failed)."""
    now = now or dt.datetime.now(dt.UTC)
    last, success = last_line(status_file, "backup"), last_line(status_file, "backup", ("ok",))
    minutes = age_of(success, now).total_seconds() / 60 if success else 0.0
    when = f"{success.split(' ')[0]} ({minutes:.0f} minutes ago)" if success else "none"
    lines = [f"last backup: {last or f'none recorded in {status_file}'}", f"last successful backup: {when}"]
    restored = last_line(status_file, "restore")
    if restored:
        lines.append(f"last restore: {restored}")
    try:
        fs, folder = _remote(remote)
        entries = {v["name"]: v for v in (_read_manifest(fs, folder) or {"versions": []})["versions"]}
        names = _versions(fs, folder)
    except (StoreError, OSError) as error:
        lines.append(f"versions in {remote}: unreadable ({error})")
    else:
        lines.append(f"versions in {remote}: {len(names)}")
        for name in names:
            runs = entries.get(name, {}).get("runs")
            lines.append(f"  {name}  {'?' if runs is None else runs} runs")
    failed = last is not None and last.split(" ")[2] == "FAILED:"
    return "\n".join(lines), int(failed)


def _iso_ms(ms: int) -> str:
    return f"{dt.datetime.fromtimestamp(ms / 1000, dt.UTC):%Y-%m-%dT%H:%M:%SZ}"


# -- command line ---------------------------------------------------------------------------------------------

def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of versions, at least 1, not {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mlflow_store.py", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["restore", "backup", "status"])
    parser.add_argument("--store", default=str(Path.home() / "mlflow" / "mlflow.db"), help="the SQLite file")
    parser.add_argument("--remote", help="the folder of dated versions (default s3://$HAMJEPA_BUCKET/mlflow/backups)")
    parser.add_argument("--keep", type=_positive, help="delete all but the newest N dated versions (only where the "
                        "writer may delete, such as an NFS folder; on S3 the bucket's lifecycle expires them)")
    parser.add_argument("--force", action="store_true", help="back up even when the remote copy looks newer")
    parser.add_argument("--status-file", help=f"the outcome log (default {STATUS_FILE} beside the store)")
    return parser


def check_paths(action: str, store: Path, status_file: Path) -> None:
    """Before any transfer, one sentence (UserError) for a path that cannot work: a backup or restore writes the
    store's folder (its lock, the fetched copy) and appends its outcome to the status file, and an outcome that
    cannot be recorded would come after the upload or the download it reports; `status` only reads the file."""
    fix = "pass --status-file <a file this user can write>"
    if action != "status":
        paths.require_writable_file("--store", store, "pass --store <the MLflow server's SQLite file>")
        paths.require_writable_file("--status-file", status_file, fix)
        return
    paths.check_length("--status-file", status_file)
    found = paths.kind(status_file)
    if found not in ("a regular file", "missing"):
        raise UserError(f"--status-file '{status_file}' is {found}, not a regular file; {fix}.")
    try:
        if found == "a regular file":
            status_file.open("rb").close()
    except OSError as error:
        raise UserError(f"--status-file '{status_file}' cannot be read ({error.strerror}); {fix}.") from None


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    remote = args.remote or default_remote()
    if remote is None:
        parser.error("--remote is required when $HAMJEPA_BUCKET is not set")
    store = Path(args.store).expanduser()
    status_file = Path(args.status_file).expanduser() if args.status_file else store.parent / STATUS_FILE
    try:
        check_paths(args.action, store, status_file)
    except UserError as error:
        print(f"{parser.prog}: error: {mask_text(str(error))}", file=sys.stderr)
        return 2
    if args.action == "status":
        text, code = status(remote, status_file)
        print(mask_text(text))
        return code
    try:
        if args.action == "restore":
            outcome = restore(store, remote)
        else:
            outcome = backup(store, remote, keep=args.keep, force=args.force)
    except (StoreError, OSError, sqlite3.Error) as error:
        line = record(status_file, args.action, "FAILED", mask_text(str(error)))
        print(line, file=sys.stderr)
        return 1
    line = record(status_file, args.action, outcome.state, mask_text(outcome.message))
    print(line, file=sys.stderr if outcome.state == "warning" else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
