"""A study on the session's simulated two-node cluster, its state under a storage URI, as on a real cluster.

The study is marked slow (two Ray Train runs); CI runs it.
"""

from dataclasses import replace
from pathlib import Path

import pytest
import ray
from conftest import HEAD_NODE_RESOURCE, WORKER_NODE_RESOURCE, tiny_config
from mlflow.tracking import MlflowClient

from hamjepa.cli import study_main
from hamjepa.errors import UserError
from hamjepa.study.phases import cluster_concurrency
from hamjepa.study.settings import StudySettings
from hamjepa.study.space import SearchSpace
from hamjepa.train.resources import Resources

ROOT = Path(__file__).resolve().parents[1]
SEARCH_SPACE = SearchSpace.from_file(ROOT / "studies" / "energy_budget.yaml")


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


@pytest.mark.slow  # it needs the session's Ray cluster: the fast tier starts no Ray
def test_trials_are_planned_for_an_autoscaling_clusters_maximum(ray_cluster, monkeypatch):
    """A GPU cluster scaling from zero has no GPU when a study starts: plan for what its config allows."""
    from ray._private.state import state

    settings = StudySettings("planning", tiny_config(), resources=Resources(1, 1.0, 1.0))
    with pytest.raises(UserError, match="at most 2 CPUs and 0 GPUs"):  # this fixed-size cluster: refused
        cluster_concurrency(settings)
    monkeypatch.setattr(state, "get_max_resources_from_cluster_config", lambda: {"CPU": 136.0, "GPU": 16.0})
    assert cluster_concurrency(settings) == 16  # cluster/aws.yaml at full size: 8 x 1 + 2 x 4 GPUs
    assert cluster_concurrency(replace(settings, max_concurrent=3)) == 3


@pytest.mark.slow
def test_a_node_lost_during_a_study_costs_at_most_its_trial(ray_test_cluster, tmp_path):
    """A third node joins, one of three concurrent trials lands on it (one CPU a node), and the node is removed
    while that trial trains: the study still finishes, with the trial retried from its checkpoint elsewhere or
    recorded as failed with a reason; nothing is left RUNNING."""
    import threading
    import time

    doomed = ray_test_cluster.add_node(num_cpus=1, object_store_memory=400 * 1024**2)
    ray_test_cluster.wait_for_nodes()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    removed, affected_ids = threading.Event(), []

    def remove_the_node_once_a_trial_trains_there():
        deadline = time.time() + 300
        while time.time() < deadline and not removed.is_set():
            time.sleep(1)
            try:
                client = MlflowClient(uri)
                experiment = client.get_experiment_by_name("node-loss")
                runs = client.search_runs([experiment.experiment_id]) if experiment else []
            except Exception:  # noqa: BLE001 - the store may be mid-creation
                continue
            there = [r.info.run_id for r in runs if doomed.node_id in r.data.tags.get("hamjepa.nodes", "")]
            if there:
                ray_test_cluster.remove_node(doomed, allow_graceful=False)
                affected_ids.extend(there)
                removed.set()

    watcher = threading.Thread(target=remove_the_node_once_a_trial_trains_there, daemon=True)
    watcher.start()
    code = study_main("energy_budget", SEARCH_SPACE, [
        "--smoke-test", "--seeds", "0", "--num-samples", "3", "--max-concurrent", "3", "--no-early-stopping",
        "--epochs", "6", "--tracking-uri", uri, "--storage-path", str(tmp_path / "ray"),
        "--address", ray_test_cluster.address, "--experiment", "node-loss"])
    watcher.join(timeout=5)
    assert removed.is_set()  # a trial did train on the node, and the node was removed under it
    assert code == 0
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("node-loss").experiment_id])
    trials = [r for r in runs if r.data.tags["hamjepa.role"] == "trial"]
    assert len(trials) == 3 and not [r for r in runs if r.info.status == "RUNNING"]
    assert len(affected_ids) == 1
    affected = next(r for r in trials if r.info.run_id == affected_ids[0])
    if affected.info.status == "FINISHED":  # retried: continued from a checkpoint on a surviving node
        assert affected.data.metrics["resumed_from_epoch"] >= 0 and affected.data.metrics["epoch"] == 6
        history = client.get_metric_history(affected.info.run_id, "epoch")
        assert sorted(m.step for m in history) == list(range(7))  # every epoch once
    else:
        assert affected.data.tags["hamjepa.status"] == "failed" and affected.data.tags["hamjepa.reason"]
    assert sum(r.data.tags["hamjepa.status"] == "finished" for r in trials) >= 2  # the others were unaffected
