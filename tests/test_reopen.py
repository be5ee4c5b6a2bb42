"""Reopening studies from MLflow alone (`hamjepa report`, `hamjepa studies`), on stores written without Ray."""

import hashlib
import sqlite3
import time
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from hamjepa import cli, names, store_file
from hamjepa.config import profile
from hamjepa.study.reopen import Gaps, base_config, runs_url
from hamjepa.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    METHOD_TAG,
    PHASE_TAG,
    ROLE_TAG,
    STATUS_TAG,
    TRIAL_TAG,
    RunLogger,
    experiment_id,
)

BASE = profile("quick")
VIEW = "workflowType=machine_learning"  # MLflow 3.17's Model training view (not the GenAI overview)
EXPERIMENT = "hamjepa-energy_budget"
FINISHED_ID, INTERRUPTED_ID, REPRODUCE_ID = ("energy_budget-20250101-120000-aaaaaa",
                                             "energy_budget-20250102-120000-bbbbbb",
                                             "reproduce_paper-20250103-120000-cccccc")
# (final, initialisation) of the compared metrics per compare cell: HamJEPA 5.25 points ahead on average.
REFERENCE_VALUES = (58.0, 60.0, 62.0)  # the untrained encoders' readouts, every metric
COMPARE_VALUES = {("hamjepa", 1): (75.0, 60.0), ("hamjepa", 2): (77.0, 61.0),
                  ("sigreg", 1): (70.0, 60.0), ("sigreg", 2): (71.5, 60.5)}


def _parent(uri, experiment, study_id, name, params):
    parent = RunLogger(uri, experiment, key=f"study/{study_id}", run_name=study_id,
                       tags={ROLE_TAG: "study", "hamjepa.study": name})
    parent.start()
    parent.log_params(params)
    return parent


def _child(uri, experiment, parent, study_id, phase, key, cfg, epochs, final, status, mlflow_status):
    """A trial run: params, the objective per epoch (epoch 0 = initialisation), final metrics, its end."""
    child = RunLogger(uri, experiment, key=f"{study_id}/{key}", run_name=f"{phase}-{key}", parent_run_id=parent.run_id,
                      tags={ROLE_TAG: "trial", METHOD_TAG: cfg.method, PHASE_TAG: phase, TRIAL_TAG: key})
    child.start()
    child.log_params(cfg.flatten())
    for epoch in range(epochs + 1):
        child.log_epoch({names.EPOCH: epoch, names.objective(20): 50.0 + 5 * epoch})
    if final:
        child.log_metrics(final, step=epochs)
    child.set_tags({STATUS_TAG: status})
    if mlflow_status != "RUNNING":
        child.finish(mlflow_status)
    return child


def _compared(final, initial):
    metrics = {}
    for _, metric in names.comparison_metrics(20):
        metrics[metric], metrics[names.init(metric)] = final, initial
    return metrics


def _search_study(uri, study_id, *, interrupted):
    """3 search trials (one stopped by ASHA; when `interrupted`, one KILLED) and 2 paired seeds x 2 arms (when
    `interrupted`, hamjepa-seed2 never started and the parent run is KILLED)."""
    params = {"study.num_samples": 3, "study.seeds": 2, "study.paired_seeds": "1,2", "study.search_keys":
              "predictor.dt", "study.early_stopping": True, "study.seed": 0, "study.reference": 3, **BASE.flatten()}
    parent = _parent(uri, EXPERIMENT, study_id, "energy_budget", params)
    epochs = BASE.optim.epochs
    trials = [("t1", "0.07", 80.0, "finished", "FINISHED"), ("t2", "0.01", 65.0, "finished", "FINISHED"),
              ("t3", "0.03", None, "stopped", "FINISHED")]
    if interrupted:
        trials[2] = ("t3", "0.03", None, "running", "KILLED")
    for key, dt, value, status, end in trials:
        cfg = BASE.override({"predictor.dt": dt})
        final = {**_compared(value, 55.0), names.objective(20): value} if value else {}
        _child(uri, EXPERIMENT, parent, study_id, "search", key, cfg, epochs if value else 1, final, status, end)
    for (method, seed), (final, initial) in COMPARE_VALUES.items():
        if interrupted and (method, seed) == ("hamjepa", 2):
            continue
        cfg = BASE.override({"method": method, "seed": seed, "predictor.dt": "0.07"})
        _child(uri, EXPERIMENT, parent, study_id, "compare", f"{method}-seed{seed}", cfg, epochs,
               _compared(final, initial), "finished", "FINISHED")
    if not interrupted:  # the initialisation reference, as study/reference.py logs it: one step per encoder
        reference = RunLogger(uri, EXPERIMENT, key=f"{study_id}/reference", run_name="reference",
                              parent_run_id=parent.run_id, tags={ROLE_TAG: "reference", PHASE_TAG: "reference"})
        for step, value in enumerate(REFERENCE_VALUES):
            reference.log_metrics({f"{method}/{metric}": value for method in ("hamjepa", "sigreg")
                                   for _, metric in names.comparison_metrics(20)}, step=step)
        reference.set_tags({STATUS_TAG: "finished"})
        reference.finish("FINISHED")
    parent.finish("KILLED" if interrupted else "FINISHED")
    time.sleep(0.01)  # distinct start times: the newest study is the latest


