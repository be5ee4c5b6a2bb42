"""MLflow logging: runs found again by key, epochs logged once, never left RUNNING."""

import re

import pytest
from mlflow.tracking import MlflowClient

from hamjepa.checks import check_tracking_uri, resolve_tracking_uri
from hamjepa.errors import UserError
from hamjepa.tracking import RunLogger


@pytest.fixture()
def uri(tmp_path):
    return f"sqlite:///{tmp_path}/mlflow.db"


def test_run_is_reused_by_key_and_epochs_are_logged_once(uri):
    first = RunLogger(uri, "exp", key="trial-1", tags={"hamjepa.role": "trial"})
    run_id = first.start()
    first.log_params({"predictor.steps": 2, "predictor.dt": 0.05})
    assert first.log_epoch({"epoch": 1, "train/loss": 3.0, "val_knn20_top1": 12.5})
    assert not first.log_epoch({"epoch": 1, "train/loss": 3.0})  # a repeated report (at-least-once)

    # a resumed driver: a new logger with the same key finds the same run and its logged epochs
    again = RunLogger(uri, "exp", key="trial-1")
    assert again.start() == run_id
    assert not again.log_epoch({"epoch": 1, "train/loss": 99.0})
    assert again.log_epoch({"epoch": 2, "train/loss": 2.0, "diverged_reason": "none", "bad": float("nan")})
    again.log_params({"predictor.steps": 2})  # re-logging the same params is harmless
    again.finish("FINISHED")

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 2.0)]
    assert "bad" not in runs[0].data.metrics  # NaN is never logged
    assert runs[0].data.tags["hamjepa.diverged_reason"] == "none"
    assert runs[0].data.params["predictor.dt"] == "0.05"


def test_child_run_links_to_parent(uri):
    parent = RunLogger(uri, "exp", key="study")
    parent_id = parent.start()
    child = RunLogger(uri, "exp", key="trial-a", parent_run_id=parent_id)
    child_id = child.start()
    assert MlflowClient(uri).get_run(child_id).data.tags["mlflow.parentRunId"] == parent_id


def test_many_params_are_batched(uri):
    logger = RunLogger(uri, "exp", key="big")
    logger.log_params({f"p{i}": i for i in range(250)})
    assert len(MlflowClient(uri).get_run(logger.run_id).data.params) == 250


def test_relative_sqlite_uri_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_tracking_uri("sqlite:///sub/x.db") == f"sqlite:///{tmp_path}/sub/x.db"


def test_unwritable_or_unreachable_tracking_uri_is_one_sentence(tmp_path):
    with pytest.raises(UserError, match="not writable"):
        check_tracking_uri(f"sqlite:///{tmp_path}/missing/folder/mlflow.db")
    with pytest.raises(UserError, match="cannot be reached"):
        check_tracking_uri("http://127.0.0.1:9/")  # the discard port: nothing listens
    with pytest.raises(UserError, match="not supported"):
        check_tracking_uri("ftp://example/mlflow")


def test_epoch_zero_names_the_data_as_an_mlflow_dataset_input(tmp_path):
    """The UI's Dataset column: the run's dataset, the digest of its split, its sizes."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = RunLogger(uri, "exp", key="run", tags={"hamjepa.dataset": "fashion_mnist"})
    digest = "ab" * 32
    assert logger.log_epoch({"epoch": 0, "data_digest": digest, "data_sizes": "train 720, val 80, test 10000"})
    run = MlflowClient(uri).get_run(logger.run_id)
    (used,) = run.inputs.dataset_inputs
    assert used.dataset.name == "fashion_mnist" and digest.startswith(used.dataset.digest)
    assert "train 720, val 80" in used.dataset.profile and used.tags[0].value == "training"
    assert run.data.tags["hamjepa.data_digest"] == digest  # the whole digest, as a tag


def test_a_sqlite_store_keeps_its_artifacts_beside_it_and_a_server_its_own(tmp_path, monkeypatch):
    """A new experiment in sqlite:///<folder>/mlflow.db keeps its artifacts in <folder>/mlartifacts/<experiment>, not in
    the working directory's mlruns/; any other store keeps its own artifact root."""
    from hamjepa.tracking import artifact_location, experiment_id

    assert artifact_location("sqlite:////data/runs/mlflow.db", "hamjepa-energy_budget") == \
        "file:///data/runs/mlartifacts/hamjepa-energy_budget"
    assert artifact_location("sqlite:////data/mlflow.db", "my study / v2") == "file:///data/mlartifacts/my_study_v2"
    assert artifact_location("http://127.0.0.1:5000", "x") is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "store").mkdir()
    client = MlflowClient(f"sqlite:///{tmp_path}/store/mlflow.db")
    exp = client.get_experiment(experiment_id(client, "beside"))
    assert exp.artifact_location == (tmp_path / "store" / "mlartifacts" / "beside").as_uri()
    run = client.create_run(exp.experiment_id)
    client.log_text(run.info.run_id, "hello", "note.txt")
    assert (tmp_path / "store" / "mlartifacts" / "beside" / run.info.run_id / "artifacts" / "note.txt").is_file()
    assert not (tmp_path / "mlruns").exists()


def test_a_reopened_killed_run_runs_again_and_loses_the_reason_it_was_killed_for(uri):
    """What --resume does to a run Ctrl-C closed: reopened by its key (RUNNING again), and the interruption's
    reason removed when it ends; removing a tag the run does not have is harmless."""
    cut = RunLogger(uri, "exp", key="compare-1")
    run_id = cut.start()
    cut.set_tags({"hamjepa.reason": "interrupted; --resume continues it"})
    cut.finish("KILLED")

    resumed = RunLogger(uri, "exp", key="compare-1")
    assert resumed.start() == run_id
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "RUNNING"
    resumed.delete_tag("hamjepa.reason")
    resumed.delete_tag("hamjepa.reason")  # already gone
    resumed.finish("FINISHED")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "hamjepa.reason" not in run.data.tags


@pytest.mark.parametrize("uri, module, package", [
    ("postgresql://user:secret@db:5432/mlflow", "psycopg2", "psycopg2-binary"),
    ("postgresql+psycopg://user@db/mlflow", "psycopg", "psycopg[binary]"),
    ("mysql+pymysql://db/mlflow", "pymysql", "PyMySQL"),
])
def test_a_database_uri_without_its_driver_is_one_sentence_naming_what_to_install(uri, module, package,
                                                                                   monkeypatch):
    import importlib.util

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else found(name, *a))
    with pytest.raises(UserError, match=rf"needs the Python driver {module}, which is not installed; "
                                        rf"pip install {re.escape(package)}") as refused:
        check_tracking_uri(uri)
    assert "secret" not in str(refused.value)  # credentials stay out of the sentence
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # installed: accepted
    check_tracking_uri(uri)
