"""Checks of the command-line inputs, run before any work, with no heavy import at the top (no torch, Ray or MLflow).

Each check raises UserError with one sentence that names the flag, quotes the value and says what is valid,
so `hamjepa train` refuses a bad flag as fast as `hamjepa config` refuses a bad key. What the checks cover:
numbers (type, range, finiteness), names that end up in MLflow filter strings and in folder names, the Ray
address's form, the MLflow tracking URI (a SQLite file must be writable: its folder, or the file if it exists),
and what one run asks of this machine when Ray is local (CPUs from the affinity mask and the cgroup quota,
GPUs from CUDA_VISIBLE_DEVICES or the /dev/nvidia* device files, as Ray counts them, and then as torch sees them:
the one check that imports torch, and only when a run asks for GPUs).
"""

from __future__ import annotations

import math
import os
import re
import urllib.request
from pathlib import Path

from hamjepa import paths
from hamjepa.config import MAX_SEED  # noqa: F401 - MAX_SEED: the CLI checks --seed against it
from hamjepa.config.sections import MAX_WORKERS
from hamjepa.errors import UserError
from hamjepa.redact import mask_text, mask_uri
from hamjepa.store_file import check_mlflow_file

# Run names, study ids: they become MLflow filter values and folder names, so letters, digits and . _ - only.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# Experiment names: anything printable, except the quotes MLflow's filter strings use.
HOSTILE_CHARACTERS = re.compile(r"['\"`\\]|[^\x20-\x7e\u00a0-\uffff]")
ADDRESS = re.compile(r"(ray://)?[A-Za-z0-9.\-\[\]:]+:(\d{1,5})")
SERVER_TIMEOUT_S = 5  # seconds an MLflow server has to answer /health before the study is refused


def _refuse(flag: str, value, valid: str) -> None:
    raise UserError(f"{flag} = {value!r} is invalid: {valid}.")


def integer(flag: str, value: int, low: int, high: int | None = None) -> None:
    """An integer flag in [low, high] (high None = unbounded)."""
    if value < low or (high is not None and value > high):
        _refuse(flag, value, f"must be an integer >= {low}" + (f" and <= {high}" if high is not None else ""))


def number(flag: str, value: float, low: float, *, strict: bool = False) -> None:
    """A finite number > low (strict) or >= low."""
    if not math.isfinite(value) or value < low or (strict and value == low):
        _refuse(flag, value, f"must be a finite number {'>' if strict else '>='} {low:g}")


def resources(workers_flag: str, workers: int, cpus: float, gpus: float) -> None:
    """What one run asks for: at least one worker, CPUs > 0 and GPUs >= 0, all finite."""
    integer(workers_flag, workers, 1, MAX_WORKERS)  # the bound's reason: config/sections.py
    number("--cpus-per-worker", cpus, 0, strict=True)
    number("--gpus-per-worker", gpus, 0)


def run_name(flag: str, value: str | None) -> None:
    """A name MLflow can filter on and Ray can use as a folder: letters, digits, '.', '_', '-'."""
    if value is not None and (not SAFE_NAME.fullmatch(value) or value in (".", "..")):
        _refuse(flag, value, "must be 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit")


def experiment_name(flag: str, value: str | None) -> None:
    """An MLflow experiment name: not blank, at most 500 characters, no quotes, backslashes or control characters."""
    if value is not None and (not value.strip() or len(value) > 500 or HOSTILE_CHARACTERS.search(value)):
        _refuse(flag, value, "must be a non-blank name of at most 500 characters without quotes, backslashes "
                             "or control characters")


def resolve_ray_address(flag: str | None) -> str | None:
    """The Ray cluster to join: --address, else $RAY_ADDRESS (which `ray job submit` sets for the job it starts),
    else None, for a local Ray. The flag wins, as in Ray's own tools."""
    return flag or os.environ.get("RAY_ADDRESS") or None


def ray_address(flag: str | None) -> str | None:
    """The resolved address (resolve_ray_address), checked: 'auto', 'local', 'ray://host:port' or 'host:port' (port
    1-65535); named as the flag or the variable it came from."""
    value = resolve_ray_address(flag)
    if not value or value in ("auto", "local"):
        return value
    match = ADDRESS.fullmatch(value)
    if match is None or not 1 <= int(match.group(2)) <= 65535:
        _refuse("--address" if flag else "$RAY_ADDRESS", value,
                "must be 'auto', 'ray://host:port' or 'host:port' with a port in 1-65535")
    return value


