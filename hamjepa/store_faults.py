"""When the tracking store fails under a running run: the run trains on, the failure is said once, in a sentence.

Measured before this existed: a store made read-only or deleted mid-run turned the MLflow callback's write error
into a Ray Train `ControllerError` that killed a run which had just checkpointed an epoch; a full disk turned the
final status write into a raw `sqlite3.OperationalError` traceback. Logging is a record of training, never a reason
to stop it: every write a running run makes goes through `Guarded`, which catches the failure, warns once per kind
of fault, and lets the caller retry at its next write (RunLogger's writes are idempotent by epoch). What the store
never took is written at the end from the run's checkpoint (train/run_record.py), or kept in a recovery file.

A SQLite store that disappears is a fault, never a fresh start: MLflow would create an empty database at the
same path and log into it, so a deleted store would silently become another one (`check_present`).
"""

from __future__ import annotations

import enum
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hamjepa.redact import mask_text, mask_uri


class _Refused(enum.Enum):
    """An enum, so the marker stays itself when a callback holding it is pickled to another process (Ray)."""

    REFUSED = "refused"


REFUSED = _Refused.REFUSED  # what Guarded returns for a write the store refused


class StoreFault(RuntimeError):
    """The tracking store cannot take writes; the message says how (deleted, read-only, full, unreachable)."""


def sqlite_file(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, else None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///"):].split("?", 1)[0])


def check_present(tracking_uri: str) -> None:
    """Raise StoreFault when a SQLite store's file is gone (MLflow would create a new, empty one in its place)."""
    path = sqlite_file(tracking_uri)
    if path is not None and not path.is_file():
        raise StoreFault(f"the tracking store {path} was deleted")


def describe(tracking_uri: str, error: BaseException) -> str:
    """What went wrong with the store, as the end of a sentence: 'the tracking store X <is read-only>'."""
    path = sqlite_file(tracking_uri)
    if isinstance(error, StoreFault):
        return str(error)
    store = f"the tracking store {path if path is not None else mask_uri(tracking_uri)}"
    text = str(error).lower()
    if path is not None and not path.is_file():
        return f"{store} was deleted"
    if "readonly database" in text or "read-only file system" in text or (
            path is not None and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK))):
        return f"{store} is read-only"  # (access() answers EROFS for a read-only mount even to root)
    if "disk is full" in text or "no space left" in text:
        return f"{store} is on a full disk"
    if "connection" in text or "max retries" in text:
        return f"{store} cannot be reached"
    # The database's own message, not SQLAlchemy's wrapping of it ("(raised as a result of Query-invoked autoflush").
    driver = re.search(r"\((?:sqlite3|psycopg2?|pymysql|MySQLdb)\.\w+\) ([^\n]+)", str(error))
    lines = str(error).strip().splitlines()
    said = driver.group(1) if driver else (lines[0] if lines else type(error).__name__)
    return f"{store} refused a write ({mask_text(said[:200])})"


def from_store(error: BaseException) -> bool:
    """Whether `error` (or an error it was raised from) is the tracking store refusing: MLflow's, SQLAlchemy's or
    SQLite's errors, or StoreFault."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, StoreFault) or type(error).__module__.split(".")[0] in ("mlflow", "sqlalchemy",
                                                                                      "sqlite3"):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def quiet_store_tracebacks() -> None:
    """MLflow logs every refused database write's SQL and traceback (80 lines, each sampling interval for the system
    metrics) and then raises it; the raise reaches the user as one sentence (Guarded, cli), so the log is off."""
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


class Guarded:
    """Writes to the store that must not fail their caller: `guarded(write, *args)` returns the write's result, or
    REFUSED, keeping the fault in `faults` and (with `warn`) printing one warning line per distinct fault to stderr."""

    def __init__(self, tracking_uri: str, warn: bool = True):
        self.tracking_uri, self.warn = tracking_uri, warn
        self.faults: list[str] = []  # each distinct fault, in the order seen

    def __call__(self, write: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        quiet_store_tracebacks()  # also in a Ray controller, where this object is unpickled to
        try:
            return write(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any store failure: logging never stops training
            fault = describe(self.tracking_uri, error)
            if fault not in self.faults:
                self.faults.append(fault)
                if self.warn:
                    print(f"hamjepa: warning: {fault}; training goes on, and what the store missed is written "
                          "later", file=sys.stderr, flush=True)
            return REFUSED
