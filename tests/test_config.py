"""The config tree: defaults, YAML round trip, overrides, one-sentence errors."""

import pytest
import yaml

from hamjepa.config import PROFILES, Config, build_config, profile


def load_yaml(path):
    return build_config(config_file=path)


def test_defaults_are_the_papers():
    cfg = Config()
    assert (cfg.predictor.steps, cfg.predictor.dt, cfg.predictor.hidden_dim, cfg.predictor.depth) == (2, 0.05, 256, 2)
    assert (cfg.predictor.residual_scale, cfg.predictor.base_coeff) == (0.02, 0.1)
    assert (cfg.hamjepa_loss.p_weight, cfg.hamjepa_loss.std_floor, cfg.hamjepa_loss.logdet_floor) == (0.2, 0.2, -1.5)
    assert (cfg.hamjepa_loss.pr_floor_q, cfg.hamjepa_loss.pr_floor_p) == (0.12, 0.16)
    assert (cfg.hamjepa_loss.eigmax_ceiling_q, cfg.hamjepa_loss.eigmax_ceiling_p) == (0.35, 0.30)
    loss = cfg.hamjepa_loss
    weights = (loss.w_pred, loss.w_budget, loss.w_var, loss.w_spectral, loss.w_mean)
    assert weights == (1.0, 0.2, 0.5, 0.5, 0.05)
    assert (cfg.sigreg.num_directions, cfg.sigreg.t_max, cfg.sigreg.n_points, cfg.sigreg.weight) == (64, 3.0, 9, 0.02)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.batch_size, cfg.optim.epochs) == (5e-4, 5e-4, 512, 30)
    assert cfg.encoder.token_dim == 32 and cfg.encoder.readout == "layer3"


def test_yaml_round_trip_and_flatten(tmp_path):
    cfg = profile("quick", {"predictor.steps": 3})
    path = tmp_path / "cfg.yaml"
    path.write_text(cfg.to_yaml())
    assert load_yaml(path) == cfg.resolved()  # a saved config is explicit: what the run applied
    flat = cfg.flatten()
    assert flat["predictor.steps"] == 3 and flat["data.dataset"] == "fashion_mnist"
    assert all("." in key for key in flat if key not in ("method", "seed"))


def test_partial_yaml_keeps_defaults(tmp_path):
    path = tmp_path / "partial.yaml"
    path.write_text("predictor:\n  dt: 0.1\nmethod: sigreg\n")
    cfg = load_yaml(path)
    assert cfg.predictor.dt == 0.1 and cfg.method == "sigreg" and cfg.predictor.steps == 2


def test_string_overrides_are_parsed_and_typed():
    cfg = Config().override({"predictor.steps": "3", "predictor.dt": "0.1", "encoder.split": "true", "optim.lr": 1,
                             "optim.weight_decay": "2e-3"})
    assert cfg.predictor.steps == 3 and cfg.predictor.dt == 0.1 and cfg.optim.lr == 1.0
    assert cfg.optim.weight_decay == 0.002  # YAML 1.1 reads 2e-3 as a string; the float field accepts it
    assert isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize("overrides,field", [
    ({"encoder.token_dim": 31}, "encoder.token_dim"),
    ({"predictor.dt": 0}, "predictor.dt"),
    ({"predictor.dt": -0.1}, "predictor.dt"),
    ({"predictor.steps": 0}, "predictor.steps"),
    ({"hamjepa_loss.std_floor": -1}, "hamjepa_loss.std_floor"),
    ({"hamjepa_loss.w_budget": -0.2}, "hamjepa_loss.w_budget"),
    ({"sigreg.weight": -1}, "sigreg.weight"),
    ({"method": "byol"}, "method"),
    ({"data.dataset": "mnist"}, "data.dataset"),
    ({"predictor.steps": "two"}, "predictor.steps"),
    ({"predictor.stepz": 3}, "predictor.stepz"),
    ({"predictorr.steps": 3}, "predictorr"),
    ({"encoder.in_channels": 1}, "encoder.in_channels"),  # CIFAR-100 has 3 channels
    ({"optim.grad_clip": -1}, "optim.grad_clip"),
    ({"optim.grad_clip": ".inf"}, "optim.grad_clip"),
    ({"predictor.dt": "inf"}, "predictor.dt"),  # YAML 1.1 reads inf as a string; float() would accept it
    ({"predictor.dt": ".nan"}, "predictor.dt"),
    ({"predictor.dt": "[1"}, "predictor.dt"),  # not YAML
    ({"optim.lr": 1e999}, "optim.lr"),
    ({"seed": 2**32}, "seed"),
    ({"data.seed": -1}, "data.seed"),
    ({"encoder.in_channels": 2}, "encoder.in_channels"),
    ({"hamjepa_loss.pr_floor_q": 1.5}, "hamjepa_loss.pr_floor_q"),
    ({"hamjepa_loss.eigmax_ceiling_p": 1.5}, "hamjepa_loss.eigmax_ceiling_p"),
    ({"hamjepa_loss.spectral_eps": 0}, "hamjepa_loss.spectral_eps"),
    ({"optim.warmup_start_ratio": 2}, "optim.warmup_start_ratio"),
    ({"augment.blur_kernel": 65}, "augment.blur_kernel"),  # reflect padding needs kernel // 2 < image_size
    ({"eval.knn_k": 6000}, "eval.knn_k"),  # more neighbours than the per-epoch kNN searches
])
def test_bad_values_name_the_field_and_what_is_valid(overrides, field):
    with pytest.raises(ValueError) as error:
        Config().override(overrides)
    message = str(error.value)
    assert f"'{field}" in message
    assert message.count("\n") == 0  # one sentence, one line


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ValueError, match="did you mean 'steps'"):
        Config().override({"predictor.stepz": 3})


