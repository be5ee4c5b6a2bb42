"""A tracking store that fails under a run: writes refused without failing their caller, each fault named once,
the run's record kept whole (written at the end, or saved to a recovery file that `hamjepa recover` writes).

Real SQLite stores in a temporary folder; no Ray. The faults injected into real training runs are in
test_fault_injection.py (slow tier).
"""

from __future__ import annotations

import json
import os
import pickle

import pytest
from mlflow.tracking import MlflowClient

from hamjepa import cli
from hamjepa.store_faults import REFUSED, Guarded, StoreFault, check_present, describe
from hamjepa.tracking import REASON_TAG, STATUS_TAG, RunLogger
from hamjepa.train import run_record
from hamjepa.train.run_record import RunRecord
from tests.conftest import tiny_config


@pytest.fixture()
def uri(tmp_path):
    return f"sqlite:///{tmp_path}/store/mlflow.db"


def started(uri: str, key: str = "run-1") -> RunLogger:
    os.makedirs(uri[len("sqlite:///"):].rsplit("/", 1)[0], exist_ok=True)
    logger = RunLogger(uri, "exp", key=key)
    logger.start()
    logger.log_epoch({"epoch": 0, "val_knn20_top1": 50.0})
    return logger


def record_of(uri: str, status: str = "finished", reason: str = "", epochs: int = 2) -> RunRecord:
    cfg = tiny_config()
    reports = [{"epoch": e, "val_knn20_top1": 50.0 + e, "train/loss": 3.0 - e} for e in range(epochs + 1)]
    return RunRecord(uri, "exp", "run-1", "run-1", {"hamjepa.role": "run"}, cfg.to_dict(), status, reason,
                     epochs=reports)


# -- Guarded: a refused write costs a warning, never the caller -------------------------------------------------

def test_a_deleted_store_is_a_fault_never_a_new_empty_store(uri, capsys):
    logger = started(uri)
    path = uri[len("sqlite:///"):]
    os.remove(path)
    capsys.readouterr()  # MLflow's own lines of the store's creation
    guarded = Guarded(uri)
    assert guarded(logger.log_epoch, {"epoch": 1, "val_knn20_top1": 51.0}) is REFUSED
    assert guarded(logger.log_epoch, {"epoch": 2, "val_knn20_top1": 52.0}) is REFUSED
    assert not os.path.exists(path)  # MLflow would have created an empty database here
    assert guarded.faults == [f"the tracking store {path} was deleted"]
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and "was deleted; training goes on" in warnings[0]  # once, not once per write


def test_a_write_the_store_takes_returns_its_result_and_warns_nothing(uri, capsys):
    logger = started(uri)
    capsys.readouterr()
    guarded = Guarded(uri)
    assert guarded(logger.log_epoch, {"epoch": 1, "val_knn20_top1": 51.0}) is True
    assert guarded(logger.log_epoch, {"epoch": 1, "val_knn20_top1": 51.0}) is False  # already logged
    assert guarded.faults == [] and capsys.readouterr().err == ""


def test_the_refused_marker_survives_pickling_to_another_process():
    """Ray pickles a callback (and the marker it compares against) into its controller by value."""
    assert pickle.loads(pickle.dumps(REFUSED)) is REFUSED


@pytest.mark.parametrize(("message", "said"), [
    ("(raised as a result of Query-invoked autoflush)\n(sqlite3.OperationalError) attempt to write a readonly "
     "database\n[SQL: INSERT ...]", "is read-only"),
    ("(sqlite3.OperationalError) database or disk is full\n[SQL: INSERT ...]", "is on a full disk"),
    ("(sqlite3.OperationalError) database is locked\n[SQL: INSERT ...]", "refused a write (database is locked)"),
])
def test_a_fault_is_named_by_what_the_database_said(uri, message, said):
    started(uri)
    assert describe(uri, RuntimeError(message)).endswith(said)


def test_a_server_that_stops_answering_is_named_so():
    error = ConnectionError("HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded")
    assert describe("http://127.0.0.1:5000", error) == "the tracking store http://127.0.0.1:5000 cannot be reached"


def test_check_present_passes_an_existing_store_and_servers(uri):
    started(uri)
    check_present(uri)
    check_present("http://127.0.0.1:5000")
    os.remove(uri[len("sqlite:///"):])
    with pytest.raises(StoreFault, match="was deleted"):
        check_present(uri)


# -- the record: written whole at the end, or kept in a recovery file -------------------------------------------

