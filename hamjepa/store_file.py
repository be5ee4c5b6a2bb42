"""What a SQLite tracking file holds, read without writing a byte, before MLflow's own store class sees it.

Constructing MLflow's SqlAlchemyStore is not a read: on a file without all of MLflow's tables (a 0-byte file, a
user's unrelated database, a store of an older schema that lacks a newer table) it runs "Creating initial MLflow
database tables..." and the migrations, and on an older store with every table it raises a traceback. So every
command inspects the file first, through SQLite's read-only URI mode (`file:...?mode=ro`, which can neither create
the file nor change it), and compares MLflow's `alembic_version` with the head revision the installed MLflow ships.
Only a missing file may then be created, and only by a command that writes runs (checks.check_tracking_uri).
"""

from __future__ import annotations

import importlib.util
import sqlite3
from functools import lru_cache
from pathlib import Path
from urllib.parse import quote

from hamjepa.errors import UserError

# Tables every MLflow store has had since its first schema: without them a file is not an MLflow store.
MLFLOW_TABLES = {"experiments", "runs"}
SQLITE_HEADER = b"SQLite format 3\x00"


@lru_cache(maxsize=1)
def _migrations():
    """The installed MLflow's migration scripts (alembic reads their revision ids; MLflow itself is not imported)."""
    from alembic.script import ScriptDirectory

    spec = importlib.util.find_spec("mlflow")
    return ScriptDirectory(str(Path(spec.origin).parent / "store" / "db_migrations"))


def head_revision() -> str:
    """The schema revision the installed MLflow writes and reads."""
    return _migrations().get_current_head()


def _is_known_revision(revision: str) -> bool:
    try:
        return _migrations().get_revision(revision) is not None
    except Exception:  # noqa: BLE001 - alembic raises several kinds for an id it has never seen
        return False


def _read_only(path: Path) -> sqlite3.Connection:
    # mode=ro: SQLite opens the file as it is, never creates it, never writes (not even a journal rollback).
    return sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True)


def _tables_and_revision(path: Path) -> tuple[set[str], str | None]:
    connection = _read_only(path)
    try:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        revision = None
        if "alembic_version" in tables:
            row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
            revision = row[0] if row else None
        return tables, revision
    finally:
        connection.close()


def check_mlflow_file(shown_uri: str, path: Path, fix: str) -> None:
    """One sentence (UserError) unless the existing file `path` is an MLflow store of the installed MLflow's schema.

    `shown_uri`: the URI as the user may see it (credentials masked); `fix`: what to pass instead. The callers
    (checks.py) pass only a path that is a regular file, so this open cannot block on a pipe or fail on a folder.
    """
    with open(path, "rb") as handle:
        head = handle.read(len(SQLITE_HEADER))
    if not head:
        raise UserError(f"tracking URI '{shown_uri}' names '{path}', an empty file, not an MLflow store; remove it "
                        f"or {fix}.")
    if head != SQLITE_HEADER:
        raise UserError(f"tracking URI '{shown_uri}' names '{path}', which is not a SQLite database; {fix}.")
    try:
        tables, revision = _tables_and_revision(path)
    except sqlite3.Error as error:
        raise UserError(f"tracking URI '{shown_uri}' names '{path}', a SQLite file that cannot be read ({error}); "
                        f"{fix}.") from None
    if not MLFLOW_TABLES <= tables or revision is None:
        raise UserError(f"tracking URI '{shown_uri}' names '{path}', a SQLite database that is not an MLflow store "
                        f"(it has no MLflow tables), so it is left untouched; {fix}.")
    head_rev = head_revision()
    if revision != head_rev and _is_known_revision(revision):
        raise UserError(f"tracking URI '{shown_uri}' names '{path}', an MLflow store of an older schema ({revision}, "
                        f"this MLflow reads {head_rev}); back the file up first, then run `mlflow db upgrade "
                        f"sqlite:///{path}`.")
    if revision != head_rev:
        raise UserError(f"tracking URI '{shown_uri}' names '{path}', an MLflow store of a schema this MLflow does not "
                        f"know ({revision}, likely written by a newer MLflow); upgrade mlflow, or {fix}.")
