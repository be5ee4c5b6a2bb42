"""Frozen-encoder evaluation (METHOD.md 7): features, kNN, linear probe, spectra.

Accuracies here are fractions in [0, 1]; reports convert to percent.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .config import EvalConfig
from .data import ImageSet, LabelledDataset

# Bound on one chunk's (test x train) similarity matrix: 64 Mi floats = 256 MB.
_KNN_CHUNK_ELEMENTS = 64 * 2 ** 20


def _normalised_batches(images: ImageSet, mean, std, image_size: int, batch_size: int):
    """Float (B, C, H, W) batches of the un-augmented, normalised images.

    In-memory images of the right size are normalised as whole batches (no per-image transform, which
    would dominate a CPU evaluation); others (files, other sizes) go through eval_transform per image.
    """
    if images.images is not None and images.images.shape[-1] == image_size == images.images.shape[-2]:
        mean_t = torch.tensor(mean).view(1, -1, 1, 1)
        std_t = torch.tensor(std).view(1, -1, 1, 1)
        for start in range(0, len(images), batch_size):
            yield (images.images[start:start + batch_size].float() / 255 - mean_t) / std_t
        return
    from .augment import eval_transform

    loader = DataLoader(LabelledDataset(images, eval_transform(image_size, mean, std)), batch_size=batch_size)
    for x, _ in loader:
        yield x


@torch.no_grad()
def extract_features(encoder: nn.Module, images: ImageSet, mean, std, image_size: int, batch_size: int = 512,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """z of every image, (N, D) float32 on the CPU, from the encoder in eval mode (its mode is restored)."""
    was_training = encoder.training
    encoder.eval()
    device = torch.device(device)
    chunks = []
    for x in _normalised_batches(images, mean, std, image_size, batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            chunks.append(encoder(x.to(device)).float().cpu())
    encoder.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


def readout(z: torch.Tensor, name: str) -> torch.Tensor:
    """q (first half), p (second half) or qp (all) of z = [q | p]."""
    half = z.shape[1] // 2
    return {"q": z[:, :half], "p": z[:, half:], "qp": z}[name]


def _neighbour_labels(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, k: int,
                      chunk: int | None = None) -> torch.Tensor:
    """Labels of the k most cosine-similar training points of every test point, (N_test, k)."""
    train = F.normalize(train_x.float(), dim=1)
    test = F.normalize(test_x.float(), dim=1)
    chunk = chunk or max(1, _KNN_CHUNK_ELEMENTS // max(1, len(train)))
    out = []
    for start in range(0, len(test), chunk):
        similarity = test[start:start + chunk] @ train.T  # (chunk, N_train)
        out.append(train_y[similarity.topk(k, dim=1).indices])
    return torch.cat(out)


def _vote(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Unweighted majority vote over the rows of labels (N, k); ties go to the lowest class index."""
    counts = torch.zeros(len(labels), num_classes, dtype=torch.long)
    counts.scatter_add_(1, labels, torch.ones_like(labels))
    return counts.argmax(dim=1)  # argmax returns the first maximum: the lowest tied class


def knn_top1(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
             k: int = 20) -> float:
    """kNN top-1 accuracy in [0, 1]: cosine similarity, unweighted majority vote of the k nearest."""
    return knn_sweep(train_x, train_y, test_x, test_y, ks=(k,))[k]


def knn_sweep(train_x, train_y, test_x, test_y, ks=(1, 5, 10, 20, 50, 100, 200),
              chunk: int | None = None) -> dict[int, float]:
    """kNN top-1 for several k from one neighbour search (the max(k) nearest, sorted by similarity)."""
    ks = [k for k in ks if k <= len(train_x)]
    if not ks or len(test_x) == 0:
        return {}
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    neighbours = _neighbour_labels(train_x, train_y.long(), test_x, max(ks), chunk)
    return {k: (_vote(neighbours[:, :k], num_classes) == test_y).float().mean().item() for k in ks}


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, eval_sets: dict[str, tuple[torch.Tensor,
                 torch.Tensor]], num_classes: int, cfg: EvalConfig, seed: int = 0,
                 device: torch.device | str = "cpu") -> dict[str, tuple[float, float]]:
    """LayerNorm + Linear on cached features; AdamW, cosine decay per step. {name: (top1, top5)} in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    torch_state = torch.get_rng_state()
    torch.manual_seed(seed)  # the probe's initial weights
    probe = nn.Sequential(nn.LayerNorm(train_x.shape[1]), nn.Linear(train_x.shape[1], num_classes)).to(device)
    torch.set_rng_state(torch_state)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=cfg.probe_lr, weight_decay=cfg.probe_weight_decay)
    steps_per_epoch = math.ceil(len(train_x) / cfg.probe_batch_size)
    total = cfg.probe_epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    x, y = train_x.to(device), train_y.long().to(device)
    for _ in range(cfg.probe_epochs):
        order = torch.randperm(len(x), generator=generator).to(device)
        for start in range(0, len(x), cfg.probe_batch_size):
            batch = order[start:start + cfg.probe_batch_size]
            loss = F.cross_entropy(probe(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    results = {}
    probe.eval()
    with torch.no_grad():
        for name, (ex, ey) in eval_sets.items():
            if len(ex) == 0:
                continue
            logits = probe(ex.to(device)).cpu()
            top5 = logits.topk(min(5, num_classes), dim=1).indices
            ey = ey.long()
            results[name] = ((top5[:, 0] == ey).float().mean().item(), (top5 == ey[:, None]).any(1).float().mean().item())
    return results


def spectrum(x: torch.Tensor, top: int = 256, samples: int = 5000, seed: int = 0) -> tuple[float, float]:
    """(effective rank, participation ratio) of the top eigenvalues of the feature covariance.

    Effective rank = exp(entropy of the normalised eigenvalues); PR = (sum l)^2 / sum l^2.
    """
    generator = torch.Generator().manual_seed(seed)
    if len(x) > samples:
        x = x[torch.randperm(len(x), generator=generator)[:samples]]
    x = x.double() - x.double().mean(0)
    eig = torch.linalg.eigvalsh(x.T @ x / max(1, len(x) - 1)).flip(0)[:top].clamp_min(0)
    p = eig / eig.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return math.exp(entropy.item()), (eig.sum() ** 2 / (eig ** 2).sum()).item()
