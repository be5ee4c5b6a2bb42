"""A study through the Python API (`hamjepa.Study`), in process, on the session's Ray (started without the custom
`trial_driver` resource): a YAML space with every kind of distribution, the result against MLflow, the store's folder
holding every artifact, the encoder as a logged model, system metrics, and the live Optuna storage read from a second
process while the study runs. And a study script that finds its cluster through $RAY_ADDRESS alone.

Marked slow: each starts Ray Train runs.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
from conftest import tiny_config
from mlflow.tracking import MlflowClient

from hamjepa import Study, load_encoder
from hamjepa.config import Config
from hamjepa.study.reopen import find_studies, reopen
from hamjepa.train.launch import DRIVER_RESOURCE

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

# Every kind of distribution, each range holding the quick profile's value (the first trial is the defaults).
SPACE_YAML = """\
predictor.steps: int(2, 4, 2)                 # 2 or 4
predictor.dt: loguniform(0.02, 0.1)
hamjepa_loss.logdet_floor: uniform(-3.0, -0.5)
predictor.hidden_dim: choice(128, 256)
"""

# Reads the Optuna storage from another process every second until told to stop: what optuna-dashboard would see.
POLLER = """
import json, sys, time, optuna
url, out, stop = sys.argv[1:4]
optuna.logging.set_verbosity(optuna.logging.ERROR)
with open(out, "w") as log:
    while True:
        try:
            studies = optuna.get_all_study_names(storage=url)
            trials = [t for name in studies for t in optuna.load_study(study_name=name, storage=url).trials]
            seen = [[t.number, t.state.name, t.duration.total_seconds() if t.duration else None] for t in trials]
            log.write(json.dumps({"at": time.time(), "trials": seen}) + "\\n")
            log.flush()
        except Exception as error:  # the file may not exist yet
            log.write(json.dumps({"at": time.time(), "error": str(error)[:200]}) + "\\n")
        if __import__("os").path.exists(stop):
            break
        time.sleep(1.0)
