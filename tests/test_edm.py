"""EDM parity with the original code (golden vectors), per-image noise and the state-dict contract."""
import contextlib
from pathlib import Path

import pytest
import torch
from torch import nn

from model.edm import EDM
from model.noise import PerImageNoise
from model.unet import UNet

GOLDEN = Path(__file__).parent / "golden"
RTOL, ATOL = 1e-5, 1e-6
# The network's float32 round-off (up to ~2.5e-6 on outputs of size ~2.5, see tests/test_unet.py)
# reaches D(x; sigma) through c_out, and the Heun output through 9 network calls.
NET_ATOL = 5e-6


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN / "edm_tiny.pt", weights_only=True)


@pytest.fixture(scope="module")
def net():
    golden_net = torch.load(GOLDEN / "unet_tiny.pt", weights_only=True)
    network = UNet(**golden_net["config"]).eval()
    network.load_state_dict(golden_net["state_dict"], strict=True)
    return network


@pytest.fixture(scope="module")
def edm(golden, net):
    return EDM(net, **golden["diffusion"]).eval()


@pytest.mark.parametrize("steps", [18, 5])
def test_schedule_matches_golden_exactly(golden, edm, steps):
    schedule = edm.schedule(steps)
    assert schedule.dtype == torch.float64 and schedule[-1] == 0
    assert torch.equal(schedule, golden[f"schedule_{steps}"])


def test_denoiser_matches_golden(golden, edm):
    case = golden["denoiser"]
    with torch.no_grad():
        out = edm.denoise(case["x_noisy"], case["sigma"])
        from_flat_sigma = edm.denoise(case["x_noisy"].double(), case["sigma"].flatten().double())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, case["out"], rtol=RTOL, atol=NET_ATOL)
    assert torch.equal(from_flat_sigma, out)


def test_loss_matches_golden(golden, edm):
    case = golden["loss"]
    with torch.no_grad():
        loss = edm(case["x0"], rnd_normal=case["rnd_normal"], noise=case["noise"])
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss, case["value"], rtol=RTOL, atol=ATOL)


def test_loss_under_bf16_autocast_is_float32(golden, edm):
    case = golden["loss"]
    with torch.no_grad(), torch.amp.autocast("cpu", dtype=torch.bfloat16):
        loss = edm(case["x0"], rnd_normal=case["rnd_normal"], noise=case["noise"])
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, case["value"], rtol=0.05, atol=0)


def test_features_match_golden(golden, edm):
    case = golden["features"]
    with torch.no_grad():
        features = edm.get_feature(case["x0"], case["t"], steps=case["steps"], noise=case["noise"])
        normed = edm.get_feature(case["x0"], case["t"], steps=case["steps"], norm=True, noise=case["noise"])
    assert list(features) == list(case["value"]) == edm.nn_model.grid_blocks
    for key, value in case["value"].items():
        torch.testing.assert_close(features[key], value, rtol=RTOL, atol=ATOL, msg=key)
        torch.testing.assert_close(normed[key], value / value.norm(dim=1, keepdim=True), rtol=RTOL, atol=ATOL, msg=key)


def test_named_feature_stops_early_and_equals_full_run(golden, edm, monkeypatch):
    case = golden["features"]
    with torch.no_grad():
        full = edm.get_feature(case["x0"], case["t"], noise=case["noise"])
        monkeypatch.setattr(edm.nn_model.final, "forward", lambda x: pytest.fail("final layer ran"))
        last_block = [m for m in edm.nn_model.up if hasattr(m, "res")][-1]
        monkeypatch.setattr(last_block, "forward", lambda *args: pytest.fail("out_4 ran"))
        one = edm.get_feature(case["x0"], case["t"], name="out_3", noise=case["noise"])
    assert torch.equal(one, full["out_3"])


def test_per_sample_timestep_tensor(golden, edm):
    case = golden["features"]
    with torch.no_grad():
        from_int = edm.get_feature(case["x0"], 4, name="out_1", noise=case["noise"])
        mixed = edm.get_feature(case["x0"], torch.tensor([4, 18, 4, 18]), name="out_1", noise=case["noise"])
    assert torch.equal(mixed[[0, 2]], from_int[[0, 2]])
    assert (mixed[[1, 3]] - from_int[[1, 3]]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="1..18"):
        edm.get_feature(case["x0"], 0)


def test_heun_matches_golden(golden, edm):
    case = golden["heun"]
    out = edm.sample(x_T=case["x_T"], steps=case["steps"], eta=case["eta"],
                     noise=lambda shape: pytest.fail("eta 0 draws no noise"))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, case["out"], rtol=RTOL, atol=NET_ATOL)


def test_heun_churn_draws_noise_only_inside_the_S_range(edm):
    drawn = []

    def noise(shape):
        drawn.append(shape)
        return torch.randn((1, *shape))

    edm.sample(x_T=torch.randn(1, 3, 16, 16), steps=18, eta=1.0, noise=noise)
    in_range = [s for s in edm.schedule(18)[:-1].tolist() if edm.S_min <= s <= edm.S_max]
    assert [round(s, 3) for s in in_range] == [0.585, 0.296, 0.14, 0.06, 0.023]
    assert drawn == [(3, 16, 16)] * 5


