"""Evaluation: feature extraction, kNN against a brute-force reference, the linear probe, spectra."""

import math

import pytest
import torch
from torch import nn

from hamjepa.config import EvalConfig
from hamjepa.data.augment import Normalise
from hamjepa.data.sources import ImageSet
from hamjepa.evaluation.probes import (
    covariance_eigenvalues,
    effective_rank,
    extract_features,
    knn_sweep,
    knn_top1,
    linear_probe,
    majority_vote,
    participation_ratio,
    recording_probes,
    spectrum,
)

# -- features ----------------------------------------------------------------------------------------------

class StandIn(nn.Module):
    """A stand-in encoder: z = [q | p] (B, 2d) = a fixed linear map of the image; records its mode."""

    def __init__(self, in_dim: int, d: int = 4):
        super().__init__()
        self.linear = nn.Linear(in_dim, 2 * d)
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.linear(x.flatten(1))


def test_extract_features_from_images_and_tensors():
    pixels = torch.randint(0, 256, (50, 1, 6, 6), dtype=torch.uint8)
    labels = torch.arange(50) % 5
    transform = Normalise((0.5,), (0.25,))
    encoder = StandIn(36)
    expected = encoder(transform(pixels)).detach()
    encoder.modes.clear()
    encoder.train()
    from_set = extract_features(encoder, ImageSet(labels, images=pixels), transform, batch_size=16)
    assert encoder.modes == [False] * 4 and encoder.training  # eval mode while extracting, then restored
    from_tensor = extract_features(encoder, pixels, transform, batch_size=7)
    for features in (from_set, from_tensor):
        assert set(features) == {"q", "p", "qp"}
        assert torch.allclose(features["qp"], expected, atol=1e-6)
        assert torch.equal(features["q"], features["qp"][:, :4]) and torch.equal(features["p"], features["qp"][:, 4:])
        assert not features["qp"].requires_grad
    with pytest.raises(ValueError, match="transform"):
        extract_features(encoder, pixels)


# -- kNN ---------------------------------------------------------------------------------------------------

def reference_knn(train_x, train_y, test_x, test_y, k):
    """Brute force, one test point at a time: cosine similarities, k largest, vote, lowest class on ties."""
    correct = 0
    for x, y in zip(test_x, test_y):
        sims = [(torch.dot(x, t) / (x.norm() * t.norm())).item() for t in train_x]
        nearest = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = {}
        for i in nearest:
            votes[int(train_y[i])] = votes.get(int(train_y[i]), 0) + 1
        best = max(votes.values())
        correct += min(c for c, v in votes.items() if v == best) == int(y)
    return correct / len(test_y)


def data_with_ties(seed=0):
    """Random features in 5 classes; a third of the training points duplicated (same label: equal similarity)."""
    generator = torch.Generator().manual_seed(seed)
    train_x = torch.randn(60, 8, generator=generator)
    train_y = torch.randint(0, 5, (60,), generator=generator)
    train_x = torch.cat([train_x, train_x[:20], 3 * train_x[20:30]])  # exact and scaled duplicates
    train_y = torch.cat([train_y, train_y[:20], train_y[20:30]])
    test_x = torch.randn(40, 8, generator=generator)
    test_y = torch.randint(0, 5, (40,), generator=generator)
    return train_x, train_y, test_x, test_y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_knn_matches_brute_force(seed):
    train_x, train_y, test_x, test_y = data_with_ties(seed)
    ks = (1, 2, 4, 6, 20, 90)  # even k: tied votes happen
    sweep = knn_sweep(train_x, train_y, test_x, test_y, ks=ks)
    for k in ks:
        expected = reference_knn(train_x, train_y, test_x, test_y, k)
        assert sweep[k] == pytest.approx(expected)
        assert knn_top1(train_x, train_y, test_x, test_y, k=k) == pytest.approx(expected)


def test_tied_votes_go_to_the_lowest_class():
    assert majority_vote(torch.tensor([[3, 1], [1, 3], [2, 2], [4, 0]]), 5).tolist() == [1, 1, 2, 0]
    # the two nearest neighbours of the test point have classes 3 (nearest) and 1: a tie, so class 1
    train_x = torch.tensor([[1.0, 0.1], [1.0, -0.2], [-1.0, 0.0]])
    train_y = torch.tensor([3, 1, 0])
    assert knn_top1(train_x, train_y, torch.tensor([[1.0, 0.0]]), torch.tensor([1]), k=2) == 1.0
    assert knn_top1(train_x, train_y, torch.tensor([[1.0, 0.0]]), torch.tensor([3]), k=1) == 1.0


def test_knn_on_its_own_training_set_with_k_1_is_perfect():
    x = torch.randn(200, 16)
    y = torch.randint(0, 7, (200,))
    assert knn_top1(x, y, x, y, k=1) == 1.0


def test_chunking_does_not_change_the_answer():
    train_x, train_y, test_x, test_y = data_with_ties(3)
    whole = knn_sweep(train_x, train_y, test_x, test_y)
    assert set(whole) == {1, 5, 10, 20, 50}  # k beyond the 90 training points are left out
    for chunk in (1, 3, 7, 1000):
        assert knn_sweep(train_x, train_y, test_x, test_y, chunk_size=chunk) == whole
    with pytest.raises(ValueError, match="k = 91"):
        knn_top1(train_x, train_y, test_x, test_y, k=91)


# -- linear probe -------------------------------------------------------------------------------------------

