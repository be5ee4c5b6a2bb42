"""ResNet-18 token encoder with the phase-space split (docs/method.md §1).

Headless: the embedding is the token grid itself. A stage's feature map (layer3 by default) is optionally
average-pooled to token_hw x token_hw, mapped by a bias-free 1x1 conv to token_dim channels and batch-
normalised. In every token, channels [0, token_dim/2) are the position q and the rest the momentum p;
q and p are each flattened in (row, column, channel) order and z = [q | p].

Initialisation (docs/method.md §1) follows torchvision's ResNet-18: every convolution of the residual stages
(shortcuts included) Kaiming-normal with mode fan_out for ReLU, every BatchNorm weight 1 and bias 0, no
zero-init of a block's last BN. The CIFAR stem and the token read-out conv are fresh layers with PyTorch's
default init; the 224 px stem keeps torchvision's. The rule is per layer, so it holds at every width.

Our own ResNet rather than torchvision's, because torchvision's BasicBlock ResNet has no width multiplier
and the CPU profiles need a narrow network (width 0.25 is ~13x faster than 1.0 on 2 cores).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hamjepa.config import EncoderConfig

_STAGE_CHANNELS = (64, 128, 256, 512)
_STAGES = ("layer1", "layer2", "layer3", "layer4")


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _stem(kind: str, in_channels: int, channels: int) -> nn.Sequential:
    if kind == "cifar":  # 32 px: keep the resolution
        return nn.Sequential(nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels),
                             nn.ReLU(inplace=True))
    return nn.Sequential(nn.Conv2d(in_channels, channels, 7, 2, 3, bias=False), nn.BatchNorm2d(channels),
                         nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))


class TokenEncoder(nn.Module):
    """Images (B, C, H, W) -> z = [q | p] of shape (B, 2 * q_dim)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        widths = [max(1, round(c * cfg.width)) for c in _STAGE_CHANNELS]
        self.stem = _stem(cfg.stem, cfg.in_channels, widths[0])
        n_stages = _STAGES.index(cfg.readout) + 1  # stages after the read-out are never built
        stages, in_channels = [], widths[0]
        for i in range(n_stages):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(in_channels, widths[i], stride),
                                        BasicBlock(widths[i], widths[i], 1)))
            in_channels = widths[i]
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(cfg.token_hw) if cfg.token_hw else nn.Identity()
        self.to_tokens = nn.Conv2d(in_channels, cfg.token_dim, 1, bias=False)
        self.token_norm = nn.BatchNorm2d(cfg.token_dim)
        self._init_like_torchvision()

    def _init_like_torchvision(self) -> None:
        kaiming = [self.stages] + ([self.stem] if self.cfg.stem == "imagenet" else [])
        for module in (m for part in kaiming for m in part.modules() if isinstance(m, nn.Conv2d)):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The token grid, (B, H', W', token_dim)."""
        grid = self.token_norm(self.to_tokens(self.pool(self.stages(self.stem(x)))))  # (B, D, H', W')
        return grid.permute(0, 2, 3, 1)  # (B, H', W', D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens(x)  # (B, H', W', D)
        if not self.cfg.split:
            return tokens.flatten(1)  # (B, H' W' D)
        half = tokens.shape[-1] // 2
        q = tokens[..., :half].flatten(1)  # (B, H' W' D/2), (row, column, channel) order
        p = tokens[..., half:].flatten(1)
        return torch.cat([q, p], dim=1)  # (B, 2 q_dim)

    @torch.no_grad()
    def state_dim(self, image_size: int) -> int:
        """Length of z for square images of `image_size` pixels (found by one dummy forward in eval mode)."""
        was_training = self.training
        self.eval()
        dim = self(torch.zeros(1, self.cfg.in_channels, image_size, image_size,
                               device=next(self.parameters()).device)).shape[1]
        self.train(was_training)
        return dim


def split_state(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, p) halves of z = [q | p] along the last axis."""
    half = z.shape[-1] // 2
    return z[..., :half], z[..., half:]
