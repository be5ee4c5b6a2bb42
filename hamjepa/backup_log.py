"""The MLflow store's backup log: one dated line per backup or restore, written by cluster/mlflow_store.py on a
cluster's head and read by a study there, which warns when the last backup failed or the backup loop stopped.

Standard library only: the command line reads it before any heavy import, and the store script runs it as is.
The path is checked by the callers: the store script's --status-file before any transfer (check_paths there); a
study reads the head's fixed ~/mlflow/backup-status.log and ignores any failure to (cli.py).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

STATUS_FILE = "backup-status.log"  # beside the store: one dated line per backup or restore
STALE = dt.timedelta(minutes=30)  # aws.yaml's loop records a backup every 10 minutes; three missed means it stopped


def record(status_file: Path, action: str, state: str, message: str, now: dt.datetime | None = None) -> str:
    """Append one line `<UTC time> <action> <state>: <message>` to the status file; returns the line."""
    now = now or dt.datetime.now(dt.UTC)
    line = f"{now:%Y-%m-%dT%H:%M:%SZ} {action} {state}: {' '.join(message.split())}"
    status_file.parent.mkdir(parents=True, exist_ok=True)
    with status_file.open("a") as file:
        file.write(line + "\n")
    return line


def last_line(status_file: Path, action: str, states: tuple[str, ...] | None = None) -> str | None:
    if not status_file.exists():
        return None
    lines = [line for line in status_file.read_text().splitlines() if line.split(" ")[1:2] == [action]
             and (states is None or line.split(" ")[2].rstrip(":") in states)]
    return lines[-1] if lines else None


def age_of(line: str, now: dt.datetime) -> dt.timedelta:
    return now - dt.datetime.strptime(line.split(" ")[0], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


def backup_warning(status_file: Path, now: dt.datetime | None = None) -> str | None:
    """One sentence when the last backup failed or is older than STALE (the loop stopped), for a study's log."""
    last = last_line(status_file, "backup")
    if last is None:
        return None
    if last.split(" ")[2] == "FAILED:":
        return f"the MLflow store's last backup failed: {last} (see `python cluster/mlflow_store.py status`)"
    age = age_of(last, now or dt.datetime.now(dt.UTC))
    if age > STALE:
        return (f"the MLflow store's last backup was {age.total_seconds() / 60:.0f} minutes ago, so its backup loop "
                f"has stopped (see `python cluster/mlflow_store.py status`)")
    return None
