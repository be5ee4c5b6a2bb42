"""Where a run came from: the code (git commit, uncommitted changes), the entry point and the library versions.

Every MLflow run of a study or of `hamjepa train` carries these tags, so a number can be traced to the code
that produced it. MLflow's own `mlflow.source.*` tags fill the UI's Source column; ours add what it lacks.
Computed once per process: `git` is asked twice, not once per trial.
"""

from __future__ import annotations

import functools
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "torchvision", "ray", "optuna", "mlflow")
GIT_TIMEOUT_S = 10  # seconds for one git query; a hung git (a network mount) leaves provenance "unknown"
UNKNOWN = "unknown"  # not a git checkout (an installed wheel), or git is not installed


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPOSITORY), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.cache
def code() -> dict[str, str]:
    """The commit the code was at and whether tracked files differed from it (a dirty run is not reproducible
    from the commit alone)."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"hamjepa.git_commit": UNKNOWN, "hamjepa.git_dirty": UNKNOWN}
    changes = _git("status", "--porcelain", "--untracked-files=no")
    return {"hamjepa.git_commit": commit, "hamjepa.git_dirty": str(bool(changes)).lower(),
            "mlflow.source.git.commit": commit}


@functools.cache
def versions() -> dict[str, str]:
    tags = {"hamjepa.version.python": platform.python_version()}
    for name in LIBRARIES:
        try:
            tags[f"hamjepa.version.{name}"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            tags[f"hamjepa.version.{name}"] = UNKNOWN
    return tags


def entry_point() -> str:
    """What was run: the study script (relative to the repository when inside it) or the `hamjepa` command."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if script is None or script.name in ("pytest", "__main__.py", "-c"):
        return "hamjepa"
    try:
        return str(script.relative_to(REPOSITORY))
    except ValueError:
        return script.name


def tags(source: str | None = None) -> dict[str, str]:
    """Every provenance tag of a run started by this process."""
    return {**code(), **versions(), "mlflow.source.name": source or entry_point(), "mlflow.source.type": "LOCAL"}