def test_unknown_yaml_key_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("predictor:\n  leapfrog_steps: 3\n")
    with pytest.raises(ValueError, match="predictor.leapfrog_steps"):
        load_yaml(path)


def test_missing_config_file_is_one_sentence(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile_is_valid(name):
    assert isinstance(profile(name), Config)


def test_unknown_profile():
    with pytest.raises(ValueError, match="profile"):
        profile("laptop")


@pytest.mark.parametrize("method,applied", [("hamjepa", 1.0), ("mlp", 1.0), ("sigreg", 0.0)])
def test_gradient_clipping_follows_the_method_unless_set(method, applied):
    """docs/method.md §5: HamJEPA and MLP-HJEPA clip at 1.0, SIGReg trains unclipped; what is logged is applied."""
    cfg = profile("cifar100", {"method": method})
    assert cfg.grad_clip == applied
    assert cfg.flatten()["optim.grad_clip"] == applied
    assert f"grad_clip: {applied}" in cfg.to_yaml()
    # switching method later (a study's baseline phase) re-derives the protocol's value...
    other = "sigreg" if method != "sigreg" else "hamjepa"
    assert cfg.override({"method": other}).grad_clip == (0.0 if other == "sigreg" else 1.0)
    # ...but a user's explicit value is honoured for any method, through later overrides too
    explicit = cfg.override({"optim.grad_clip": "0.5"})
    assert explicit.grad_clip == 0.5 and explicit.override({"method": other}).grad_clip == 0.5
    assert Config().override({"optim.grad_clip": "null"}).optim.grad_clip is None


def test_hamjepa_config_cli_shows_the_applied_clip(capsys):
    from hamjepa.cli import main

    for method, shown in (("sigreg", "grad_clip: 0.0"), ("hamjepa", "grad_clip: 1.0")):
        assert main(["config", "--profile", "cifar100", "--set", f"method={method}"]) == 0
        assert shown in capsys.readouterr().out


@pytest.mark.parametrize("text,words", [
    (b"predictor:\n  dt: 0.1\npredictor:\n  steps: 3\n", "key 'predictor' is written twice (lines 1 and 3)"),
    (b"predictor:\n  dt: 0.1\n  dt: 0.2\n", "key 'dt' is written twice (lines 2 and 3)"),
    (b"predictor:\n  dt: \xff\n", "is not UTF-8 text (byte 0xff at offset 17)"),
    (b"predictor: [1\n", "is not valid YAML"),
])
def test_a_config_file_is_read_strictly(tmp_path, text, words):
    """A duplicated key or section is refused (not "the last one wins"); bytes that are not UTF-8 are one sentence."""
    path = tmp_path / "cfg.yaml"
    path.write_bytes(text)
    with pytest.raises(ValueError) as error:
        load_yaml(path)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_yaml_merge_keys_may_still_override():
    """`<<: *anchor` then an explicit key is YAML's override, not a duplicate."""

    from hamjepa.config.tree import StrictLoader

    text = "base: &b {dt: 0.1, steps: 2}\npredictor:\n  <<: *b\n  dt: 0.2\n"
    assert yaml.load(text, Loader=StrictLoader)["predictor"] == {"dt": 0.2, "steps": 2}


def test_a_renamed_section_is_unknown_with_its_new_name_suggested():
    """0.x renames without shims: an old name fails at once, pointing at the new one."""
    with pytest.raises(ValueError, match="did you mean 'hamjepa_loss'"):
        Config().override({"hamjepa.std_floor": 0.3})
    with pytest.raises(ValueError, match="did you mean 'hamjepa_loss'"):
        Config().override({"hamjepa_los.std_floor": 0.3})


def test_an_empty_config_file_is_no_overrides_and_the_bounds_themselves_are_accepted(tmp_path):
    """The accepted side of the refusals in tests/test_bad_inputs.py: an empty (or comments-only) file is YAML's
    null, no overrides, unlike `false` or `[]`; each upper bound is inclusive."""
    from hamjepa.config import build_config
    from hamjepa.config.sections import MAX_BATCH, MAX_EPOCHS, MAX_LEAPFROG_STEPS, MAX_SUBSET

    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing changed\n")
    assert build_config("quick", empty) == build_config("quick")
    at_bounds = build_config("quick", overrides={"predictor.steps": MAX_LEAPFROG_STEPS, "optim.epochs": MAX_EPOCHS,
                                                 "data.subset": MAX_SUBSET, "optim.batch_size": MAX_BATCH})
    assert (at_bounds.predictor.steps, at_bounds.optim.epochs) == (MAX_LEAPFROG_STEPS, MAX_EPOCHS)
