"""Command lines: bad input is one sentence on stderr before any work (no Ray, no traceback)."""

from pathlib import Path

import pytest
import yaml

from hamjepa.cli import main, study_main
from hamjepa.errors import UserError
from hamjepa.study.space import SearchSpace

SPACE = SearchSpace.from_mapping({"predictor.dt": "loguniform(0.01, 0.2)"})


@pytest.mark.parametrize("argv,words", [
    (["train", "--set", "predictor.dt=-1"], "'predictor.dt'"),
    (["train", "--profile", "quick", "--workers", "3", "--cpus-per-worker", "0.5"], "divide evenly among 3 workers"),
    (["train", "--set", "predictor.steps"], "dotted.key=value"),
    (["train", "--config", "/nonexistent.yaml"], "does not exist"),
    (["train", "--profile", "quick", "--tracking-uri", "sqlite:////nonexistent/dir/mlflow.db"], "not writable"),
])
def test_train_refuses_bad_input_in_one_sentence(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and err.count("\n") == 0 and "Traceback" not in err


@pytest.mark.parametrize("argv,words", [
    (["--num-samples", "0"], "--num-samples = 0"),
    (["--seeds", "-2"], "--seeds = -2"),
    (["--set", "data.val_size=0"], "data.val_size"),
    (["--workers", "0"], "--workers"),
    (["--dataset", "cifar100", "--set", "data.download=false", "--data-root", "/nonexistent"], "cifar100"),
])
def test_study_refuses_bad_input_in_one_sentence(argv, words, capsys, tmp_path):
    argv = [*argv, "--storage-path", str(tmp_path), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    assert study_main("energy_budget", SPACE, argv) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and err.count("\n") == 0


def test_resume_without_an_earlier_study_is_one_sentence(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("hamjepa.train.launch.connect_ray", lambda address, **console: None)  # fails before Ray matters
    argv = ["--resume", "--smoke-test", "--storage-path", str(tmp_path), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    assert study_main("energy_budget", SPACE, argv) == 2
    assert "--resume found no earlier run" in capsys.readouterr().err


def test_config_command_prints_the_resolved_yaml(capsys):
    assert main(["config", "--profile", "quick", "--set", "predictor.steps=3"]) == 0
    tree = yaml.safe_load(capsys.readouterr().out)
    assert tree["predictor"]["steps"] == 3 and tree["data"]["dataset"] == "fashion_mnist"


def _settings_of(argv, tmp_path, monkeypatch):
    """The StudySettings a study's command line builds (Ray and the study itself replaced)."""
    from hamjepa import cli

    monkeypatch.setattr("hamjepa.train.launch.connect_ray", lambda address, **console: None)
    monkeypatch.setattr("hamjepa.checks.local_gpus", lambda: 1)  # a local Ray on a machine with one GPU
    monkeypatch.setattr("hamjepa.checks.cuda_devices", lambda: 1)  # ... that torch sees
    captured = {}
    monkeypatch.setattr("hamjepa.study.runner.run_study",
                        lambda settings, space, points: captured.setdefault("s", settings))
    monkeypatch.setattr(cli, "_print_result", lambda settings, result: 0)
    argv = [*argv, "--storage-path", str(tmp_path), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    assert study_main("energy_budget", SPACE, argv) == 0
    return captured["s"]


@pytest.mark.parametrize("argv,seeds", [([], 3), (["--gpus-per-worker", "1"], 3), (["--seeds", "4"], 4),
                                        (["--smoke-test"], 2)])
def test_paired_seeds_default_to_at_least_three_on_gpus(argv, seeds, tmp_path, monkeypatch):
    settings = _settings_of(argv, tmp_path, monkeypatch)
    assert settings.seeds == seeds
    assert settings.paired_seeds == list(range(1, seeds + 1))  # fresh: never the search's seed 0


@pytest.mark.parametrize("argv,tuned", [([], False), (["--gpus-per-worker", "1"], True), (["--tune-baseline"], True),
                                        (["--gpus-per-worker", "1", "--no-tune-baseline"], False)])
def test_the_baseline_is_tuned_alike_by_default_on_gpus_only(argv, tuned, tmp_path, monkeypatch):
    settings = _settings_of(argv, tmp_path, monkeypatch)
    assert settings.tune_baseline is tuned
    assert settings.tuning.startswith("Tuning: HamJEPA and SIGReg each tuned" if tuned else "Tuning: HamJEPA tuned")
    assert settings.baseline().base.method == "sigreg" and settings.baseline().base.seed == settings.base.seed


def test_the_primary_metric_is_declared_on_the_command_line_and_checked(tmp_path, monkeypatch):
    assert _settings_of([], tmp_path, monkeypatch).primary_metric == "test_knn20_top1"
    (tmp_path / "b").mkdir()
    declared = _settings_of(["--primary", "test_linprobe_top1"], tmp_path / "b", monkeypatch)
    assert declared.primary_metric == "test_linprobe_top1"


@pytest.mark.parametrize("argv", [
    ["train", "--set", "predictor.stepz=1"],
    ["train", "--cpus-per-worker", "nan"],
    ["train", "--name", "it's"],
    ["train", "--profile", "quick", "--storage-path", "ftp://bucket"],
    ["train", "--profile", "quick", "--gpus-per-worker", "1", "--workers", "64"],
])
def test_train_refuses_a_typo_without_loading_torch_ray_or_mlflow(argv):
    """`hamjepa train` fails on a bad flag or key as fast as `hamjepa config`: before any heavy import."""
    import subprocess
    import sys

    probe = ("import sys; from hamjepa.cli import main; code = main(sys.argv[1:]); "
             "heavy = [m for m in ('torch', 'ray', 'mlflow', 'optuna') if m in sys.modules]; "
             "assert not heavy, heavy; sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("hamjepa: error: ") and done.stderr.count("\n") == 1


def test_resume_takes_an_optional_study_id(tmp_path, monkeypatch):
    """--resume alone continues the latest invocation; --resume ID a given one; without it, a new study."""
    from hamjepa import cli

    seen = []
    monkeypatch.setattr(cli, "_study_settings", lambda name, args, base, **fields: seen.append(args.resume) or 1 / 0)
    for argv, resume in (([], ""), (["--resume"], "latest"), (["--resume", "20250101-120000-ab12"],
                                                              "20250101-120000-ab12")):
        with pytest.raises(ZeroDivisionError):
            study_main("energy_budget", SPACE, argv)
        assert seen[-1] == resume


def test_a_failed_store_backup_is_reported_where_the_study_user_looks(tmp_path, capsys):
    """On a cluster head the study's own output says when the MLflow store's last backup failed."""
    from hamjepa import cli
    from hamjepa.backup_log import record  # what cluster/mlflow_store.py writes after each backup

    status_file = tmp_path / "backup-status.log"
    assert cli._warn_about_store_backups(status_file) is None  # no status file: not a head, nothing said
    record(status_file, "backup", "ok", "backed up")
    assert cli._warn_about_store_backups(status_file) is None
    record(status_file, "backup", "FAILED", "the remote copy holds more runs")
    warning = cli._warn_about_store_backups(status_file)
    assert warning and "last backup failed" in warning and "holds more runs" in warning
    assert capsys.readouterr().err.strip() == f"warning: {warning}"


def test_version_and_bare_train_defaults(monkeypatch, capsys):
    """`hamjepa --version`; bare `hamjepa train` without a GPU trains the quick profile and says so, with one it
    trains the paper's protocol on one GPU per worker; the scale flags are the study's."""
    from hamjepa import __version__, cli

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"hamjepa {__version__}"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for gpus, profile, note in ((0, "quick", True), (1, None, False)):
        monkeypatch.setattr("hamjepa.checks.local_gpus", lambda gpus=gpus: gpus)
        args = cli.build_parser().parse_args(["train", "--epochs", "3", "--subset", "900", "--dataset", "cifar10"])
        said = cli._train_defaults(args)
        assert args.profile == profile and args.gpus_per_worker == float(gpus) and bool(said) == note
        assert cli._scale_overrides(args) == {"data.dataset": "cifar10", "data.image_size": 32,
                                              "encoder.in_channels": 3, "optim.epochs": 3, "data.subset": 900}
    args = cli.build_parser().parse_args(["train", "--data-root", "my_images"])
    assert cli._scale_overrides(args)["data.root"] == str(Path.cwd() / "my_images")  # workers run elsewhere


@pytest.mark.parametrize("address", [None, "127.0.0.1:6379"])
def test_a_ray_that_fails_to_start_is_one_sentence_saying_what_to_try(address, capsys, monkeypatch):
    """Ray's own start-up timeout is a bare Exception (measured under heavy load: a raw traceback after 90 s)."""
    import ray

    from hamjepa.train import launch

    def timed_out(**kwargs):
        raise Exception("The current node timed out during startup. This could happen because some of the Ray "
                        "processes failed to startup.\n(more lines)")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", timed_out)
    monkeypatch.setattr(launch, "_refuse_a_second_local_ray", lambda: None)
    with pytest.raises(UserError) as refused:
        launch.connect_ray(address)
    said = str(refused.value)
    assert "The current node timed out during startup" in said and "\n" not in said
    if address:
        assert said.startswith("cannot connect to Ray at address '127.0.0.1:6379'") and "--address" in said
    else:
        assert said.startswith("Ray could not start on this machine") and "load average" in said
        assert "`ray stop`" in said and "--address" in said
