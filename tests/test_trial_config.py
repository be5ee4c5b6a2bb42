"""A trial's config travels as a Config: from the study's base and the trial's overrides to the workers' loop."""

import dataclasses

import pytest

from hamjepa.config import Config, ConfigError, profile
from hamjepa.resources import Resources
from hamjepa.study import CELL, config_of_trial
from hamjepa.training import make_trainer


def test_a_search_trials_values_reach_the_predictor_config():
    base = profile("quick")
    cfg = config_of_trial(base, {"predictor.dt": 0.07, "predictor.steps": 3})
    assert (cfg.predictor.dt, cfg.predictor.steps) == (0.07, 3)
    assert cfg == dataclasses.replace(base, predictor=dataclasses.replace(base.predictor, dt=0.07, steps=3))


def test_a_compare_cell_sets_its_arm_and_its_seed():
    base = profile("quick")
    cfg = config_of_trial(base, {CELL: {"arm": {"method": "sigreg"}, "seed": 7}})
    assert (cfg.method, cfg.seed, cfg.predictor) == ("sigreg", 7, base.predictor)


def test_a_bad_trial_value_is_refused_by_the_config():
    with pytest.raises(ConfigError, match="predictor.dt"):
        config_of_trial(Config(), {"predictor.dt": -1.0})


def test_the_trainer_hands_its_workers_the_config_object_itself(tmp_path):
    """No dict round trip on the way to the workers: a frozen dataclass travels through Ray as it is."""
    cfg = profile("quick")
    trainer = make_trainer(cfg, Resources(), name="no-round-trip", storage_path=str(tmp_path))
    assert trainer.train_loop_config["cfg"] is cfg


def test_resources_are_checked_once_when_made_and_against_a_batch():
    with pytest.raises(ValueError, match="--workers-per-trial"):
        Resources(0, flag="--workers-per-trial")
    with pytest.raises(ConfigError, match="divide evenly among 3 workers"):
        Resources(3).check_batch(profile("quick"))  # batch 128
    Resources(2).check_batch(profile("quick"))
    assert Resources(2, 1.0, 0.5).per_worker == {"CPU": 1.0, "GPU": 0.5}