def test_per_image_noise_makes_images_independent_of_the_batch(edm):
    seeds = [7, 8, 9, 10]

    def run(chunk):
        return edm.sample(len(chunk), (3, 16, 16), steps=3, eta=1.0, noise=PerImageNoise(chunk, "cpu"))

    whole = run(seeds)
    # Identical noise; only the network's batched float32 kernels may round differently.
    torch.testing.assert_close(torch.cat([run(seeds[:3]), run(seeds[3:])]), whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat([run([seed]) for seed in seeds]), whole, rtol=0, atol=1e-5)
    assert (whole[0] - whole[1]).abs().max() > 0.1


@pytest.mark.parametrize("augment_prob", [0.0, 0.12])
def test_state_dict_holds_only_the_network(net, augment_prob):
    edm = EDM(net, augment_prob=augment_prob)
    assert list(edm.state_dict()) == [f"nn_model.{key}" for key in net.state_dict()]
    assert (edm.augment_pipe is not None) == (augment_prob > 0)


def test_augmented_loss_feeds_labels_to_the_network():
    torch.manual_seed(0)
    net = UNet((3, 16, 16), 32, [1, 2], [False, True], 0.0, 1, False, augment_dim=9).eval()
    edm = EDM(net, augment_prob=1.0)
    seen = []
    net.time_emb.register_forward_hook(lambda m, args, out: seen.append(args[1]))
    loss = edm(torch.rand(2, 3, 16, 16))
    assert torch.isfinite(loss)
    assert seen[0].shape == (2, 9) and seen[0].abs().sum() > 0


def test_labels_are_zero_when_the_augmentation_is_off():
    """A network that takes labels gets zeros in training (DDP needs its label embedding used), which
    leaves its output as without labels; sampling gives none."""
    torch.manual_seed(0)
    net = UNet((3, 16, 16), 32, [1, 2], [False, True], 0.0, 1, False, augment_dim=9).eval()
    edm = EDM(net, augment_prob=0.0)
    seen = []
    net.time_emb.register_forward_hook(lambda m, args, out: seen.append(args[1]))
    x0, rnd_normal, noise = torch.rand(2, 3, 16, 16), torch.randn(2, 1, 1, 1), torch.randn(2, 3, 16, 16)
    loss = edm(x0, rnd_normal=rnd_normal, noise=noise)
    loss.backward()
    assert torch.equal(seen[0], torch.zeros(2, 9))
    assert net.time_emb.aug_emb.weight.grad is not None
    x = 2 * x0 - 1
    sigma = (rnd_normal * edm.p_std + edm.p_mean).exp()
    weight = (sigma ** 2 + edm.sigma_data ** 2) / (sigma * edm.sigma_data) ** 2
    with torch.no_grad():
        unlabelled = (weight * (edm.denoise(x + sigma * noise, sigma) - x) ** 2).mean()
    assert seen[1] is None
    torch.testing.assert_close(loss.detach(), unlabelled, rtol=1e-6, atol=0)


class Float32Probe(nn.Module):
    """A network without autocast-listed operations: it records whether it ran under autocast and
    returns a float32 function of its input."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.autocast_seen = []

    def forward(self, x, t, aug=None):
        self.autocast_seen.append(torch.is_autocast_enabled("cpu"))
        return torch.tanh(x) * self.scale + t.reshape(-1, 1, 1, 1)


def test_only_the_network_sees_an_enclosing_autocast():
    """The augmentation, the preconditioning and the loss run in float32 under bf16 autocast, as the
    original's (autocast around the network only): the loss equals the float32 one exactly."""
    network = Float32Probe()
    edm = EDM(network, augment_prob=1.0)
    x0 = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def loss(context):
        torch.manual_seed(3)  # the same sigmas, noise and augmentation draws
        with torch.no_grad(), context:
            return edm(x0)

    expected = loss(contextlib.nullcontext())
    got = loss(torch.amp.autocast("cpu", dtype=torch.bfloat16))
    assert network.autocast_seen == [False, True]
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_sample_shape_with_default_noise(edm):
    torch.manual_seed(0)
    out = edm.sample(2, (3, 16, 16), steps=2)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float64


class RecordingNet(torch.nn.Module):
    """A stand-in network that keeps the noise conditioning it is called with and predicts zeros."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.zeros(()))
        self.conditioning = []

    def forward(self, x, c_noise, aug=None):
        self.conditioning.append(c_noise.detach().flatten())
        return x * self.scale


def test_default_training_sigmas_are_log_normal_with_p_mean_and_p_std():
    """EDM.forward without ``rnd_normal`` draws ln(sigma) ~ N(p_mean, p_std^2) per image (SPEC; the network
    sees c_noise = ln(sigma) / 4)."""
    draws = 20000
    net = RecordingNet()
    torch.manual_seed(0)
    EDM(net, p_mean=-1.2, p_std=1.2)(torch.rand(draws, 1, 1, 1))
    log_sigma = net.conditioning[0].double() * 4
    assert log_sigma.shape == (draws,) and log_sigma.unique().numel() > 0.99 * draws  # one draw per image
    assert abs(log_sigma.mean().item() - (-1.2)) < 0.05  # standard error 0.0085
    assert abs(log_sigma.std().item() - 1.2) < 0.05      # standard error 0.006
    # Normal, not some other law with these moments: 68% within one standard deviation.
    assert abs(((log_sigma + 1.2).abs() < 1.2).double().mean().item() - 0.6827) < 0.02