def test_a_record_is_written_whole_and_idempotently(uri):
    logger = started(uri)  # the callback logged epoch 0 only; the store missed epochs 1 and 2
    logger.set_tags({REASON_TAG: "storage fault, not retried: ..."})  # a failed attempt's reason
    record = record_of(uri)
    run_record.write(record)
    run_record.write(record)  # again: nothing doubles
    client = MlflowClient(uri)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED" and run.data.tags[STATUS_TAG] == "finished"
    assert REASON_TAG not in run.data.tags  # a resumed run's old reason no longer holds
    assert [(m.step, m.value) for m in client.get_metric_history(logger.run_id, "val_knn20_top1")] == [
        (0, 50.0), (1, 51.0), (2, 52.0)]
    assert run.data.params["optim.epochs"] == str(tiny_config().optim.epochs)


def test_a_recovery_file_goes_to_the_first_folder_that_takes_it(tmp_path, uri, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "temporary"))
    (tmp_path / "temporary").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    record = record_of(uri, status="failed", reason="storage fault")
    path = run_record.save(record, [str(tmp_path / "missing-folder"), None])
    assert path == str(tmp_path / "temporary" / "hamjepa-record-run-1.json")
    assert run_record.load(path) == record
    assert run_record.save(record, [str(tmp_path)]) == str(tmp_path / "hamjepa-record-run-1.json")


def test_hamjepa_recover_writes_the_record_and_marks_the_file_done(tmp_path, uri, capsys):
    logger = started(uri)
    path = run_record.save(record_of(uri, status="failed", reason="storage fault, not retried"), [str(tmp_path)])
    assert cli.main(["recover", path]) == 0
    run = MlflowClient(uri).get_run(logger.run_id)
    assert run.info.status == "FAILED" and run.data.tags[REASON_TAG] == "storage fault, not retried"
    assert not os.path.exists(path) and os.path.exists(path + ".recovered")
    assert "3 epoch reports" in capsys.readouterr().out


def test_hamjepa_recover_never_recreates_a_deleted_store_but_writes_into_another(tmp_path, uri, capsys):
    started(uri)
    path = run_record.save(record_of(uri), [str(tmp_path)])
    os.remove(uri[len("sqlite:///"):])
    capsys.readouterr()
    assert cli.main(["recover", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "names no file" in err[0] and "Traceback" not in err[0]
    assert not os.path.exists(uri[len("sqlite:///"):])

    other = f"sqlite:///{tmp_path}/other.db"
    assert cli.main(["recover", path, "--tracking-uri", other]) == 0
    runs = MlflowClient(other).search_runs([MlflowClient(other).get_experiment_by_name("exp").experiment_id])
    assert [r.data.tags["hamjepa.key"] for r in runs] == ["run-1"] and runs[0].info.status == "FINISHED"


@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2]", json.dumps({"format": 99}).encode(),
                                     json.dumps({"format": 1, "key": "k"}).encode()])
def test_hamjepa_recover_refuses_a_file_that_is_not_a_record_in_one_sentence(tmp_path, content, capsys):
    path = tmp_path / "hamjepa-record-x.json"
    path.write_bytes(content)
    assert cli.main(["recover", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not one hamjepa wrote" in err[0]
    assert path.read_bytes() == content


def test_hamjepa_recover_refuses_a_folder(tmp_path, capsys):
    assert cli.main(["recover", str(tmp_path)]) == 2
    assert "is a folder, not a regular file" in capsys.readouterr().err


def test_a_study_whose_store_refuses_its_own_writes_ends_in_one_sentence_pointing_at_resume(tmp_path, capsys):
    """The trials train on through Guarded writes; the study's own writes (its summary) need the store, so the study
    stops there: one sentence naming the fault and --resume, exit 1, no traceback (measured before: 90 lines)."""
    from mlflow.exceptions import MlflowException

    from hamjepa.arguments import Parser

    store = tmp_path / "mlflow.db"
    store.write_bytes(b"")

    def work() -> int:
        try:
            raise RuntimeError("(sqlite3.OperationalError) attempt to write a readonly database")
        except RuntimeError as cause:
            raise MlflowException("(raised as a result of Query-invoked autoflush)\n(sqlite3.OperationalError) "
                                  "attempt to write a readonly database") from cause

    assert cli._guarded(Parser(prog="python studies/energy_budget.py"), work, f"sqlite:///{store}") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"python studies/energy_budget.py: error: the tracking store {store} "
                                               "is read-only, so the study stopped")
    assert "--resume" in err[0]


def test_an_error_that_is_not_the_stores_still_raises(tmp_path):
    from hamjepa.arguments import Parser

    def work() -> int:
        raise ZeroDivisionError("a bug, not a store")

    with pytest.raises(ZeroDivisionError):
        cli._guarded(Parser(prog="x"), work, f"sqlite:///{tmp_path}/mlflow.db")
