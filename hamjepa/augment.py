"""The two-view augmentation pipeline (METHOD.md 6) and the evaluation transform.

Transforms run per sample, on one uint8 (C, H, W) image in a DataLoader worker, so every image and every
view draws its own crop, flip, jitter, blur and solarisation (torchvision v2 applied to a *batch* would
draw one crop for the whole batch).

One-channel images (Fashion-MNIST): colour jitter keeps brightness and contrast, the two factors that
exist without colour; saturation and hue are dropped, and random grayscale is a no-op and is skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2

from .config import AugmentConfig


def two_view_transform(cfg: AugmentConfig, image_size: int, channels: int, mean: Sequence[float],
                       std: Sequence[float]) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (C, H, W) -> one random view, float32 (C, image_size, image_size), normalised."""
    colour = channels == 3
    jitter = (v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue) if colour
              else v2.ColorJitter(cfg.brightness, cfg.contrast))
    steps = [
        v2.RandomResizedCrop(image_size, scale=(cfg.crop_scale_min, cfg.crop_scale_max), antialias=True),
        v2.RandomHorizontalFlip(cfg.flip_p),
        v2.RandomApply([jitter], p=cfg.jitter_p),
    ]
    if colour:
        steps.append(v2.RandomGrayscale(cfg.grayscale_p))
    steps += [
        v2.RandomApply([v2.GaussianBlur(cfg.blur_kernel, sigma=(cfg.blur_sigma_min, cfg.blur_sigma_max))],
                       p=cfg.blur_p),
        v2.RandomSolarize(cfg.solarize_threshold, p=cfg.solarize_p),  # threshold on the uint8 scale
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ]
    return v2.Compose(steps)


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> Callable[[torch.Tensor],
                                                                                            torch.Tensor]:
    """uint8 (C, H, W) -> float32 (C, image_size, image_size), normalised; deterministic."""
    return v2.Compose([
        v2.Resize(image_size, antialias=True),
        v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])
