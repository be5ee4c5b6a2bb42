"""A real `mlflow server` on a loopback port serves a study's store the way the UI reads it (no Ray).

The store is written as a study writes it (hamjepa.tracking.RunLogger straight into SQLite, artifacts in the
local folder), then served as the README's `mlflow ui` serves it; every request below is one the UI's bundle
makes (`ajax-api/2.0/mlflow/...`, `get-artifact?path=...&run_uuid=...`), checked against what was logged.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from hamjepa.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    METHOD_TAG,
    PARENT_TAG,
    PHASE_TAG,
    ROLE_TAG,
    STATUS_TAG,
    TRIAL_TAG,
    RunLogger,
)

pytestmark = pytest.mark.slow

EXPERIMENT = "hamjepa-served"
OBJECTIVE = "val_knn20_top1"
CHILDREN = {"hamjepa-seed1": ("hamjepa", "0.05", [10.0, 30.0, 45.0]), "sigreg-seed1": ("sigreg", "0.1", [10.0, 25.0])}
SUMMARY = "| metric (%) | HamJEPA | SIGReg |\n|---|---|---|\n| test kNN@20 | 45.00 | 25.00 |\n"
STARTUP_S = 45


def _png(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(1, 1))
    axis.plot([0, 1], [0, 1])
    fig.savefig(path, dpi=20)
    plt.close(fig)
    return path


def _optuna_db(path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="served", storage=f"sqlite:///{path}", direction="maximize")
    study.optimize(lambda trial: trial.suggest_float("dt", 0.01, 0.1), n_trials=2)
    return path


def _write_store(tmp_path, uri):
    """A parent (role=study) with summary.md/.csv, optuna.db, plots/x.png; two nested children with params and
    per-epoch objective histories."""
    parent = RunLogger(uri, EXPERIMENT, key="study/served-1", run_name="served-1",
                       tags={ROLE_TAG: "study", "hamjepa.study": "served"})
    parent.start()
    parent.log_params({"study.num_samples": 1, "study.paired_seeds": "1"})
    parent.log_text(SUMMARY, "summary.md")
    parent.log_text("metric,delta\ntest_knn20_top1,20.0\n", "summary.csv")
    parent.log_artifact(_optuna_db(tmp_path / "optuna.db"))
    parent.log_artifact(_png(tmp_path / "x.png"), "plots")
    for key, (method, dt, history) in CHILDREN.items():
        child = RunLogger(uri, EXPERIMENT, key=f"served-1/{key}", run_name=f"compare-{key}",
                          parent_run_id=parent.run_id,
                          tags={ROLE_TAG: "trial", METHOD_TAG: method, PHASE_TAG: "compare", TRIAL_TAG: key})
        child.start()
        child.log_params({"method": method, "seed": 1, "predictor.dt": dt})
        for epoch, value in enumerate(history):
            child.log_epoch({"epoch": epoch, OBJECTIVE: value})
        child.set_tags({STATUS_TAG: "finished"})
        child.finish()
    parent.finish()
    return parent.run_id


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(base, route, **query):
    with urllib.request.urlopen(f"{base}/{route}?{urllib.parse.urlencode(query)}", timeout=20) as response:
        return response.read()


def _post(base, route, body):
    request = urllib.request.Request(f"{base}/{route}", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=20) as response:
        return json.loads(response.read())


def _wait_for_health(base, server, log_path):
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow server exited with {server.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if _get(base, "health") == b"OK":
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"mlflow server did not answer /health within {STARTUP_S} s")


def _search(base, experiment_id, filter_string, prefix="ajax-api"):
    return _post(base, f"{prefix}/2.0/mlflow/runs/search",
                 {"experiment_ids": [experiment_id], "filter": filter_string, "max_results": 100}).get("runs", [])


def _tags(run):
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def test_a_loopback_mlflow_server_serves_the_study_as_the_ui_reads_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the SQLite store's default artifact root is ./mlruns
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent_id = _write_store(tmp_path, uri)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--artifacts-destination",
         str(tmp_path / "served"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job runners: nothing else to stop
    try:
        _wait_for_health(base, server, tmp_path / "server.log")
        experiment = json.loads(_get(base, "ajax-api/2.0/mlflow/experiments/get-by-name",
                                     experiment_name=EXPERIMENT))["experiment"]
        assert {t["key"]: t["value"] for t in experiment["tags"]}[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
        exp_id = experiment["experiment_id"]

        # The parent run, found as `hamjepa report` finds it, through both the UI's and the public prefix.
        for prefix in ("ajax-api", "api"):
            parents = _search(base, exp_id, f"tags.`{ROLE_TAG}` = 'study'", prefix)
            assert [p["info"]["run_id"] for p in parents] == [parent_id]
        assert parents[0]["info"]["status"] == "FINISHED" and parents[0]["info"]["run_name"] == "served-1"

        # Its nested children, their params and per-epoch histories.
        children = _search(base, exp_id, f"tags.`{PARENT_TAG}` = '{parent_id}'")
        by_key = {_tags(c)[TRIAL_TAG]: c for c in children}
        assert set(by_key) == set(CHILDREN)
        for key, (method, dt, history) in CHILDREN.items():
            run = by_key[key]
            params = {p["key"]: p["value"] for p in run["data"]["params"]}
            assert params == {"method": method, "seed": "1", "predictor.dt": dt}
            assert _tags(run)[ROLE_TAG] == "trial" and _tags(run)[PHASE_TAG] == "compare"
            served = json.loads(_get(base, "ajax-api/2.0/mlflow/metrics/get-history", run_id=run["info"]["run_id"],
                                     metric_key=OBJECTIVE))["metrics"]
            assert sorted((m["step"], m["value"]) for m in served) == list(enumerate(history))

        # The parent's artifacts: listed, and downloaded byte for byte.
        listed = json.loads(_get(base, "ajax-api/2.0/mlflow/artifacts/list", run_id=parent_id))["files"]
        assert {f["path"] for f in listed} == {"summary.md", "summary.csv", "optuna.db", "plots"}
        plots = json.loads(_get(base, "ajax-api/2.0/mlflow/artifacts/list", run_id=parent_id, path="plots"))["files"]
        assert [f["path"] for f in plots] == ["plots/x.png"]
        assert _get(base, "get-artifact", path="summary.md", run_uuid=parent_id).decode() == SUMMARY
        assert _get(base, "get-artifact", path="plots/x.png", run_uuid=parent_id) == (tmp_path / "x.png").read_bytes()
        assert _get(base, "get-artifact", path="optuna.db", run_uuid=parent_id) == (
            tmp_path / "optuna.db").read_bytes()
        # The UI's page itself (a hash-routed app: #/experiments/<id>/runs is resolved in the browser).
        assert b"<html" in _get(base, "").lower()
    finally:
        _stop(server)
        log.close()


def _stop(server):
    """The server and every process it started (its own process group): asked, then made to."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            break
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            continue
        time.sleep(0.5)  # the group's other processes end with the server; SIGKILL takes any straggler
    server.wait()


