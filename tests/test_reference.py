"""The initialisation reference: untrained encoders, evaluated as a run's epoch 0, read by every compared method."""

import pytest

from hamjepa.config import SMOKE_OVERRIDES, profile
from hamjepa.config.sections import MAX_SEED
from hamjepa.errors import UserError
from hamjepa.study.settings import StudySettings
from hamjepa.train.loop import build_worker, initial_readouts
from hamjepa.train.reference import initialisation_readouts, reference_seeds


def _cfg(**overrides):
    return profile("quick", {**SMOKE_OVERRIDES, "data.dataset": "synthetic", "data.subset": 180,
                             "data.val_size": 60, "optim.batch_size": 32, "eval.probe_epochs": 1, **overrides})


def test_reference_seeds_count_down_from_the_largest_so_no_study_trains_on_them():
    assert reference_seeds(3) == [MAX_SEED, MAX_SEED - 1, MAX_SEED - 2]
    settings = StudySettings(name="s", base=_cfg(), seeds=10)
    assert not set(reference_seeds(10)) & {*settings.paired_seeds, settings.base.seed}


def test_a_reference_encoder_is_the_encoder_a_run_of_its_seed_starts_from_and_scores_as_its_epoch_0():
    cfg = _cfg(seed=5)
    got = initialisation_readouts(cfg, [5], ["hamjepa", "sigreg"])
    worker = build_worker(cfg, 0, 1, "cpu")
    epoch0 = initial_readouts(worker.model, worker.splits, cfg, "cpu")
    for name in ("test_knn20_top1", "test_linprobe_top1", "val_knn20_top1", "test_knn20_top1_p"):
        assert got["hamjepa"][0][name] == pytest.approx(epoch0[f"init/{name}"], abs=1e-9)


def test_without_initial_readouts_epoch_0_is_the_objective_alone_and_the_same_number():
    """Search trials (eval.initial_readouts off) measure only what Tune needs at epoch 0, and measure it alike."""
    full_cfg, objective_cfg = _cfg(seed=5), _cfg(seed=5, **{"eval.initial_readouts": False})
    worker = build_worker(full_cfg, 0, 1, "cpu")
    full = initial_readouts(worker.model, worker.splits, full_cfg, "cpu")
    alone = initial_readouts(worker.model, worker.splits, objective_cfg, "cpu")
    assert list(alone) == ["val_knn20_top1"] and "init/test_knn20_top1" in full
    # one feature pass of the whole training split vs one of the reference set: the same features up to
    # batching, so the same kNN votes
    assert alone["val_knn20_top1"] == pytest.approx(full["val_knn20_top1"], abs=1e-9)


def test_one_feature_pass_is_read_by_each_method_its_own_way():
    """SIGReg reads the whole state (qp): its unsuffixed numbers are HamJEPA's qp numbers of the same encoders;
    HamJEPA's unsuffixed ones are its q readout's. Different seeds give different encoders."""
    got = initialisation_readouts(_cfg(), reference_seeds(2), ["hamjepa", "sigreg"])
    assert len(got["hamjepa"]) == len(got["sigreg"]) == 2
    for h, s in zip(got["hamjepa"], got["sigreg"], strict=True):
        assert s["test_knn20_top1"] == h["test_knn20_top1_qp"] and h["test_knn20_top1"] == h["test_knn20_top1_q"]
        assert s["test_linprobe_top1"] == h["test_linprobe_top1_qp"]
        assert s["test_knn20_top1_q"] == h["test_knn20_top1_q"]  # the same features, read alike
    first, second = got["hamjepa"]
    assert first != second


@pytest.mark.parametrize("n", [-1, 1])
def test_a_reference_of_one_or_fewer_encoders_is_refused(n):
    with pytest.raises(UserError, match="--reference"):
        StudySettings(name="s", base=_cfg(), reference=n)
