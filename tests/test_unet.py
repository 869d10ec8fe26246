"""UNet parity with the original code (golden vectors) and parameter counts of the shipped configs."""
from pathlib import Path

import pytest
import torch

from model.unet import UNet

GOLDEN = Path(__file__).parent / "golden"

# Both the original's float32 outputs and ours differ from a float64 evaluation of the same weights by
# up to ~2.5e-6 (accumulated float32 round-off over ~20 layers, different conv kernels), so the
# outputs and decoder activations (up to ~2.5 in size) are compared with atol 5e-6 instead of 1e-6.
RTOL, ATOL = 1e-5, 5e-6


def load_golden_net(name):
    golden = torch.load(GOLDEN / name, weights_only=True)
    net = UNet(**golden["config"]).eval()
    net.load_state_dict(golden["state_dict"], strict=True)
    return golden, net


@pytest.mark.parametrize("name", ["unet_tiny.pt", "unet_tiny_res_aug.pt"])
def test_output_and_activations_match_golden(name):
    golden, net = load_golden_net(name)
    assert sum(p.numel() for p in net.parameters()) == golden["n_params"]
    with torch.no_grad():
        out, acts = net(golden["x"], golden["t"], aug=golden["aug"], ret_activation=True)
    torch.testing.assert_close(out, golden["out"], rtol=RTOL, atol=ATOL)
    assert sorted(acts) == sorted(golden["activations"]) == net.grid_blocks
    for key, expected in golden["activations"].items():
        torch.testing.assert_close(acts[key], expected, rtol=RTOL, atol=ATOL, msg=key)


def test_golden_itself_is_float32_roundoff_away_from_exact():
    """Justifies ATOL: the golden activations are as far from float64 as ours are."""
    golden, net = load_golden_net("unet_tiny.pt")
    net = net.double()
    with torch.no_grad():
        _, exact = net(golden["x"].double(), golden["t"].double(), ret_activation=True)
    worst = max((exact[k].float() - v).abs().max().item() for k, v in golden["activations"].items())
    assert 1e-6 < worst < ATOL


def test_augment_labels_change_the_output():
    golden, net = load_golden_net("unet_tiny_res_aug.pt")
    with torch.no_grad():
        with_aug = net(golden["x"], golden["t"], aug=golden["aug"])
        without = net(golden["x"], golden["t"])
    assert (with_aug - without).abs().max() > 1e-3


@pytest.mark.parametrize("stop_at", ["out_1", "out_2", "out_3", "out_4"])
def test_forward_features_stops_early_with_identical_features(stop_at, monkeypatch):
    golden, net = load_golden_net("unet_tiny.pt")
    with torch.no_grad():
        _, full = net(golden["x"], golden["t"], ret_activation=True)
        calls = []
        monkeypatch.setattr(net.final, "forward", lambda x: calls.append("final") or x)
        for module in net.up:
            module.register_forward_hook(lambda m, i, o: calls.append(m))
        partial = net.forward_features(golden["x"], golden["t"], [stop_at])
    assert list(partial) == [stop_at]
    assert torch.equal(partial[stop_at], full[stop_at])
    assert "final" not in calls
    last_block = [m for m in net.up if hasattr(m, "res")][net.grid_blocks.index(stop_at)]
    assert calls[-1] is last_block


def test_forward_features_rejects_unknown_block():
    _, net = load_golden_net("unet_tiny.pt")
    with pytest.raises(ValueError, match="out_9"):
        net.forward_features(torch.zeros(1, 3, 16, 16), torch.zeros(1), ["out_9"])


@pytest.mark.parametrize("ch_mults, is_attn, n_blocks, use_res, augment_dim, n_params, n_blocks_out", [
    ([1, 2, 2, 2], [False, True, False, False], 2, False, 0, 35_746_307, 12),  # DDPM_ddpm, EDM_ddpm
    ([2, 2, 2], [False, True, False], 4, True, 0, 56_524_291, 15),  # DDPM_ddpmpp, EDM_ddpmpp
    ([2, 2, 2], [False, True, False], 4, True, 9, 56_525_443, 15),  # EDM_ddpmpp_aug
])
def test_parameter_counts_of_paper_networks(ch_mults, is_attn, n_blocks, use_res, augment_dim, n_params, n_blocks_out):
    with torch.device("meta"):
        net = UNet((3, 32, 32), 128, ch_mults, is_attn, 0.1, n_blocks, use_res, augment_dim)
    assert sum(p.numel() for p in net.parameters()) == n_params
    assert net.block_names[-1] == f"out_{n_blocks_out}"


def test_feature_resolutions_of_the_35m_unet():
    net = UNet((3, 32, 32), 32, [1, 2, 2, 2], [False, True, False, False], 0.1, 2, False).eval()
    with torch.no_grad():
        _, acts = net(torch.randn(1, 3, 32, 32), torch.tensor([0.5]), ret_activation=True)
    sizes = [acts[f"out_{k}"].shape[-1] for k in range(1, 13)]
    assert sizes == [4] * 3 + [8] * 3 + [16] * 3 + [32] * 3