"""


def _snapshots(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_a_study_through_the_python_api(ray_cluster, tmp_path, monkeypatch):
    import ray

    assert DRIVER_RESOURCE not in ray.cluster_resources()  # a cluster started without the custom resource
    cwd, store = tmp_path / "cwd", tmp_path / "store"
    cwd.mkdir(), store.mkdir()
    monkeypatch.chdir(cwd)  # MLflow's default would put artifacts in ./mlruns here
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "api-study")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "2")  # several samples in a short smoke run
    space_file = tmp_path / "space.yaml"
    space_file.write_text(SPACE_YAML)
    uri, live = f"sqlite:///{store}/mlflow.db", f"sqlite:///{tmp_path}/live.db"
    base = tiny_config()
    study = Study("api_smoke", base, space_file, address=ray_cluster, num_samples=2, seeds=1, reference=0,
                  tracking_uri=uri, storage_path=str(tmp_path / "ray"), optuna_storage=live)

    stop, seen = tmp_path / "stop", tmp_path / "seen.jsonl"
    poller = subprocess.Popen([sys.executable, "-c", POLLER, live, str(seen), str(stop)])
    try:
        result = study.run()
        ended = time.time()
    finally:
        stop.touch()
        poller.wait(timeout=60)

    # the result is MLflow's record of the study
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("api-study")  # $MLFLOW_EXPERIMENT_NAME, honoured
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parent = next(r for r in runs if r.data.tags.get("hamjepa.role") == "study")
    assert result.parent_run_id == parent.info.run_id and not result.interrupted
    assert result.verdict and parent.data.tags["hamjepa.verdict"] == result.verdict
    assert reopen(client, find_studies(client, "api-study")[0]).verdict == result.verdict  # `hamjepa report`'s
    assert result.verdict in result.text
    assert [row["metric"] for row in result.table] == ["val_knn20_top1", "val_linprobe_top1", "test_knn20_top1",
                                                       "test_linprobe_top1"]
    assert all(row["n"] == 1 and isinstance(row["hamjepa_mean"], float) for row in result.table)
    assert set(result.selected) == {"predictor.steps", "predictor.dt", "hamjepa_loss.logdet_floor",
                                    "predictor.hidden_dim"}
    assert len(result.optuna_study.trials) == 2 and result.optuna_storage == live

    # the search trials vary exactly the searched keys, each inside its distribution
    search = [r for r in runs if r.data.tags.get("hamjepa.phase") == "search"]
    assert len(search) == 2
    defaults = {k: str(v) for k, v in base.flatten().items()}
    varied = {k for r in search for k, v in r.data.params.items() if k in defaults and v != defaults[k]}
    # besides the searched keys, a search trial measures only the objective at epoch 0 (the shared encoder)
    assert {r.data.params["eval.initial_readouts"] for r in search} == {"False"}
    varied -= {"eval.initial_readouts"}
    assert varied <= set(result.selected) and {"predictor.dt", "hamjepa_loss.logdet_floor"} <= varied
    for run in search:
        params = run.data.params
        assert params["predictor.steps"] in ("2", "4") and params["predictor.hidden_dim"] in ("128", "256")
        assert 0.02 <= float(params["predictor.dt"]) <= 0.1
        assert -3.0 <= float(params["hamjepa_loss.logdet_floor"]) <= -0.5
    assert parent.data.params["study.search_space"] == (
        "predictor.steps=int(2, 4, 2); predictor.dt=loguniform(0.02, 0.1); "
        "hamjepa_loss.logdet_floor=uniform(-3.0, -0.5); predictor.hidden_dim=choice(128, 256)")

    # every artifact lies beside the store; none in the working directory's mlruns/
    assert not (cwd / "mlruns").exists()
    assert experiment.artifact_location == (store / "mlartifacts" / "api-study").as_uri()
    assert all(r.info.artifact_uri.startswith(experiment.artifact_location) for r in runs)
    assert (store / "mlartifacts" / "api-study" / parent.info.run_id / "artifacts" / "summary.md").is_file()

    # the compared runs' encoders are logged models that load, and equal the encoder.pt artifact
    compared = [r for r in runs if r.data.tags.get("hamjepa.phase") == "compare"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # `models:/` URIs resolve through MLflow's default store
    models = client.search_logged_models([experiment.experiment_id])
    assert sorted(m.source_run_id for m in models) == sorted(r.info.run_id for r in compared)
    images = torch.randn(3, base.encoder.in_channels, base.data.image_size, base.data.image_size)
    for model in models:
        assert model.name == "encoder" and model.artifact_location.startswith(experiment.artifact_location)
        loaded = mlflow.pytorch.load_model(f"models:/{model.model_id}")
        encoder, cfg = load_encoder(client.download_artifacts(model.source_run_id, "model/encoder.pt", str(tmp_path)))
        assert isinstance(cfg, Config)
        with torch.no_grad():
            assert torch.allclose(loaded(images), encoder(images), atol=1e-5)

    # MLflow's system metrics on every trial run
    for run in [*search, *compared]:
        assert any(key.startswith("system/cpu_utilization") for key in run.data.metrics), run.info.run_name

    # a second process read the live Optuna study while the study ran: a running trial, then ended ones with durations
    during = [s for s in _snapshots(seen) if s["at"] < ended and "trials" in s]
    assert any(any(state == "RUNNING" for _, state, _ in s["trials"]) for s in during)
    assert any(sum(state in ("COMPLETE", "PRUNED") and seconds and seconds > 1 for _, state, seconds in s["trials"])
               == 2 for s in during)


def test_a_study_script_joins_the_cluster_in_ray_address(ray_cluster, tmp_path):
    """`ray job submit -- python studies/energy_budget.py` sets RAY_ADDRESS and no --address: the script joins that
    cluster (a local Ray here would be refused: the session's is running)."""
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    done = subprocess.run([sys.executable, str(ROOT / "studies" / "energy_budget.py"), "--smoke-test",
                           "--num-samples", "1", "--seeds", "0", "--reference", "0", "--freeze", "predictor.steps",
                           "--tracking-uri", uri, "--storage-path", str(tmp_path / "ray")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("hamjepa-energy_budget").experiment_id])
    assert sorted(r.data.tags["hamjepa.role"] for r in runs) == ["study", "trial"]
    assert "predictor.steps" not in next(r for r in runs if r.data.tags["hamjepa.role"] == "study").data.params[
        "study.search_keys"]
    # the live Optuna study sits in the study's folder by default
    parent = next(r for r in runs if r.data.tags["hamjepa.role"] == "study")
    folder = tmp_path / "ray" / "energy_budget" / parent.info.run_name
    trials = optuna.load_study(study_name=parent.info.run_name, storage=f"sqlite:///{folder}/optuna.db").trials
    assert len(trials) == 1 and trials[0].state.is_finished()