def clusters(n, classes=5, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = 4 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(100))
    y = torch.randint(0, classes, (n,), generator=generator)
    return centres[y] + torch.randn(n, dim, generator=generator), y


FAST_PROBE = EvalConfig(probe_epochs=5)  # batch 256: few steps, so the tests stay fast on a busy machine


def test_linear_probe_separates_clusters():
    train_x, train_y = clusters(1000)
    test_x, test_y = clusters(500, seed=1)
    results = linear_probe(train_x, train_y, {"test": (test_x, test_y), "empty": (test_x[:0], test_y[:0])}, 5,
                           FAST_PROBE)
    top1, top5 = results["test"]
    assert top1 >= 0.95 and top5 == 1.0 and set(results) == {"test"}
    assert linear_probe(train_x, train_y, {"test": (test_x, test_y)}, 5, FAST_PROBE)["test"] == (top1, top5)


def test_linear_probe_on_random_labels_is_at_chance():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 32, generator=generator)
    y = torch.randint(0, 10, (3000,), generator=generator)
    top1, top5 = linear_probe(x[:2000], y[:2000], {"test": (x[2000:], y[2000:])}, 10, FAST_PROBE)["test"]
    assert 0.05 < top1 < 0.15 and 0.4 < top5 < 0.6  # chance: 0.1 and 0.5 (std 0.01 and 0.016)


def test_linear_probe_is_seeded_and_leaves_the_global_rng_alone():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 8, generator=generator), torch.randint(0, 4, (400,), generator=generator)
    config = EvalConfig(probe_epochs=2, probe_batch_size=100)
    state = torch.get_rng_state()
    first = linear_probe(x, y, {"train": (x, y)}, 4, config, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert linear_probe(x, y, {"train": (x, y)}, 4, config, seed=1) == first
    others = [linear_probe(x, y, {"train": (x, y)}, 4, config, seed=seed) for seed in (2, 3, 4)]
    assert any(other != first for other in others)  # other batch orders


def test_recording_probes_keeps_every_trained_probe_in_call_order_and_only_inside_the_block():
    first_x, first_y = clusters(300)
    second_x, second_y = clusters(200, seed=2)
    held_x, held_y = clusters(100, seed=3)
    linear_probe(first_x, first_y, {}, 5, FAST_PROBE)  # before the block: not recorded
    with recording_probes() as outer:
        linear_probe(first_x, first_y, {}, 5, FAST_PROBE)
        with recording_probes() as inner:
            results = linear_probe(second_x, second_y, {"train": (second_x, second_y), "val": (held_x, held_y)},
                                   5, FAST_PROBE)
    linear_probe(first_x, first_y, {}, 5, FAST_PROBE)  # after it: not recorded
    assert len(outer) == 2 and outer[0].held_out is None  # evaluated on nothing: nothing held out
    assert outer[1].held_out[0] is held_x and outer[1].held_out[1] is held_y  # the held-out split, no copies
    assert len(inner) == 1 and inner[0] is outer[1]
    with torch.no_grad():  # the recorded probe is the trained one: it reproduces the reported accuracy
        logits = inner[0].linear(inner[0].norm(second_x))
    assert (logits.argmax(1) == second_y).double().mean().item() == pytest.approx(results["train"][0])


# -- spectra ------------------------------------------------------------------------------------------------

def test_effective_rank_of_equal_and_single_eigenvalues():
    assert effective_rank(torch.ones(12)) == pytest.approx(12)
    assert participation_ratio(torch.ones(12)) == pytest.approx(12)
    assert effective_rank(torch.tensor([5.0, 0, 0])) == pytest.approx(1)
    assert effective_rank(torch.zeros(3)) == 0 and participation_ratio(torch.zeros(3)) == 0
    assert effective_rank(torch.tensor([2.0, 1, 1])) == pytest.approx(math.exp(1.5 * math.log(2)))


def test_spectrum_of_isotropic_and_low_rank_data():
    generator = torch.Generator().manual_seed(0)
    isotropic = torch.randn(5000, 32, generator=generator)
    iso = spectrum(isotropic)
    assert 31 < iso["effective_rank"] <= 32 and 30 < iso["participation_ratio"] <= 32
    basis, _ = torch.linalg.qr(torch.randn(64, 5, generator=generator))  # 5 orthonormal directions in 64-d
    low_rank = torch.randn(5000, 5, generator=generator) @ basis.T
    low = spectrum(low_rank)
    assert low["effective_rank"] == pytest.approx(5, abs=0.05)
    assert low["participation_ratio"] == pytest.approx(5, abs=0.1)
    assert spectrum(torch.randn(5000, 64, generator=generator), top=16)["effective_rank"] == pytest.approx(16, abs=0.1)


def test_covariance_eigenvalues_subsample_and_gram_route():
    x = torch.randn(300, 40)
    full = covariance_eigenvalues(x, samples=300)
    assert torch.allclose(full, torch.linalg.eigvalsh(torch.cov(x.double().T)).flip(0).clamp_min(0), atol=1e-10)
    wide = torch.randn(20, 50)  # fewer samples than dims: through the 20 x 20 Gram matrix
    eig = covariance_eigenvalues(wide)
    assert len(eig) == 20 and torch.allclose(eig[:19], torch.linalg.svdvals(wide.double() - wide.double().mean(0))[
        :19] ** 2 / 19, atol=1e-8)
    first = covariance_eigenvalues(x, samples=100, seed=1)
    assert torch.equal(first, covariance_eigenvalues(x, samples=100, seed=1))
    assert not torch.equal(first, covariance_eigenvalues(x, samples=100, seed=2))
