"""A study on the session's simulated two-node cluster, its state under a storage URI, as on a real cluster.

The study is marked slow (two Ray Train runs); CI runs it.
"""

import runpy
from dataclasses import replace
from pathlib import Path

import pytest
import ray
from conftest import HEAD_NODE_RESOURCE, WORKER_NODE_RESOURCE, tiny_config
from mlflow.tracking import MlflowClient

from hamjepa.cli import study_main
from hamjepa.config import ConfigError
from hamjepa.study import StudySettings, _cluster_concurrency
from hamjepa.training import Resources

ROOT = Path(__file__).resolve().parents[1]
SEARCH_SPACE = runpy.run_path(str(ROOT / "studies" / "energy_budget.py"))["SEARCH_SPACE"]


@pytest.mark.slow
def test_two_trial_study_lands_on_both_nodes_with_shared_storage(ray_cluster, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    storage = tmp_path / "shared"
    # A URI, not a folder: the same code path as s3://bucket/... on a cluster (pyarrow resolves both). ASHA off:
    # this test is about where trials land, and a trial ASHA stopped (either may be) would not be complete.
    code = study_main("energy_budget", SEARCH_SPACE, [
        "--smoke-test", "--seeds", "0", "--no-early-stopping", "--max-concurrent", "2", "--tracking-uri", uri,
        "--storage-path", storage.as_uri(), "--address", ray_cluster, "--experiment", "multinode"])
    assert code == 0

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("multinode").experiment_id])
    trials = [r for r in runs if r.data.tags["hamjepa.role"] == "trial"]
    assert len(trials) == 2
    for run in trials:  # complete: finished, every searched param, per-epoch and final metrics
        assert run.info.status == "FINISHED" and run.data.tags["hamjepa.status"] == "finished"
        assert set(SEARCH_SPACE) <= set(run.data.params)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]
        assert "test_knn20_top1" in run.data.metrics

    node_kind = {node["NodeID"]: next(r for r in (HEAD_NODE_RESOURCE, WORKER_NODE_RESOURCE) if r in node["Resources"])
                 for node in ray.nodes() if node["Alive"]}
    landed = {node_kind[r.data.tags["hamjepa.nodes"]] for r in trials}
    assert landed == {HEAD_NODE_RESOURCE, WORKER_NODE_RESOURCE}

    # One storage location holds the pointer to the invocation, Tune's experiment and both Train runs.
    study_id = next(r for r in runs if r.data.tags["hamjepa.role"] == "study").info.run_name
    assert f'"{study_id}"' in (storage / "energy_budget" / "latest.json").read_text()
    train_runs = sorted(p.name for p in (storage / "energy_budget" / study_id / "train").iterdir())
    trial_ids = sorted(f"{study_id}-{r.data.tags['hamjepa.trial_id']}" for r in trials)
    assert train_runs == trial_ids
    assert (storage / "energy_budget" / study_id / "search").is_dir()


def test_trials_are_planned_for_an_autoscaling_clusters_maximum(ray_cluster, monkeypatch):
    """A GPU cluster scaling from zero has no GPU when a study starts: plan for what its config allows."""
    from ray._private.state import state

    settings = StudySettings("planning", tiny_config(), resources=Resources(1, 1.0, 1.0))
    with pytest.raises(ConfigError, match="at most 2 CPUs and 0 GPUs"):  # this fixed-size cluster: refused
        _cluster_concurrency(settings)
    monkeypatch.setattr(state, "get_max_resources_from_cluster_config", lambda: {"CPU": 136.0, "GPU": 16.0})
    assert _cluster_concurrency(settings) == 16  # cluster/aws.yaml at full size: 8 x 1 + 2 x 4 GPUs
    assert _cluster_concurrency(replace(settings, max_concurrent=3)) == 3
