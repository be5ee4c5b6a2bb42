"""Token encoder: sizes per stem and read-out, and the (q, p) token layout."""

import pytest
import torch

from hamjepa.config import EncoderConfig
from hamjepa.encoder import TokenEncoder, split_state


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