# -- this machine, when Ray is local -----------------------------------------------------------------------

def local_cpus() -> float:
    """CPUs a local Ray would see: the affinity mask, capped by a cgroup v2 quota when there is one."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return float(count)
    return float(count) if quota == "max" else min(float(count), math.ceil(int(quota) / int(period)))


def local_gpus() -> int:
    """GPUs a local Ray would see: CUDA_VISIBLE_DEVICES when set, else the NVIDIA device files."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [d for d in visible.split(",") if d.strip()]
        return 0 if ids in ([], ["-1"], ["NoDevFiles"]) else len(ids)
    return sum(1 for p in Path("/dev").glob("nvidia[0-9]*"))


def cuda_devices() -> int:
    """GPUs torch can use here (CUDA_VISIBLE_DEVICES applied): those a worker will actually find.

    Asked only when a run wants GPUs on a local Ray, so the heavy import is paid only where torch is about to be
    loaded anyway; torch counts without creating a CUDA context.
    """
    import torch

    return torch.cuda.device_count()


def local_capacity(workers_flag: str, workers: int, cpus: float, gpus: float) -> None:
    """One run's workers must fit on this machine (no --address: Ray starts here and has nothing else)."""
    have_cpus, have_gpus = local_cpus(), local_gpus()
    if workers * cpus > have_cpus:
        raise UserError(f"{workers_flag} = {workers} x --cpus-per-worker = {cpus:g} needs {workers * cpus:g} CPUs "
                        f"but this machine has {have_cpus:g}; lower them, or pass --address of a larger cluster.")
    if workers * gpus > have_gpus:
        raise UserError(f"--gpus-per-worker = {gpus:g} needs {workers * gpus:g} GPUs for {workers} worker(s) but "
                        f"this machine has {have_gpus}; pass --gpus-per-worker 0, or --address of a GPU cluster.")
    if workers * gpus > 0:
        _gpus_torch_sees(workers, gpus)


def _gpus_torch_sees(workers: int, gpus: float) -> None:
    """Ray counts CUDA_VISIBLE_DEVICES' entries as GPUs without asking whether they exist, so a variable naming a
    GPU that is not there (or a device file without a working driver) gives Ray a GPU no worker can use: the run
    was seen to hang. torch's count is the one the workers will meet."""
    seen = cuda_devices()
    if workers * gpus <= seen:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    why = (f"CUDA_VISIBLE_DEVICES = {visible!r} names GPUs that are not there (`nvidia-smi -L` lists those that are); "
           "correct or unset it, or pass" if visible is not None else
           "check the NVIDIA driver with `nvidia-smi`, or pass")
    raise UserError(f"--gpus-per-worker = {gpus:g} needs {workers * gpus:g} GPUs for {workers} worker(s) but torch "
                    f"sees {seen} on this machine: {why} --gpus-per-worker 0, or --address of a GPU cluster.")


# -- the MLflow tracking URI -----------------------------------------------------------------------------------

