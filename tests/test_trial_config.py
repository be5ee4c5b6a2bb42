"""A trial's config travels as a Config: from the study's base and the trial's overrides to the workers' loop."""

import dataclasses

import pytest

from hamjepa.config import Config, ConfigError, profile
from hamjepa.study.settings import CELL, config_of_trial
from hamjepa.train.loop import make_trainer
from hamjepa.train.resources import Resources


def test_a_search_trials_values_reach_the_predictor_config():
    base = profile("quick")
    cfg = config_of_trial(base, {"predictor.dt": 0.07, "predictor.steps": 3})
    assert (cfg.predictor.dt, cfg.predictor.steps) == (0.07, 3)
    # and nothing else changes but epoch 0's readouts, which every search trial shares (the base seed's encoder)
    assert cfg == dataclasses.replace(base, predictor=dataclasses.replace(base.predictor, dt=0.07, steps=3),
                                      eval=dataclasses.replace(base.eval, initial_readouts=False))


def test_a_compare_cell_sets_its_arm_and_its_seed():
    base = profile("quick")
    cfg = config_of_trial(base, {CELL: {"arm": {"method": "sigreg"}, "seed": 7}})
    assert (cfg.method, cfg.seed, cfg.predictor) == ("sigreg", 7, base.predictor)
    # the compare phase measures its objective at the start and the end only; a search trial after every epoch
    assert not cfg.eval.objective_every_epoch and config_of_trial(base, {}).eval.objective_every_epoch


def test_a_bad_trial_value_is_refused_by_the_config():
    with pytest.raises(ConfigError, match="predictor.dt"):
        config_of_trial(Config(), {"predictor.dt": -1.0})


def test_the_trainer_hands_its_workers_the_config_object_itself(tmp_path):
    """No dict round trip on the way to the workers: a frozen dataclass travels through Ray as it is."""
    cfg = profile("quick")
    trainer = make_trainer(cfg, Resources(), name="no-round-trip", storage_path=str(tmp_path))
    assert trainer.train_loop_config["cfg"] is cfg


def test_resources_are_checked_once_when_made_and_against_a_batch():
    with pytest.raises(ValueError, match="--workers"):
        Resources(0, flag="--workers")
    with pytest.raises(ConfigError, match="divide evenly among 3 workers"):
        Resources(3).check_batch(profile("quick"))  # batch 128
    Resources(2).check_batch(profile("quick"))
    assert Resources(2, 1.0, 0.5).per_worker == {"CPU": 1.0, "GPU": 0.5}


def test_a_trial_whose_batch_does_not_split_among_its_workers_fails_before_training(tmp_path):
    """The study's base batch was checked before Ray; a searched optim.batch_size is checked in its trial's driver."""
    from hamjepa.study.driver import trial_driver

    with pytest.raises(ConfigError, match="must divide evenly among 3 workers"):
        trial_driver({"optim.batch_size": 128}, base=profile("quick").override({"optim.batch_size": 96}),
                     resources=Resources(3), storage_path=str(tmp_path), study_id="batch",
                     objective="val_knn20_top1", tracking_uri=f"sqlite:///{tmp_path}/m.db", experiment="x")
    assert not any(tmp_path.iterdir())  # nothing started


def test_the_config_survives_rays_serialisation():
    import ray.cloudpickle

    cfg = profile("quick").override({"predictor.dt": 0.07})
    assert ray.cloudpickle.loads(ray.cloudpickle.dumps({"cfg": cfg}))["cfg"] == cfg


def test_drivers_use_the_custom_resource_where_offered_and_memory_elsewhere():
    """A cluster without `trial_driver` (any `ray start --head`) still runs a study: drivers hold a slice of memory,
    which leaves every CPU to the workers, so as many trials run at once as with the resource."""
    from hamjepa.study.phases import cluster_concurrency, driver_resources
    from hamjepa.study.settings import StudySettings
    from hamjepa.train.launch import DRIVER_MEMORY_BYTES, DRIVER_RESOURCE

    assert driver_resources({"CPU": 2.0, DRIVER_RESOURCE: 1000.0}) == {DRIVER_RESOURCE: 1}
    assert driver_resources({"CPU": 2.0, "memory": 8e9}) == {"memory": DRIVER_MEMORY_BYTES}
    settings = StudySettings(name="s", base=profile("quick"))
    assert cluster_concurrency(settings, {"CPU": 2.0, "memory": 8e9}) == 2
    assert cluster_concurrency(settings, {"CPU": 2.0, DRIVER_RESOURCE: 1000.0}) == 2


def test_ray_address_comes_from_the_flag_else_the_environment(monkeypatch):
    from hamjepa import checks
    from hamjepa.errors import UserError

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert checks.ray_address(None) == "10.0.0.1:6379"  # what `ray job submit` sets for its job
    assert checks.ray_address("auto") == "auto"  # the flag wins
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # the dashboard's, meant for `ray job submit`
    with pytest.raises(UserError, match=r"^\$RAY_ADDRESS = 'http://127.0.0.1:8265' is invalid"):
        checks.ray_address(None)
    monkeypatch.delenv("RAY_ADDRESS")
    assert checks.ray_address(None) is None  # a local Ray
