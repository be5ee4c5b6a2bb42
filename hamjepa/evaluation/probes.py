"""Frozen-encoder evaluation (docs/method.md §7): features, kNN, linear probe, spectra.

Every accuracy here is a fraction in [0, 1]; readouts.py reports percent (metric names: docs/design.md "MLflow layout").
Readouts of z = [q | p] (B, 2d): q = z[:, :d], p = z[:, d:], qp = z; SIGReg's full vector is its qp.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hamjepa.config import EvalConfig
from hamjepa.data.sources import ImageSet

KNN_CHUNK_BYTES = 256 * 2 ** 20  # bound on one chunk's float32 (test rows x N_train) similarity matrix


# -- features -------------------------------------------------------------------------------------------

def split_readouts(z: torch.Tensor) -> dict[str, torch.Tensor]:
    """{'q': z[:, :d], 'p': z[:, d:], 'qp': z} for z (N, 2d); views, no copies."""
    half = z.shape[1] // 2
    return {"q": z[:, :half], "p": z[:, half:], "qp": z}


def _batches(images: ImageSet | torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor] | None,
             batch_size: int) -> Iterable[torch.Tensor]:
    """Float (B, C, H, W) model inputs from an ImageSet or a uint8 tensor, through `transform`."""
    if transform is None:
        raise ValueError("uint8 images need a transform (e.g. Splits.normalise()) to become model inputs.")
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        chunk = images.load(torch.arange(start, stop)) if isinstance(images, ImageSet) else images[start:stop]
        yield transform(chunk)


@torch.no_grad()
def extract_features(encoder: nn.Module, images: ImageSet | torch.Tensor,
                     transform: Callable[[torch.Tensor], torch.Tensor] | None = None, batch_size: int = 512,
                     device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The readouts {'q', 'p', 'qp'} of every image, float32 (N, d) / (N, 2d) on the CPU.

    encoder: forward(x float (B, C, H, W)) -> z (B, 2d); run in eval mode (its mode is restored after),
    batched, without gradients, in bf16 autocast on CUDA. images: an ImageSet or a uint8 (N, C, H, W)
    tensor, cut into batches of batch_size and passed through `transform` (uint8 -> normalised float).
    """
    was_training = encoder.training
    encoder.eval()
    device = torch.device(device)
    chunks = []
    try:
        for x in _batches(images, transform, batch_size):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                chunks.append(encoder(x.to(device)).float().cpu())
    finally:
        encoder.train(was_training)
    return split_readouts(torch.cat(chunks) if chunks else torch.empty(0, 0))  # no images: empty readouts


# -- kNN ------------------------------------------------------------------------------------------------