# -- the cluster's MLflow logins, against a real basic-auth server (cluster/head.py) -------------------------

def _cluster_module(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "cluster" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"cluster_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _as(login, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", login[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", login[1])


def test_studies_log_as_a_user_without_admin_rights_that_edits_every_experiment(tmp_path, monkeypatch):
    """head.py's files start a basic-auth server whose admin comes from basic_auth.ini alone; mlflow-users gives the
    studies' user EDIT on every experiment: it logs runs into one the admin made (a restored one), but deletes
    nothing it did not create and manages no user."""
    pytest.importorskip("flask_wtf")  # MLflow's `auth` extra, which the head installs from the lock
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    head = _cluster_module("head")
    folder = tmp_path / "mlflow"
    head.mlflow_auth(folder)
    server_env = dict(line.removeprefix("export ").split("=", 1)
                      for line in (folder / "server.env").read_text().splitlines())
    study = dict(line.removeprefix("export ").split("=", 1)
                 for line in (folder / "credentials").read_text().splitlines())
    import configparser

    ini = configparser.ConfigParser(interpolation=None)
    ini.read(folder / "basic_auth.ini")
    admin = (ini["mlflow"]["admin_username"], ini["mlflow"]["admin_password"])
    studies = (study["MLFLOW_TRACKING_USERNAME"], study["MLFLOW_TRACKING_PASSWORD"])
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_AUTH_ADMIN", "MLFLOW_TRACKING"))}
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--backend-store-uri",
         f"sqlite:///{tmp_path}/mlflow.db", "--artifacts-destination", str(tmp_path / "artifacts"), "--host",
         "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**environment, **server_env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        head.wait_for_server(uri, timeout_s=STARTUP_S + 60)
        _as(admin, monkeypatch)  # the admin came from basic_auth.ini: nothing passed it in the environment
        restored = MlflowClient(uri).create_experiment("restored-study")
        _as(studies, monkeypatch)
        assert head.mlflow_users(folder, uri).startswith("created MLflow user hamjepa")
        assert os.environ["MLFLOW_TRACKING_USERNAME"] == "hamjepa"  # the process's own login is back
        client = MlflowClient(uri)
        run = client.create_run(restored).info.run_id  # EDIT on an experiment the admin made
        client.log_metric(run, "val_knn20_top1", 41.5)
        client.set_terminated(run)
        own = client.create_experiment("new-study")  # and its own experiments
        client.log_param(client.create_run(own).info.run_id, "seed", 1)
        with pytest.raises(MlflowException):
            client.delete_experiment(restored)  # EDIT: no deletion
        with pytest.raises(MlflowException):
            AuthServiceClient(uri).create_user("intruder", "a-password-long-enough-1")  # not an admin
        assert head.mlflow_users(folder, uri).startswith("kept")  # a second `ray up`
        assert [m.value for m in client.get_metric_history(run, "val_knn20_top1")] == [41.5]
    finally:
        _stop(server)
        log.close()
