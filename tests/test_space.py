"""Search spaces as data (hamjepa/study/space.py): the YAML grammar, each distribution as Optuna receives it, the
one-sentence refusals, --freeze / --search / --set, and the study script's own file."""

import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from hamjepa.cli import study_main
from hamjepa.config import Config, profile
from hamjepa.study.space import SearchSpace, SpaceError

ROOT = Path(__file__).resolve().parents[1]
STUDY_FILE = ROOT / "studies" / "energy_budget.yaml"
EVERY_KIND = {"predictor.steps": "int(1, 7, 2)", "predictor.dt": "loguniform(0.01, 0.2)",
              "hamjepa_loss.logdet_floor": "uniform(-3.0, -0.5)", "sigreg.num_directions": "choice(16, 32, 64)"}


def test_each_kind_reaches_optuna_as_the_distribution_written():
    from ray.tune.search.optuna import OptunaSearch

    space = SearchSpace.from_mapping(EVERY_KIND)
    space.check(Config())
    converted = OptunaSearch.convert_search_space(space.tune())
    assert converted["predictor.steps"] == optuna.distributions.IntDistribution(1, 7, step=2)  # both ends included
    assert converted["predictor.dt"] == optuna.distributions.FloatDistribution(0.01, 0.2, log=True)
    assert converted["hamjepa_loss.logdet_floor"] == optuna.distributions.FloatDistribution(-3.0, -0.5)
    assert converted["sigreg.num_directions"] == optuna.distributions.CategoricalDistribution((16, 32, 64))
    assert list(space) == list(EVERY_KIND)  # the order written: the order of Tune's table columns


def test_the_text_form_round_trips_and_is_canonical():
    space = SearchSpace.from_mapping({"predictor.dt": "loguniform( 1e-2 ,0.2 )", "predictor.steps": "int(1,4)"})
    assert space.text() == "predictor.dt=loguniform(0.01, 0.2); predictor.steps=int(1, 4)"
    again = SearchSpace.from_mapping(dict(line.split(": ", 1) for line in space.to_yaml().splitlines()))
    assert again == space


def test_the_study_file_holds_the_eight_knobs_and_fits_the_quick_profile():
    space = SearchSpace.from_file(STUDY_FILE)
    assert list(space) == ["predictor.steps", "predictor.dt", "hamjepa_loss.logdet_floor", "hamjepa_loss.pr_floor_q",
                           "hamjepa_loss.pr_floor_p", "hamjepa_loss.q_target", "hamjepa_loss.p_target",
                           "hamjepa_loss.w_budget"]
    assert space["predictor.steps"].ends() == (1, 4) and space["predictor.dt"].kind == "loguniform"
    space.check(profile("quick"))


@pytest.mark.parametrize("mapping,words", [
    ({"predictor.stepz": "int(1, 4)"}, "unknown config key 'predictor.stepz'; did you mean 'steps'?"),
    ({"predictor.dt": "uniform(0.2, 0.1)"}, "is an empty range"),
    ({"predictor.steps": "int(4, 1)"}, "is an empty range"),
    ({"predictor.dt": "loguniform(0, 0.1)"}, "needs LOW > 0"),
    ({"method": "uniform(0, 1)"}, "draws real numbers, but the field is str"),
    ({"encoder.split": "int(0, 1)"}, "draws integers, but the field is bool"),
    ({"predictor.steps": "uniform(1, 4)"}, "use int(LOW, HIGH) for an integer field"),
    ({"predictor.dt": "uniform(-1, 0.1)"}, "reaches -1.0, which the config refuses"),
    ({"predictor.steps": "choice(1, 0)"}, "reaches 0, which the config refuses"),
    ({"predictor.dt": "normal(0, 1)"}, "is not a distribution"),
    ({"predictor.dt": 0.05}, "is not a distribution"),
    ({"predictor.steps": "int(1, 4, 0)"}, "the step must be >= 1"),
    ({"predictor.steps": "int(1.5, 4)"}, "needs whole numbers"),
    ({"predictor.steps": "choice()"}, "an empty choice"),
    ({"predictor.steps": "choice(1, 1)"}, "lists a value twice"),
    ({"predictor": "choice(1, 2)"}, "is a section"),
    ({}, "must be a mapping of dotted config keys"),
])
def test_a_bad_space_is_refused_in_one_sentence(mapping, words):
    with pytest.raises(SpaceError) as refused:
        SearchSpace.from_mapping(mapping, "space.yaml").check(Config())
    message = str(refused.value)
    assert words in message and message.startswith("space.yaml") and "\n" not in message


def test_freeze_and_search_change_the_space():
    space = SearchSpace.from_mapping(EVERY_KIND)
    changed = space.frozen(["predictor.dt"]).searching(["predictor.steps=int(1, 3)",
                                                        "predictor.hidden_dim=choice(128, 256)"])
    assert list(changed) == ["predictor.steps", "hamjepa_loss.logdet_floor", "sigreg.num_directions",
                             "predictor.hidden_dim"]
    assert changed["predictor.steps"].ends() == (1, 3) and changed["predictor.hidden_dim"].choices == (128, 256)
    assert list(space) == list(EVERY_KIND)  # a space is a value: changing it makes a new one
    with pytest.raises(SpaceError, match="--freeze predictor.hidden_dim: 'predictor.hidden_dim' is not searched"):
        space.frozen(["predictor.hidden_dim"])
    with pytest.raises(SpaceError, match="write KEY=DIST"):
        space.searching(["predictor.dt"])
    with pytest.raises(SpaceError, match="searches nothing"):
        SearchSpace.from_mapping({"predictor.dt": "uniform(0.01, 0.1)"}).frozen(["predictor.dt"]).check(Config())