def _reproduce_study(uri):
    """The paper's fixed runs on one seed: SIGReg and HamJEPA finished, MLP-HJEPA never started."""
    base = BASE.override({"data.val_size": 0})
    parent = _parent(uri, "hamjepa-reproduce_paper", REPRODUCE_ID, "reproduce_paper",
                     {"study.seeds": 1, "study.methods": "sigreg,hamjepa,mlp", **base.flatten()})
    for method, knn in (("sigreg", 40.0), ("hamjepa", 44.5)):
        final = {names.accuracy("test", names.knn(20)): knn}
        for readout in names.readouts(method):
            final[names.accuracy("test", names.knn(20), readout)] = knn
            final[names.accuracy("test", "linprobe_top1", readout)] = knn + 10
        _child(uri, "hamjepa-reproduce_paper", parent, REPRODUCE_ID, "reproduce", f"{method}-seed0",
               base.override({"method": method}), base.optim.epochs, final, "finished", "FINISHED")
    parent.finish("KILLED")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    _search_study(uri, FINISHED_ID, interrupted=False)
    _search_study(uri, INTERRUPTED_ID, interrupted=True)
    _reproduce_study(uri)
    return uri


def _cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_report_of_a_finished_study_rebuilds_its_summary(store, capsys):
    code, out, err = _cli(capsys, "report", "--study", FINISHED_ID, "--tracking-uri", store)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith(f"Study {FINISHED_ID} (energy_budget; experiment '{EXPERIMENT}', parent run ")
    assert lines[0].endswith(", finished, 7 trial runs.")
    assert lines[1] == "Complete: every planned run is there and ended."
    exp = MlflowClient(store).get_experiment_by_name(EXPERIMENT).experiment_id
    assert lines[2] == f"Browse it: http://127.0.0.1:5000/#/experiments/{exp}/runs?{VIEW}"
    assert "--resume" not in out
    # The paired comparison, from MLflow's numbers: HamJEPA 75, 77; SIGReg 70, 71.5 on seeds 1, 2.
    assert "Paired comparison on seeds 1, 2 (n = 2)" in out
    assert "| test kNN@20 | primary | 76.00 +/- 1.41 | 70.75 +/- 1.06 | +5.25 [" in out
    assert ("Verdict (primary, declared before the study: test kNN@20): HamJEPA ahead on test kNN@20 by +5.25 "
            "[+2.07, +8.43]; on 2 of 2 seeds") in out
    assert out.startswith("Study ") and "Tuning: HamJEPA tuned over" in out  # the asymmetry, before numbers
    assert "HamJEPA search trials: 3 (2 finished, 1 stopped early, 0 diverged, 0 failed)." in out
    assert "HamJEPA selected on validation (search-t1, search seed 0" in out
    assert "Configuration: predictor.dt=0.07." in out
    # gains against the study's 3 untrained encoders (mean 60), not the runs' own epoch 0 (60.5)
    assert "Gain = final mean minus the mean of 3 encoders at initialisation" in out
    primary = next(line for line in out.splitlines() if line.startswith("| test kNN@20 | primary |"))
    assert primary.split(" | ")[6].startswith("+16.00 [") and primary.split(" | ")[7].startswith("+10.75 [")

def test_report_of_an_interrupted_study_names_what_is_missing(store, capsys):
    code, out, _ = _cli(capsys, "report", "--study", INTERRUPTED_ID, "--tracking-uri", store)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].endswith(", interrupted, 6 trial runs.")
    assert lines[1] == ("Incomplete: 1 search trial cut (KILLED); 1 of 4 compare runs missing: hamjepa-seed2; 1 of 1 "
                        "reference run missing: reference.")
    assert lines[2] == f"Continue it with the command that started it and --resume {INTERRUPTED_ID}."
    # Seed 2 has no HamJEPA run: only seed 1 is paired.
    assert "Paired comparison on seeds 1 (n = 1)" in out
    assert "| test kNN@20 | primary | 75.00 | 70.00 | +5.00 (n=1" in out
    assert "HamJEPA search trials: 3 (2 finished, 0 stopped early" in out