def nearest_labels(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, k: int,
                   chunk_size: int | None = None) -> torch.Tensor:
    """Labels of the k most cosine-similar training points of every test point, (N_test, k), nearest first.

    Rows are L2-normalised, so a dot product is the cosine similarity. Test rows go in chunks of
    chunk_size (default: as many as keep one chunk's similarity matrix under KNN_CHUNK_BYTES). Equal
    similarities are ordered as torch.topk orders them.
    """
    train = F.normalize(train_x.float(), dim=1)
    test = F.normalize(test_x.float(), dim=1)
    train_y = train_y.long().to(train.device)
    rows = chunk_size or max(1, KNN_CHUNK_BYTES // (4 * len(train)))
    out = []
    for start in range(0, len(test), rows):
        similarity = test[start:start + rows].to(train.device) @ train.T  # (rows, N_train)
        out.append(train_y[similarity.topk(k, dim=1).indices].cpu())  # (rows, k)
    return torch.cat(out)


def majority_vote(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Unweighted majority vote over each row of labels (N, k) -> (N,); ties go to the lowest class index.

    argmax over the (N, classes) count matrix returns the first maximal index, i.e. the lowest tied class.
    """
    counts = torch.zeros(len(labels), num_classes, dtype=torch.long)
    counts.scatter_add_(1, labels, torch.ones_like(labels))
    return counts.argmax(dim=1)


def knn_sweep(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
              ks: Iterable[int] = (1, 5, 10, 20, 50, 100, 200), chunk_size: int | None = None) -> dict[int, float]:
    """kNN top-1 accuracy in [0, 1] for every k (up to N_train; larger k are left out), from one search.

    The max(k) nearest neighbours are found once; the k nearest are a prefix of them.
    """
    if len(train_x) == 0 or len(test_x) == 0:
        raise ValueError(f"kNN needs training and test points, got {len(train_x)} and {len(test_x)}.")
    ks = sorted({k for k in ks if 1 <= k <= len(train_x)})
    if not ks:
        return {}
    num_classes = max(int(train_y.max()), int(test_y.max())) + 1
    neighbours = nearest_labels(train_x, train_y, test_x, ks[-1], chunk_size)
    test_y = test_y.long().cpu()
    return {k: (majority_vote(neighbours[:, :k], num_classes) == test_y).double().mean().item() for k in ks}


def knn_top1(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
             k: int = 20) -> float:
    """kNN top-1 accuracy in [0, 1]: cosine similarity, unweighted majority vote of the k nearest training
    points, ties to the lowest class index. x: (N, D) features, y: (N,) integer labels."""
    if not 1 <= k <= len(train_x):
        raise ValueError(f"k = {k} is invalid: must be between 1 and the {len(train_x)} training points.")
    return knn_sweep(train_x, train_y, test_x, test_y, ks=(k,))[k]


# -- linear probe ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainedProbe:
    """A trained probe, LayerNorm(D) then Linear(D, classes), with held-out (features (N, D), labels (N,)) it was
    not fit on: the test set it was evaluated on, else the validation set; None when it had neither."""

    norm: nn.LayerNorm
    linear: nn.Linear
    held_out: tuple[torch.Tensor, torch.Tensor] | None


_probe_recorders: list[list[TrainedProbe]] = []  # one list per open recording_probes() block


@contextlib.contextmanager
def recording_probes() -> Iterator[list[TrainedProbe]]:
    """Collect every probe linear_probe trains inside the block, in call order.

    Why: the theory check (theory.py) measures the geometry of the very probes the final evaluation trains
    (readouts.final_metrics, one per readout), which report only accuracies; training them again would double
    the evaluation's cost.
    """
    recorded: list[TrainedProbe] = []
    _probe_recorders.append(recorded)
    try:
        yield recorded
    finally:
        _probe_recorders.pop()  # blocks nest, so the innermost one closes first


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor,
                 eval_sets: Mapping[str, tuple[torch.Tensor, torch.Tensor]], num_classes: int, cfg: EvalConfig,
                 seed: int = 0, device: torch.device | str = "cpu") -> dict[str, tuple[float, float]]:
    """Train LayerNorm(D) + Linear(D, classes) on cached features; {name: (top1, top5)} in [0, 1] per eval set.

    AdamW (cfg.probe_lr, cfg.probe_weight_decay), batches of cfg.probe_batch_size (the last one partial),
    cfg.probe_epochs epochs, learning rate lr * (1 + cos(pi * step / steps)) / 2 per step. The linear layer
    starts at zero and the batch order comes from a torch.Generator seeded with `seed`, so a result is
    reproducible and leaves torch's global RNG alone. Top-5 is top-min(5, classes). Inside a
    recording_probes() block the trained probe is also recorded.
    """
    generator = torch.Generator().manual_seed(seed)
    dim = train_x.shape[1]
    linear = nn.utils.skip_init(nn.Linear, dim, num_classes, device=device)  # no draw from the global RNG
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    probe = nn.Sequential(nn.LayerNorm(dim, device=device), linear)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=cfg.probe_lr, weight_decay=cfg.probe_weight_decay)
    total = cfg.probe_epochs * math.ceil(len(train_x) / cfg.probe_batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    x, y = train_x.float().to(device), train_y.long().to(device)
    for _ in range(cfg.probe_epochs):
        order = torch.randperm(len(x), generator=generator).to(device)
        for start in range(0, len(x), cfg.probe_batch_size):
            batch = order[start:start + cfg.probe_batch_size]
            loss = F.cross_entropy(probe(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    probe.eval()
    held_out = next((eval_sets[name] for name in ("test", "val") if name in eval_sets and len(eval_sets[name][0])),
                    None)
    trained = TrainedProbe(probe[0], probe[1], held_out)
    for recorder in _probe_recorders:
        recorder.append(trained)
    results = {}
    with torch.no_grad():
        for name, (features, labels) in eval_sets.items():
            if len(features) == 0:
                continue
            logits = probe(features.float().to(device)).cpu()  # (N, classes)
            top = logits.topk(min(5, num_classes), dim=1).indices  # (N, 5), best first
            hits = top == labels.long().cpu()[:, None]
            results[name] = (hits[:, 0].double().mean().item(), hits.any(dim=1).double().mean().item())
    return results


# -- spectra --------------------------------------------------------------------------------------------

def covariance_eigenvalues(x: torch.Tensor, samples: int = 5000, seed: int = 0) -> torch.Tensor:
    """Eigenvalues (descending, >= 0, float64) of the covariance of x (N, D), on a seeded subsample of rows.

    Through the smaller of the covariance (D x D) and the Gram matrix (n x n): both share the nonzero ones.
    """
    if len(x) > samples:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:samples]]
    if len(x) < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {len(x)}.")
    centred = x.double() - x.double().mean(dim=0)
    small = centred.T @ centred if centred.shape[1] <= centred.shape[0] else centred @ centred.T
    return torch.linalg.eigvalsh(small / (len(x) - 1)).flip(0).clamp_min(0)


def effective_rank(eigenvalues: torch.Tensor) -> float:
    """exp(entropy of the normalised eigenvalues): d for d equal eigenvalues, 1 for one direction, 0 for none."""
    if eigenvalues.sum() <= 0:
        return 0.0
    share = eigenvalues / eigenvalues.sum()
    share = share[share > 0]
    return math.exp(-(share * share.log()).sum().item())


def participation_ratio(eigenvalues: torch.Tensor) -> float:
    """(sum of eigenvalues)^2 / sum of squared eigenvalues: also d for d equal eigenvalues, 0 for none."""
    if eigenvalues.sum() <= 0:
        return 0.0
    return (eigenvalues.sum() ** 2 / (eigenvalues ** 2).sum()).item()


def spectrum(x: torch.Tensor, top: int = 256, samples: int = 5000, seed: int = 0) -> dict[str, float]:
    """{'effective_rank', 'participation_ratio'} over the top `top` eigenvalues of the covariance of x (N, D)."""
    eigenvalues = covariance_eigenvalues(x, samples, seed)[:top]
    return {"effective_rank": effective_rank(eigenvalues), "participation_ratio": participation_ratio(eigenvalues)}
