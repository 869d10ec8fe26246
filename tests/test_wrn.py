import math
from pathlib import Path

import pytest
import torch

from model.wrn import WideResNet, standardize_per_image

GOLDEN = Path(__file__).parent / "golden" / "wrn_tiny.pt"


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


def test_golden_logits(golden):
    net = WideResNet(
        blocks_per_group=golden["blocks_per_group"], channel_multiplier=golden["channel_multiplier"]
    ).eval()
    net.load_state_dict(golden["state_dict"], strict=True)
    with torch.no_grad():
        logits = net(golden["x"], golden["t"])
    torch.testing.assert_close(logits, golden["logits"], rtol=1e-5, atol=1e-6)


def test_wrn_28_10_parameter_count(golden):
    with torch.device("meta"):
        net = WideResNet(blocks_per_group=4, channel_multiplier=10)
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == golden["n_params_wrn_28_10"] == 38_913_114


def test_fourier_frequencies_saved_but_not_trained():
    net = WideResNet(blocks_per_group=1, channel_multiplier=1)
    assert "time_emb.W" in net.state_dict()
    assert net.time_emb.W.shape == (128,)
    trainable = {name for name, p in net.named_parameters() if p.requires_grad}
    assert "time_emb.W" not in trainable


def test_standardize_per_image_uses_unbiased_std_and_floor():
    values = torch.arange(12, dtype=torch.float32)
    images = torch.stack([values.view(3, 2, 2), torch.full((3, 2, 2), 5.0)])  # (2, 3, 2, 2)
    out = standardize_per_image(images)
    unbiased_std = math.sqrt(sum((v - 5.5) ** 2 for v in range(12)) / 11)
    torch.testing.assert_close(out[0], (values.view(3, 2, 2) - 5.5) / unbiased_std)
    # A constant image has std 0: the floor 1/sqrt(C*H*W) keeps it finite (all zeros).
    torch.testing.assert_close(out[1], torch.zeros(3, 2, 2))
    nearly_constant = torch.zeros(1, 3, 2, 2)
    nearly_constant[0, 0, 0, 0] = 1e-3
    floored = standardize_per_image(nearly_constant)
    expected = (nearly_constant - 1e-3 / 12) * math.sqrt(12)
    torch.testing.assert_close(floored, expected)