def test_report_latest_is_the_newest_study_and_a_reproduction_uses_the_paper_table(store, capsys):
    code, out, _ = _cli(capsys, "report", "--latest", "--tracking-uri", store)
    assert code == 0 and out.startswith(f"Study {REPRODUCE_ID} (reproduce_paper;")
    assert "Incomplete: 1 of 3 reproduce runs missing: mlp-seed0." in out
    assert "| ours: Fashion-MNIST" in out and "40.00 / 50.00" in out and "44.50 / 54.50" in out
    assert "HamJEPA q - SIGReg, test kNN@20: ours +4.50 points" in out
    _, default, _ = _cli(capsys, "report", "--tracking-uri", store)  # no flag: the latest
    assert default == out


def test_studies_lists_every_study_with_its_counts_and_verdict(store, capsys):
    code, out, err = _cli(capsys, "studies", "--tracking-uri", store, "--experiment", EXPERIMENT)
    assert code == 0 and err == ""
    header, *rows = out.splitlines()
    assert header.split() == ["study", "experiment", "started", "status", "trials", "verdict"]
    assert [row.split()[0] for row in rows] == [INTERRUPTED_ID, FINISHED_ID]  # newest first
    interrupted, finished = (row.split(maxsplit=6) for row in rows)
    assert interrupted[4:6] == ["interrupted", "6"] and finished[4:6] == ["finished", "7"]
    assert finished[6] == "HamJEPA ahead on test kNN@20 by +5.25 [+2.07, +8.43]"  # the primary's verdict
    assert interrupted[6] == "n = 1: no interval, nothing resolved"
    _, everything, _ = _cli(capsys, "studies", "--tracking-uri", store)
    rows = everything.splitlines()[1:]
    assert len(rows) == 3 and rows[0].split()[:2] == [REPRODUCE_ID, "hamjepa-reproduce_paper"]
    assert rows[0].split(maxsplit=6)[4:6] == ["interrupted", "2"] and "ours +4.50 points" in rows[0]


@pytest.mark.parametrize("argv, says", [
    (["report", "--study", "energy_budget-nope"], "--study 'energy_budget-nope' is not a study in the tracking store"),
    (["report", "--study", "a b"], "--study = 'a b' is invalid"),
    (["report", "--experiment", "nope"], "--experiment 'nope' is not in this tracking store"),
])
def test_bad_report_arguments_are_one_sentence_and_exit_2(store, capsys, argv, says):
    code, out, err = _cli(capsys, *argv, "--tracking-uri", store)
    assert code == 2 and out == ""
    assert says in err and err.count("\n") == 1 and err.rstrip().endswith(".")


