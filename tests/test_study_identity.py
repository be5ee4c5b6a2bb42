"""A study's identity: unique ids, resumable by id, refused when resumed with other settings; compare cells.

No Ray: these are the decisions a resumed study is built on.
"""

import dataclasses
import json

import pytest
from conftest import tiny_config

from hamjepa.errors import UserError
from hamjepa.study.invocation import IDENTITY_FILE, check_resumable, invocation_params, new_study_id
from hamjepa.study.settings import (
    ARM,
    CELL,
    StudySettings,
    comparison_cells,
    flat_overrides,
    run_key,
    search_params,
)
from hamjepa.train.resources import Resources


def test_resume_refuses_a_changed_command_and_unknown_ids(tmp_path):
    """Before Ray or MLflow: --resume with no study, an unknown id, or other settings is one sentence."""
    base = tiny_config()
    settings = StudySettings(name="energy_budget", base=base, storage_path=str(tmp_path), resume="latest")
    own = {"study.seed": 0, "study.seeds": 3}
    with pytest.raises(UserError, match="found no earlier run of study 'energy_budget'"):
        check_resumable(settings, own)
    study_dir = tmp_path / "energy_budget" / "energy_budget-20261129-120000-abc123"
    study_dir.mkdir(parents=True)
    (study_dir / IDENTITY_FILE).write_text(json.dumps({"id": study_dir.name,
                                                        "params": invocation_params(settings, own)}))
    (tmp_path / "energy_budget" / "latest.json").write_text(json.dumps({"id": study_dir.name}))
    check_resumable(settings, own)  # the same command: fine
    check_resumable(dataclasses.replace(settings, resume=study_dir.name), own)
    check_resumable(dataclasses.replace(settings, resume=""), {})  # not a resume: nothing to check
    with pytest.raises(UserError, match="no such study"):
        check_resumable(dataclasses.replace(settings, resume="energy_budget-20200101-000000-ffffff"), own)
    with pytest.raises(UserError, match=r"\(optim.epochs was 2, now 5\)"):
        check_resumable(dataclasses.replace(settings, base=base.override({"optim.epochs": 5})), own)
    with pytest.raises(UserError, match=r"\(--seeds was 3, now 5\)"):  # a study flag, named by its flag
        check_resumable(settings, {**own, "study.seeds": 5})
    with pytest.raises(UserError, match=r"\(--workers was 1, now 2\)"):
        check_resumable(dataclasses.replace(settings, resources=Resources(2)), own)


def test_a_search_study_records_what_check_resumable_compares(tmp_path, monkeypatch):
    """runner.run_study starts its Invocation with exactly search_params: --resume compares, before Ray, what the
    study stored."""
    from hamjepa.study import runner
    from hamjepa.study.space import SearchSpace

    class Started(Exception):
        pass

    def invocation(settings, params):
        raise Started(params)

    monkeypatch.setattr(runner, "Invocation", invocation)
    settings = StudySettings(name="s", base=tiny_config(), seeds=4, optuna_storage="postgresql://u:secret@db/optuna")
    space = SearchSpace.from_mapping({"predictor.dt": "uniform(0.01, 0.1)", "predictor.steps": "int(1, 3)"})
    with pytest.raises(Started) as started:
        runner.run_study(settings, space)
    assert started.value.args[0] == search_params(settings, space)
    assert "secret" not in search_params(settings, space)["study.optuna_storage"]


def test_study_ids_are_unique_within_one_second():
    ids = {new_study_id("energy_budget") for _ in range(200)}
    assert len(ids) == 200 and all(i.startswith("energy_budget-20") for i in ids)