def resolve_tracking_uri(uri: str | None = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db; sqlite paths made absolute.

    Absolute, because Ray actors run in other working directories and must reach the same file.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def _writable_file(uri: str, path: Path) -> None:
    """The file, when it exists, opens for writing, and its folder takes new files (SQLite's journal, or the file)."""
    fix = "pass --tracking-uri sqlite:///<writable path>/mlflow.db"
    if path.exists() and (not path.is_file() or not paths.opens_for_writing(path)):
        raise UserError(f"tracking URI '{mask_uri(uri)}' is not writable: '{path}' is not a file this user can "
                        f"read and write; {fix}.")
    if path.is_file():  # an existing file is only written when it is a current MLflow store (store_file.py)
        check_mlflow_file(mask_uri(uri), path, fix)
    if not path.parent.is_dir() or not paths.can_write_in(path.parent):  # SQLite writes its journal beside the file
        raise UserError(f"tracking URI '{mask_uri(uri)}' is not writable: folder '{path.parent}' does not exist or "
                        f"is read-only; {fix}.")


def _sqlite_path(uri: str) -> str:
    return uri[len("sqlite:///"):].split("?", 1)[0]


def check_readable_tracking_uri(uri: str) -> None:
    """A store to read (`hamjepa report`, `hamjepa studies`) must exist, since MLflow would create an empty one, and be
    a current MLflow store, checked without writing, since MLflow would create its tables in any other SQLite file
    and migrate an older one; a server must answer."""
    fix = "pass the --tracking-uri the study logged to"
    if uri.startswith("sqlite:///"):
        path = Path(_sqlite_path(uri))
        paths.check_length("the tracking store", path)
        if not path.is_file():
            raise UserError(f"tracking URI '{mask_uri(uri)}' names no file ('{path}' does not exist); {fix}.")
        check_mlflow_file(mask_uri(uri), path, fix)  # read-only: MLflow's store class would create or migrate
    elif uri.startswith("file:"):
        folder = Path(uri[len("file://"):] if uri.startswith("file://") else uri[len("file:"):])
        if not folder.is_dir():
            raise UserError(f"tracking URI '{mask_uri(uri)}' names no folder ('{folder}' does not exist); {fix}.")
    else:
        check_tracking_uri(uri)  # a server must answer; an unsupported scheme is refused


def check_tracking_uri(uri: str) -> None:
    """Fail with one sentence, before any work, when the tracking store cannot be written or reached."""
    if uri.startswith("sqlite:///"):
        path = _sqlite_path(uri)
        if not path or path.endswith("/"):
            _refuse("--tracking-uri", mask_uri(uri), "a SQLite URI must name a file, e.g. sqlite:///mlflow.db")
        paths.check_length("the tracking store", path)
        _writable_file(uri, Path(path))
    elif uri.startswith("file:"):
        # MLflow 3.17 refuses its file store at the first write (unless MLFLOW_ALLOW_FILE_STORE is set): say so now.
        _refuse("--tracking-uri", mask_uri(uri), "MLflow 3 no longer writes file stores; use sqlite:///path/mlflow.db "
                "or an MLflow server's http(s):// address")
    elif uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=SERVER_TIMEOUT_S).close()
        except (OSError, ValueError) as error:
            raise UserError(f"tracking URI '{mask_uri(uri)}' cannot be reached ({mask_text(str(error))}); start "
                            "the MLflow server or pass --tracking-uri.") from None
    elif uri.startswith(("postgresql", "mysql", "mssql")):
        _database_driver(uri)
    elif not uri.startswith("databricks"):
        raise UserError(f"tracking URI '{mask_uri(uri)}' is not supported: use sqlite:///path, "
                        "http(s)://host:port or a database URI.")


# SQLAlchemy's driver for each database scheme (`scheme://` uses the first; `scheme+driver://` names its own), as
# (module to find, pip package that installs it). MLflow installs none of them: without one, MLflow's first write is a
# ModuleNotFoundError traceback.
DEFAULT_DRIVERS = {"postgresql": "psycopg2", "mysql": "mysqldb", "mssql": "pyodbc"}
DRIVERS = {"psycopg2": ("psycopg2", "psycopg2-binary"), "psycopg": ("psycopg", "psycopg[binary]"),
           "pg8000": ("pg8000", "pg8000"), "mysqldb": ("MySQLdb", "mysqlclient"), "pymysql": ("pymysql", "PyMySQL"),
           "pyodbc": ("pyodbc", "pyodbc"), "pymssql": ("pymssql", "pymssql")}


def _database_driver(uri: str) -> None:
    """The database URI's Python driver is installed (found without importing it), or one sentence naming it."""
    import importlib.util

    scheme = uri.split(":", 1)[0]
    database, _, driver = scheme.partition("+")
    driver = (driver or DEFAULT_DRIVERS.get(database, "")).lower()
    if driver not in DRIVERS:
        raise UserError(f"tracking URI '{mask_uri(uri)}' names driver '{driver}', which this tool does not know; use "
                        f"{database}+<one of {', '.join(sorted(DRIVERS))}>://... or sqlite:///path/mlflow.db.")
    module, package = DRIVERS[driver]
    if importlib.util.find_spec(module) is None:
        raise UserError(f"tracking URI '{mask_uri(uri)}' needs the Python driver {module}, which is not installed; "
                        f"pip install {package}, or use sqlite:///path/mlflow.db.")
