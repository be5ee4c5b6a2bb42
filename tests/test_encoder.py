"""Token encoder: sizes per stem and read-out, and the (q, p) token layout."""

import math

import pytest
import torch
from torch import nn

from hamjepa.config import EncoderConfig
from hamjepa.method.encoder import TokenEncoder, split_state


def test_q_and_p_are_the_halves_of_each_token_in_row_column_channel_order():
    encoder = TokenEncoder(EncoderConfig(width=0.125, token_dim=8, in_channels=3)).eval()
    x = torch.randn(2, 3, 16, 16)
    tokens = encoder.tokens(x)  # (B, H', W', D)
    z = encoder(x)
    b, h, w, d = tokens.shape
    q, p = split_state(z)
    assert z.shape == (b, h * w * d)
    for row, col, channel in [(0, 0, 0), (1, 2, 3), (h - 1, w - 1, d // 2 - 1)]:
        index = (row * w + col) * (d // 2) + channel
        assert q[1, index] == tokens[1, row, col, channel]
        assert p[1, index] == tokens[1, row, col, d // 2 + channel]


@pytest.mark.parametrize("cfg,image_size,expected", [
    (EncoderConfig(width=0.125), 32, 8 * 8 * 32),  # the paper's CIFAR protocol: 2048 dims
    (EncoderConfig(width=0.125, in_channels=1, token_dim=16), 28, 7 * 7 * 16),  # Fashion-MNIST
    (EncoderConfig(width=0.125, readout="layer2"), 32, 16 * 16 * 32),
    (EncoderConfig(width=0.125, readout="layer4"), 32, 4 * 4 * 32),
    (EncoderConfig(width=0.125, token_hw=2), 32, 2 * 2 * 32),
    (EncoderConfig(width=0.125, stem="imagenet", token_hw=2), 64, 2 * 2 * 32),
])
def test_state_dim(cfg, image_size, expected):
    encoder = TokenEncoder(cfg)
    assert encoder.state_dim(image_size) == expected
    assert encoder.training  # the dummy forward does not leave it in eval mode


def test_width_multiplier_scales_channels():
    narrow = TokenEncoder(EncoderConfig(width=0.25))
    full = TokenEncoder(EncoderConfig(width=1.0))
    assert narrow.to_tokens.in_channels == 64 and full.to_tokens.in_channels == 256  # layer3 of ResNet-18
    assert len(full.stages) == 3  # layer4 is never built for a layer3 read-out


def test_token_batchnorm_standardises_each_channel_in_training():
    encoder = TokenEncoder(EncoderConfig(width=0.125, token_dim=8))
    tokens = encoder.tokens(torch.randn(16, 3, 16, 16))  # (B, H', W', D)
    flat = tokens.reshape(-1, 8)
    torch.testing.assert_close(flat.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.var(0, unbiased=False), torch.ones(8), atol=1e-2, rtol=0)


@pytest.mark.parametrize("width,stem", [(1.0, "cifar"), (0.25, "cifar"), (0.5, "imagenet")])
def test_residual_stages_initialise_as_torchvision(width, stem):
    """docs/method.md §1: residual-stage convs Kaiming-normal fan_out (std sqrt(2 / fan_out)), BN weight 1 bias 0;
    the CIFAR stem and the token read-out keep PyTorch's default (uniform, std 1 / sqrt(3 fan_in))."""
    torch.manual_seed(0)
    encoder = TokenEncoder(EncoderConfig(width=width, stem=stem))
    convs = [m for m in encoder.stages.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 * 4 + 2  # 3 stages x 2 blocks x 2 convs, and the shortcuts of layer2 and layer3
    for conv in convs:
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        expected = math.sqrt(2.0 / fan_out)
        assert conv.weight.std().item() == pytest.approx(expected, rel=0.15 if conv.weight.numel() < 2000 else 0.05)
    for bn in (m for m in encoder.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    default = [encoder.to_tokens] + ([encoder.stem[0]] if stem == "cifar" else [])
    for conv in default:
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert conv.weight.abs().max().item() <= bound
        assert conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.25)
    if stem == "imagenet":
        stem_conv = encoder.stem[0]
        fan_out = stem_conv.out_channels * 49
        assert stem_conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.1)