def test_both_study_and_latest_are_refused(capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["report", "--study", "x", "--latest"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1
    assert "argument --latest: not allowed with argument --study" in err


def _mlflow_store(path):
    """A current MLflow store without studies (MLflow creates its tables on first use)."""
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def _older_store(path):
    """An MLflow store whose recorded schema is one revision behind the installed MLflow's head: what a store
    written by an earlier MLflow looks like to this one (there is no older MLflow here to write a real one)."""
    _mlflow_store(path)
    older = store_file._migrations().get_revision(store_file.head_revision()).down_revision
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE alembic_version SET version_num = ?", (older,))
    connection.close()
    return path


def _unrelated_database(path):
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE users (name TEXT)")
        connection.execute("INSERT INTO users VALUES ('ada')")
    connection.close()
    return path


def _empty_file(path):
    path.write_bytes(b"")
    return path


def test_studies_of_an_empty_store_is_an_empty_answer(tmp_path, capsys):
    empty = f"sqlite:///{_mlflow_store(tmp_path / 'empty.db')}"
    capsys.readouterr()  # MLflow's own log lines of creating it
    code, out, err = _cli(capsys, "studies", "--tracking-uri", empty)
    assert code == 0 and out == "" and "no study" in err
    code, _, err = _cli(capsys, "report", "--tracking-uri", empty)  # a report of nothing is an error
    assert code == 2 and err.count("\n") == 1 and "holds no study; run one first" in err


def test_an_absent_or_non_sqlite_store_is_one_sentence(tmp_path, capsys):
    code, _, err = _cli(capsys, "studies", "--tracking-uri", f"sqlite:///{tmp_path}/absent.db")
    assert code == 2 and "names no file" in err and not (tmp_path / "absent.db").exists()
    (tmp_path / "text.db").write_text("not a database")
    code, _, err = _cli(capsys, "report", "--tracking-uri", f"sqlite:///{tmp_path}/text.db")
    assert code == 2 and "which is not a SQLite database" in err


@pytest.mark.parametrize("make, says", [
    (_empty_file, "an empty file, not an MLflow store"),
    (_unrelated_database, "a SQLite database that is not an MLflow store"),
    (_older_store, "an MLflow store of an older schema"),
])
@pytest.mark.parametrize("command", ["studies", "report"])
def test_reading_commands_refuse_a_file_they_would_change_and_leave_its_bytes_alone(tmp_path, capsys, make, says,
                                                                                     command):
    path = make(tmp_path / "user.db")
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    listing = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    code, out, err = _cli(capsys, command, "--tracking-uri", f"sqlite:///{path}")
    assert code == 2 and out == "" and err.count("\n") == 1 and says in err and "Traceback" not in err
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no journal or lock file left beside it
    if make is _older_store:
        assert "back the file up first" in err and "mlflow db upgrade" in err


def test_gaps_sentence_lists_missing_and_cut_runs():
    gaps = Gaps({"search": 4, "compare": 4}, {"search": [""], "compare": ["sigreg-seed2", "hamjepa-seed2"]},
                {"search": {"search-a": "KILLED", "search-b": "RUNNING"}, "compare": {"sigreg-seed1": "KILLED"}})
    assert gaps.sentence() == ("1 of 4 search trials never started; 2 search trials cut (1 KILLED, 1 RUNNING); "
                               "2 of 4 compare runs missing: sigreg-seed2, hamjepa-seed2; 1 compare run cut (KILLED): "
                               "sigreg-seed1")
    assert not gaps.complete and Gaps({"compare": 2}, {"compare": []}, {"compare": {}}).complete


def test_the_base_config_comes_back_from_the_parent_runs_params():
    for cfg in (profile("quick"), profile("cifar100", {"data.root": "/srv/data", "predictor.dt": "0.02"})):
        assert base_config({k: str(v) for k, v in cfg.flatten().items()}).flatten() == cfg.flatten()


def test_experiments_are_model_training_experiments(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    created = experiment_id(client, "new")
    assert client.get_experiment(created).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    older = client.create_experiment("older")  # made before the tag existed: it gets ours
    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})  # a user's choice
    assert experiment_id(client, "older") == older and experiment_id(client, "chosen") == chosen
    assert client.get_experiment(older).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_the_runs_url_is_the_ui_runs_table(store, capsys):
    assert runs_url("sqlite:////x/mlflow.db", "7") == f"http://127.0.0.1:5000/#/experiments/7/runs?{VIEW}"
    assert runs_url("https://user:secret@host:443/", "7") == f"https://user:***@host:443/#/experiments/7/runs?{VIEW}"
    settings = SimpleNamespace(tracking_uri=store, experiment_name=EXPERIMENT)
    result = SimpleNamespace(text="table\n", parent_run_id="p", interrupted=False, study_id=FINISHED_ID)
    assert cli._print_result(settings, result) == 0
    exp = MlflowClient(store).get_experiment_by_name(EXPERIMENT).experiment_id
    assert (f"Its runs: http://127.0.0.1:5000/#/experiments/{exp}/runs?{VIEW}  (`hamjepa report --study {FINISHED_ID}`"
            in capsys.readouterr().out)


def test_a_study_that_did_not_finish_says_how_to_continue_it():
    from hamjepa.study.reopen import StudyRun, _how_it_ended

    def study(status, reason=""):
        return StudyRun("r", "s-1", "energy_budget", "1", EXPERIMENT, 0, status, {}, reason)

    assert _how_it_ended(study("FINISHED")) == []
    assert _how_it_ended(study("KILLED")) == ["Continue it with the command that started it and --resume s-1."]
    assert _how_it_ended(study("RUNNING"))[0].startswith("Still running, or its process ended without closing it")
    assert _how_it_ended(study("FAILED", "ValueError: boom")) == [
        "It failed (ValueError: boom); continue it with the command that started it and --resume s-1."]
    assert study("KILLED").status_word == "interrupted" and study("KILLED").started == "-"


def test_a_tracking_store_path_too_long_for_the_file_system_is_one_sentence(tmp_path, capsys):
    for command in ("studies", "report"):
        code, out, err = _cli(capsys, command, "--tracking-uri", f"sqlite:///{tmp_path}/{'m' * 300}.db")
        assert code == 2 and out == "" and err.count("\n") == 1 and "longer than the 255" in err