def test_set_on_a_searched_key_is_refused_naming_freeze():
    space = SearchSpace.from_mapping(EVERY_KIND)
    space.refuse_overrides(["predictor.hidden_dim"])  # not searched: a fixed value for every trial
    with pytest.raises(SpaceError, match=r"--freeze predictor.dt --set predictor.dt=VALUE"):
        space.refuse_overrides(["predictor.dt"])


@pytest.mark.parametrize("text,words", [
    ("predictor.dt: uniform(0.1, 0.2)\npredictor.dt: uniform(0.1, 0.3)\n", "written twice"),
    ("predictor.dt: [unclosed\n", "is not valid YAML"),
    ("- predictor.dt\n", "must be a mapping"),
])
def test_a_bad_space_file_is_refused_naming_the_file(text, words, tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError, match=words) as refused:
        SearchSpace.from_file(path)
    assert str(path) in str(refused.value)
    with pytest.raises(SpaceError, match="does not exist"):
        SearchSpace.from_file(tmp_path / "missing.yaml")


def _study_settings_and_space(argv, tmp_path, monkeypatch):
    """What a study's command line would run (Ray and the study itself replaced)."""
    from hamjepa import cli

    monkeypatch.setattr("hamjepa.train.launch.connect_ray", lambda address, **console: None)
    captured = {}
    monkeypatch.setattr("hamjepa.study.runner.run_study",
                        lambda settings, space, points: captured.update(settings=settings, space=space))
    monkeypatch.setattr(cli, "_print_result", lambda settings, result: 0)
    argv = [*argv, "--storage-path", str(tmp_path), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    assert study_main("energy_budget", STUDY_FILE, argv) == 0
    return captured["settings"], captured["space"]


def test_the_command_line_reads_space_freeze_search_and_objective(tmp_path, monkeypatch):
    own = tmp_path / "mine.yaml"
    own.write_text("predictor.dt: loguniform(0.02, 0.1)\npredictor.steps: int(1, 3)\n")
    settings, space = _study_settings_and_space(
        ["--space", str(own), "--freeze", "predictor.steps", "--search", "predictor.hidden_dim=choice(64, 128)",
         "--set", "predictor.steps=3", "--objective", "val_linprobe_top1", "--no-early-stopping"],
        tmp_path, monkeypatch)
    assert space.text() == "predictor.dt=loguniform(0.02, 0.1); predictor.hidden_dim=choice(64, 128)"
    assert settings.base.predictor.steps == 3 and settings.objective == "val_linprobe_top1"
    settings, space = _study_settings_and_space([], tmp_path, monkeypatch)
    assert space == SearchSpace.from_file(STUDY_FILE) and settings.objective == "val_knn20_top1"


@pytest.mark.parametrize("argv,words", [
    (["--set", "predictor.dt=0.1"], "--set predictor.dt: 'predictor.dt' is searched"),
    (["--search", "predictor.dt=uniform(0.3, 0.1)"], "--search predictor.dt: 'predictor.dt'"),
    (["--freeze", "predictor.hidden_dim"], "is not searched"),
    (["--space", "/nonexistent.yaml"], "search space file '/nonexistent.yaml' does not exist"),
    (["--objective", "test_knn20_top1"], "--objective = 'test_knn20_top1' is invalid"),
    (["--objective", "val_linprobe_top1"], "add --no-early-stopping"),
])
def test_bad_search_flags_are_one_sentence_before_any_work(argv, words, tmp_path):
    """In a fresh process: the refusal, exit 2, one line, and neither Ray nor MLflow loaded."""
    probe = ("import sys; from hamjepa.cli import study_main; code = study_main('energy_budget', sys.argv[1], "
             "sys.argv[2:]); heavy = [m for m in ('ray', 'mlflow') if m in sys.modules]; "
             "assert not heavy, heavy; sys.exit(code)")
    argv = [*argv, "--storage-path", str(tmp_path), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    done = subprocess.run([sys.executable, "-c", probe, str(STUDY_FILE), *argv], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert words in done.stderr and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "m.db").exists()


def test_the_python_api_refuses_bad_input_when_the_study_is_made(tmp_path):
    """hamjepa.Study checks like the command line, in the same words, before Ray or MLflow start."""
    from hamjepa import Study
    from hamjepa.errors import UserError

    where = {"tracking_uri": f"sqlite:///{tmp_path}/m.db", "storage_path": str(tmp_path / "ray")}
    with pytest.raises(UserError, match="Study option 'num_sample' is unknown; did you mean 'num_samples'?"):
        Study("s", profile("quick"), STUDY_FILE, num_sample=2, **where)
    with pytest.raises(SpaceError, match="the search space: 'predictor.stepz': unknown config key"):
        Study("s", profile("quick"), {"predictor.stepz": "int(1, 4)"}, **where)
    with pytest.raises(UserError, match="--num-samples = 0 is invalid"):
        Study("s", profile("quick"), STUDY_FILE, num_samples=0, **where)
    with pytest.raises(UserError, match="needs a search space"):
        Study("s", profile("quick"), **where)
    study = Study("s", profile("quick"), STUDY_FILE, num_samples=2, objective="val_knn20_top1", **where)
    assert study.space == SearchSpace.from_file(STUDY_FILE) and study.settings.num_samples == 2
    assert not (tmp_path / "m.db").exists()  # nothing created
