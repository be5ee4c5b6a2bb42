"""Command lines: bad input is one sentence on stderr before any work (no Ray, no traceback)."""

import pytest
import yaml

from hamjepa.cli import main, study_main

SPACE = {"predictor.dt": 0.05}


@pytest.mark.parametrize("argv,words", [
    (["train", "--set", "predictor.dt=-1"], "'predictor.dt'"),
    (["train", "--profile", "quick", "--workers", "3"], "divide evenly among 3 workers"),
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
    (["--baseline-seeds", "-1"], "--seeds = -1"),  # the old name of --seeds still works
    (["--seeds", "-2"], "--seeds = -2"),
    (["--set", "data.val_fraction=0"], "data.val_fraction"),
    (["--workers-per-trial", "0"], "--workers"),
    (["--dataset", "cifar100", "--set", "data.download=false", "--data-root", "/nonexistent"], "cifar100"),
])
def test_study_refuses_bad_input_in_one_sentence(argv, words, capsys, tmp_path):
    argv = [*argv, "--storage-path", str(tmp_path), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    assert study_main("energy_budget", SPACE, argv) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and err.count("\n") == 0


def test_resume_without_an_earlier_study_is_one_sentence(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("hamjepa.run.connect_ray", lambda address: None)  # fails before Ray matters
    argv = ["--resume", "--smoke-test", "--storage-path", str(tmp_path), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    assert study_main("energy_budget", SPACE, argv) == 2
    assert "--resume found no earlier run" in capsys.readouterr().err


def test_config_command_prints_the_resolved_yaml(capsys):
    assert main(["config", "--profile", "quick", "--set", "predictor.steps=3"]) == 0
    tree = yaml.safe_load(capsys.readouterr().out)
    assert tree["predictor"]["steps"] == 3 and tree["data"]["dataset"] == "fashion_mnist"


@pytest.mark.parametrize("argv,seeds", [([], 3), (["--gpus-per-worker", "1"], 3), (["--baseline-seeds", "4"], 4),
                                        (["--smoke-test"], 2)])
def test_paired_seeds_default_to_at_least_three_on_gpus(argv, seeds, tmp_path, monkeypatch):
    from hamjepa import cli

    monkeypatch.setattr("hamjepa.run.connect_ray", lambda address: None)
    captured = {}
    monkeypatch.setattr("hamjepa.study.run_study", lambda settings, space, points: captured.setdefault("s", settings))
    monkeypatch.setattr(cli, "_print_result", lambda settings, result: 0)
    argv = [*argv, "--storage-path", str(tmp_path), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    assert study_main("energy_budget", SPACE, argv) == 0
    settings = captured["s"]
    assert settings.seeds == seeds
    assert settings.paired_seeds == list(range(1, seeds + 1))  # fresh: never the search's seed 0