def test_compare_cells_pair_every_arm_on_every_fresh_seed_and_are_named_by_method_and_seed():
    settings = StudySettings(name="s", base=tiny_config(), seeds=2, ablation="mlp")
    cells = comparison_cells(settings, {"predictor.dt": 0.1})
    # seed by seed, so an interrupted comparison has whole pairs first; never the search's seed (0)
    assert [(c[ARM]["method"], c["seed"]) for c in cells] == [
        ("hamjepa", 1), ("sigreg", 1), ("mlp", 1), ("hamjepa", 2), ("sigreg", 2), ("mlp", 2)]
    assert [run_key({CELL: c}, "ignored") for c in cells[:2]] == ["hamjepa-seed1", "sigreg-seed1"]
    assert run_key({"predictor.dt": 0.1}, "a1b2c3d4") == "a1b2c3d4"  # a search trial keeps Tune's id
    assert flat_overrides({CELL: cells[2]}) == {"predictor.dt": 0.1, "method": "mlp", "seed": 1,
                                                "eval.objective_every_epoch": False}  # nothing selects on it
    # a search trial: every trial starts from the base seed's encoder, so its epoch 0 measures the objective only
    assert flat_overrides({"predictor.dt": 0.1}) == {"predictor.dt": 0.1, "eval.initial_readouts": False}
    assert [c[ARM] for c in comparison_cells(settings, None)] == [{"method": "sigreg"}] * 2  # nothing selected


def test_any_error_closes_the_study_and_its_runs_as_failed_with_the_reason(tmp_path):
    """Not Ctrl-C but an error (MLflow, disk, a bug): nothing is left RUNNING, and the parent says why."""
    from mlflow.tracking import MlflowClient

    from hamjepa.study.invocation import Invocation
    from hamjepa.tracking import PARENT_TAG, ROLE_TAG, RunLogger

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    settings = StudySettings(name="s", base=tiny_config(), tracking_uri=uri, storage_path=str(tmp_path / "state"))
    with pytest.raises(OSError, match="No space left"):
        with Invocation(settings, {"study.seed": 0}) as study:
            child = RunLogger(uri, settings.experiment_name, key="child", parent_run_id=study.parent_id,
                              tags={ROLE_TAG: "trial"})
            child.start()
            raise OSError(28, "No space left on device")
    client = MlflowClient(uri)
    parent = client.get_run(study.parent_id)
    assert parent.info.status == "FAILED" and parent.data.tags["hamjepa.status"] == "failed"
    assert parent.data.tags["hamjepa.reason"] == "OSError: [Errno 28] No space left on device"
    run = client.get_run(child.run_id)
    assert run.info.status == "FAILED" and run.data.tags[PARENT_TAG] == study.parent_id
    assert run.data.tags["hamjepa.reason"].startswith("the study stopped: OSError")
    # and the stopped study can be resumed: its identity was stored before any work
    assert (tmp_path / "state" / "s" / study.study_id / IDENTITY_FILE).is_file()
    check_resumable(dataclasses.replace(settings, resume="latest"), {"study.seed": 0})


def test_a_ctrl_c_outside_the_phases_still_closes_the_study_as_killed(tmp_path):
    from mlflow.tracking import MlflowClient

    from hamjepa.study.invocation import Invocation

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    settings = StudySettings(name="s", base=tiny_config(), tracking_uri=uri, storage_path=str(tmp_path / "state"))
    with pytest.raises(KeyboardInterrupt):
        with Invocation(settings, {"study.seed": 0}) as study:
            raise KeyboardInterrupt  # e.g. while the summary is built
    parent = MlflowClient(uri).get_run(study.parent_id)
    assert parent.info.status == "KILLED" and parent.data.tags["hamjepa.status"] == "interrupted"


def test_a_tuned_baseline_arm_carries_its_selected_configuration():
    from hamjepa.study.settings import ARM, StudySettings, comparison_cells

    settings = StudySettings(name="s", base=tiny_config(), seeds=2, tune_baseline=True)
    cells = comparison_cells(settings, {"predictor.dt": 0.1}, {"sigreg.weight": 0.05})
    assert [c[ARM] for c in cells[:2]] == [{"predictor.dt": 0.1, "method": "hamjepa"},
                                           {"sigreg.weight": 0.05, "method": "sigreg"}]
    untuned = comparison_cells(settings, {"predictor.dt": 0.1})
    assert untuned[1][ARM] == {"method": "sigreg"}  # SIGReg at its defaults
