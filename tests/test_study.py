"""The study end to end: smoke study, a diverging point, interruption and --resume.

Each starts several Ray Train runs; marked slow, run in CI.
"""

import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray import tune

from hamjepa.cli import study_main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SEARCH_SPACE = runpy.run_path(str(ROOT / "studies" / "energy_budget.py"))["SEARCH_SPACE"]


def _runs(uri, experiment="hamjepa-energy_budget"):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("hamjepa.role") == "study"]
    children = [r for r in runs if r.data.tags.get("hamjepa.role") == "trial"]
    return client, parents, children


def _args(tmp_path, ray_cluster, *extra):
    return ["--smoke-test", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--storage-path",
            str(tmp_path / "ray"), "--address", ray_cluster, *extra]


def test_smoke_study_logs_parent_children_metrics_and_summary(ray_cluster, tmp_path, capsys):
    assert study_main("energy_budget", SEARCH_SPACE, _args(tmp_path, ray_cluster)) == 0
    printed = capsys.readouterr().out
    client, parents, children = _runs(f"sqlite:///{tmp_path}/mlflow.db")

    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent_id = parents[0].info.run_id
    assert len(children) == 3  # 2 HamJEPA trials + 1 SIGReg baseline
    assert all(c.data.tags["mlflow.parentRunId"] == parent_id for c in children)
    assert all(c.info.status in ("FINISHED", "FAILED") for c in children)
    methods = sorted(c.data.tags["hamjepa.method"] for c in children)
    assert methods == ["hamjepa", "hamjepa", "sigreg"]
    trials = [c for c in children if c.data.tags["hamjepa.phase"] == "search"]
    for child in trials:
        for key in SEARCH_SPACE:
            assert key in child.data.params, key
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_knn20_top1")][0] == 1
    # the paper's defaults were the first point
    defaults = [c for c in trials
                if c.data.params["predictor.dt"] == "0.05" and c.data.params["predictor.steps"] == "2"]
    assert len(defaults) == 1

    baseline = next(c for c in children if c.data.tags["hamjepa.method"] == "sigreg")
    assert baseline.data.tags["hamjepa.status"] == "finished"
    assert [m.step for m in client.get_metric_history(baseline.info.run_id, "train/loss")] == [1, 2]
    for key in ("test_knn20_top1", "test_linprobe_top1", "val_linprobe_top1"):
        assert key in baseline.data.metrics

    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"summary.md", "summary.csv", "plots"} <= artifacts
    summary_md = Path(client.download_artifacts(parent_id, "summary.md", str(tmp_path))).read_text()
    assert summary_md in printed  # the printed summary is the logged one
    # ... and its numbers are MLflow's
    assert f"{baseline.data.metrics['test_knn20_top1']:.2f}" in summary_md
    plots = client.list_artifacts(parent_id, "plots")
    assert len(plots) == len(SEARCH_SPACE)
    assert "mlflow ui --backend-store-uri" in printed


def test_a_diverging_trial_is_recorded_and_the_study_completes(ray_cluster, tmp_path, capsys):
    space = {"predictor.dt": tune.loguniform(0.01, 200.0)}
    code = study_main("diverging", space, _args(tmp_path, ray_cluster, "--baseline-seeds", "0"),
                      initial_points=[{"predictor.dt": 150.0}])
    assert code == 0
    client, parents, children = _runs(f"sqlite:///{tmp_path}/mlflow.db", "hamjepa-diverging")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    by_dt = {c.data.params["predictor.dt"]: c for c in children}
    diverged = by_dt["150.0"]
    assert diverged.info.status == "FAILED" and diverged.data.tags["hamjepa.status"] == "diverged"
    assert "exploded" in diverged.data.tags["hamjepa.reason"] or "non-finite" in diverged.data.tags["hamjepa.reason"]
    assert diverged.data.metrics["val_knn20_top1"] == 0.0
    healthy = by_dt["0.05"]
    assert healthy.data.tags["hamjepa.status"] in ("finished", "stopped")
    assert "1 diverged" in capsys.readouterr().out


def test_interrupted_study_resumes_without_duplicate_runs(ray_cluster, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    command = [sys.executable, str(ROOT / "studies" / "energy_budget.py"), *_args(tmp_path, ray_cluster)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 400
        while time.time() < deadline and first.poll() is None:  # wait for the first per-epoch metric
            time.sleep(3)
            if (tmp_path / "mlflow.db").exists():
                _, _, children = _runs(uri) if _has_experiment(uri) else (None, None, [])
                if any("epoch" in c.data.metrics for c in children):
                    break
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        first.send_signal(signal.SIGINT)
        try:
            first.wait(timeout=120)
        except subprocess.TimeoutExpired:
            first.kill()  # a killed driver must resume just as well
            first.wait()
    _, parents, children = _runs(uri)
    assert len(parents) == 1 and parents[0].info.status in ("KILLED", "RUNNING")
    interrupted_trials = {c.data.tags["hamjepa.trial_id"] for c in children}
    assert len(interrupted_trials) < 3  # it really was interrupted

    resumed = subprocess.run([*command, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    _, parents, children = _runs(uri)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the same parent run, finished
    trial_ids = [c.data.tags["hamjepa.trial_id"] for c in children]
    assert len(trial_ids) == len(set(trial_ids)) == 3  # one MLflow run per trial, no duplicates
    assert interrupted_trials <= set(trial_ids)
    assert not [c for c in children if c.info.status == "RUNNING"]


def _has_experiment(uri):
    try:
        return MlflowClient(uri).get_experiment_by_name("hamjepa-energy_budget") is not None
    except Exception:  # noqa: BLE001 - the database may be mid-creation
        return False
