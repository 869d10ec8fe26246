"""DDPM parity with the original code (golden vectors), per-image noise and the state-dict contract."""
from pathlib import Path

import pytest
import torch

from model.ddpm import DDPM, SCHEDULE_KEYS, make_schedule, respaced_timesteps
from model.noise import PerImageNoise
from model.unet import UNet

GOLDEN = Path(__file__).parent / "golden"
RTOL, ATOL = 1e-5, 1e-6
# Deterministic DDIM is ill-conditioned in float32: changing x_T by one ulp moves the output by up to
# ~1.8e-5 (measured on this net), and the golden output itself is 1.3e-5 away from a float64
# evaluation (see test_golden_ddim_is_float32_roundoff_away_from_exact), so it gets atol 5e-5.
DDIM_ATOL = 5e-5
# The stochastic samplers add fresh noise at every step, which damps the amplification above, but the
# network's own float32 round-off (tests/test_unet.py: up to ~2.5e-6, depending on kernels and thread
# count) still reaches the output, so they use the network tolerance.
SAMPLER_ATOL = 5e-6


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN / "ddpm_tiny.pt", weights_only=True)


@pytest.fixture(scope="module")
def golden_net():
    return torch.load(GOLDEN / "unet_tiny.pt", weights_only=True)


@pytest.fixture(scope="module")
def net(golden_net):
    network = UNet(**golden_net["config"]).eval()
    network.load_state_dict(golden_net["state_dict"], strict=True)
    return network


@pytest.fixture(scope="module")
def ddpm(golden, net):
    return DDPM(net, **golden["diffusion"]).eval()


class Replay:
    """A noise source that hands back the recorded draws in order; ``assert_all_used`` checks that
    the sampler drew every one of them."""

    def __init__(self, noises):
        self.remaining = list(noises)

    def __call__(self, shape):
        assert self.remaining, "the sampler drew more noises than were recorded"
        z = self.remaining.pop(0)
        assert tuple(z.shape[1:]) == tuple(shape)
        return z

    def assert_all_used(self):
        assert not self.remaining, f"{len(self.remaining)} recorded noise(s) were never drawn"


@pytest.mark.parametrize("kind, leading_zero", [("ddpm", True), ("ddim", False)])
def test_schedules_match_golden(golden, ddpm, kind, leading_zero):
    expected = golden[f"{kind}_schedule"]
    assert sorted(expected) == sorted(SCHEDULE_KEYS)
    made = make_schedule(1e-4, 0.02, 1000, leading_zero)
    buffers = getattr(ddpm, f"{kind}_schedule")
    for key in SCHEDULE_KEYS:
        assert made[key].dtype == torch.float32
        torch.testing.assert_close(made[key], expected[key], rtol=RTOL, atol=ATOL, equal_nan=True, msg=key)
        torch.testing.assert_close(buffers[key], made[key], rtol=0, atol=0, equal_nan=True, msg=key)


def test_loss_matches_golden(golden, ddpm):
    case = golden["loss"]
    with torch.no_grad():
        loss = ddpm(case["x0"], t=case["t"], noise=case["noise"])
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss, case["value"], rtol=RTOL, atol=ATOL)


def test_loss_under_bf16_autocast_is_float32(golden, ddpm):
    case = golden["loss"]
    with torch.no_grad(), torch.amp.autocast("cpu", dtype=torch.bfloat16):
        loss = ddpm(case["x0"], t=case["t"], noise=case["noise"])
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, case["value"], rtol=0.05, atol=0)


@pytest.mark.parametrize("norm", [False, True])
def test_features_match_golden(golden, ddpm, norm):
    case = golden["features"]
    expected = case["value_norm" if norm else "value"]
    with torch.no_grad():
        features = ddpm.get_feature(case["x0"], case["t"], norm=norm, noise=case["noise"])
    assert list(features) == list(expected) == ddpm.nn_model.grid_blocks
    for key, value in expected.items():
        torch.testing.assert_close(features[key], value, rtol=RTOL, atol=ATOL, msg=key)


def test_per_sample_timestep_tensor_equals_int(golden, ddpm):
    case = golden["features"]
    t = torch.full((case["x0"].shape[0],), case["t"])
    with torch.no_grad():
        from_int = ddpm.get_feature(case["x0"], case["t"], name="out_2", noise=case["noise"])
        from_tensor = ddpm.get_feature(case["x0"], t, name="out_2", noise=case["noise"])
        mixed = ddpm.get_feature(case["x0"], torch.tensor([11, 500, 11, 500]), name="out_2", noise=case["noise"])
    assert torch.equal(from_int, from_tensor)
    assert torch.equal(mixed[[0, 2]], from_int[[0, 2]])
    assert (mixed[[1, 3]] - from_int[[1, 3]]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["out_1", "out_3"])
def test_named_feature_stops_early_and_equals_full_run(golden, ddpm, name, monkeypatch):
    case = golden["features"]
    with torch.no_grad():
        full = ddpm.get_feature(case["x0"], case["t"], noise=case["noise"])
        blocks_run = []
        hooks = [module.register_forward_hook(lambda m, i, o: blocks_run.append(m)) for module in ddpm.nn_model.up]
        monkeypatch.setattr(ddpm.nn_model.final, "forward", lambda x: pytest.fail("final layer ran"))
        one = ddpm.get_feature(case["x0"], case["t"], name=name, noise=case["noise"])
        for hook in hooks:
            hook.remove()
    assert one.shape == full[name].shape
    assert torch.equal(one, full[name])
    blocks = [m for m in ddpm.nn_model.up if hasattr(m, "res")]
    assert blocks_run[-1] is blocks[ddpm.nn_model.grid_blocks.index(name)]


def test_ddim_eta0_matches_golden(golden, ddpm):
    case = golden["ddim"]
    out = ddpm.sample(x_T=case["x_T"], steps=case["steps"], eta=case["eta"],
                      noise=lambda shape: pytest.fail("eta 0 draws no noise"))
    torch.testing.assert_close(out, case["out"], rtol=RTOL, atol=DDIM_ATOL)


def test_golden_ddim_is_float32_roundoff_away_from_exact(golden, golden_net):
    """Justifies DDIM_ATOL: the original's own float32 output is ~1e-5 from a float64 evaluation."""
    case = golden["ddim"]
    exact_net = UNet(**golden_net["config"]).eval()
    exact_net.load_state_dict(golden_net["state_dict"], strict=True)
    exact_ddpm = DDPM(exact_net, **golden["diffusion"]).double()  # float32 schedule values, float64 arithmetic
    exact = exact_ddpm.sample(x_T=case["x_T"].double(), steps=case["steps"])
    worst = (exact - case["out"].double()).abs().max().item()
    assert 1e-6 < worst < DDIM_ATOL


def test_ddim_eta1_replays_recorded_noise(golden, ddpm):
    case = golden["ddim_eta1"]
    # The original drew a z at the last step too but added none (case["note"]); we draw none there.
    noise = Replay(case["noises"][:-1])
    out = ddpm.sample(x_T=case["x_T"], steps=case["steps"], eta=case["eta"], noise=noise)
    noise.assert_all_used()
    torch.testing.assert_close(out, case["out"], rtol=RTOL, atol=SAMPLER_ATOL)


def test_ancestral_with_nT20_replays_recorded_noise(golden, net):
    case = golden["ancestral_nT20"]
    ddpm20 = DDPM(net, betas=golden["diffusion"]["betas"], n_T=case["n_T"]).eval()
    noise = Replay(case["noises"][:-1])  # the z of step i = 1 was drawn and not added, as above
    out = ddpm20.sample(x_T=case["x_T"], mode="DDPM", noise=noise)
    noise.assert_all_used()
    torch.testing.assert_close(out, case["out"], rtol=RTOL, atol=ATOL)


def spec_ddim_times(n_T, steps):
    """SPEC §3: 1, 1 + k, 1 + 2k, ... up to n_T with k = n_T // steps, reversed, then 0."""
    stride, times = n_T // steps, []
    while 1 + len(times) * stride <= n_T:
        times.append(1 + len(times) * stride)
    return times[::-1] + [0]


def reference_ddim(net, schedule, n_T, x_T, times, eta, noises):
    """SPEC §3's DDIM loop written out plainly, on the original's DDIM schedule."""
    alphabar, x = schedule["alphabar_t"], x_T
    for index, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        a, a_next = alphabar[t], alphabar[t_next]
        eps = net(x, torch.full((x.shape[0],), t / n_T))
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        c1 = eta * ((1 - a / a_next) * (1 - a_next) / (1 - a)).sqrt()
        x = a_next.sqrt() * x0 + (1 - a_next - c1 ** 2).sqrt() * eps
        if t_next != 0:
            x = x + c1 * noises[index]
    return (x + 1) / 2


def test_ddim_with_a_step_count_that_does_not_divide_n_T(golden, ddpm):
    steps = 7  # 1000 // 7 = 142: timesteps 995, 853, ..., 143, 1, then 0: 8 network calls
    times = spec_ddim_times(ddpm.n_T, steps)
    assert len(times) - 1 == 8 and times[:2] == [995, 853] and times[-2:] == [1, 0]
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    noises = torch.randn(len(times) - 2, *x_T.shape, generator=torch.Generator().manual_seed(4))
    seen = []
    hook = ddpm.nn_model.register_forward_hook(lambda module, inputs, out: seen.append(inputs[1][0].item()))
    try:
        replayed = Replay(noises)
        out = ddpm.sample(x_T=x_T, steps=steps, eta=0.5, noise=replayed)
    finally:
        hook.remove()
    replayed.assert_all_used()
    assert [round(t * ddpm.n_T) for t in seen] == times[:-1]
    with torch.no_grad():
        expected = reference_ddim(ddpm.nn_model, golden["ddim_schedule"], ddpm.n_T, x_T, times, 0.5, noises)
    torch.testing.assert_close(out, expected, rtol=0, atol=SAMPLER_ATOL)


def test_respaced_ancestral_sampling(golden, net):
    case = golden["ancestral_nT20"]
    ddpm20 = DDPM(net, betas=golden["diffusion"]["betas"], n_T=case["n_T"]).eval()
    # all n_T steps respaced are the original's ancestral sampler (the golden case) up to float rounding
    replayed = Replay(case["noises"][:-1])
    full = ddpm20.sample(x_T=case["x_T"], mode="DDPM", steps=case["n_T"], noise=replayed)
    replayed.assert_all_used()
    torch.testing.assert_close(full, case["out"], rtol=RTOL, atol=1e-4)
    # improved-diffusion's spacing: both ends kept, evenly spaced, rounded
    assert respaced_timesteps(20, 5) == [1, 6, 11, 15, 20] and respaced_timesteps(1000, 50)[:3] == [1, 21, 42]
    assert len(respaced_timesteps(1000, 50)) == 50 and respaced_timesteps(1000, 50)[-1] == 1000
    calls = []
    ddpm20.nn_model.register_forward_hook(lambda module, inputs, output: calls.append(round(inputs[1][0].item() * 20)))
    noises = []

    def recorded(shape):
        noises.append(torch.randn(case["x_T"].shape[0], *shape, generator=generator))
        return noises[-1]

    generator = torch.Generator().manual_seed(0)
    x_T = case["x_T"]
    out = ddpm20.sample(x_T=x_T, mode="DDPM", steps=5, noise=recorded)
    assert calls == [20, 15, 11, 6, 1] and len(noises) == 4  # no noise after the last step
    # the same update written out with the schedule's products: alpha = alphabar_t / alphabar_s
    alphabar = ddpm20.ddpm_alphabar_t.double()
    x = x_T.double()
    with torch.no_grad():
        for index, (t, s) in enumerate(zip([20, 15, 11, 6, 1], [15, 11, 6, 1, 0])):
            eps = net(x.float(), torch.full((x.shape[0],), t / 20)).double()
            x0 = ((x - (1 - alphabar[t]).sqrt() * eps) / alphabar[t].sqrt()).clamp(-1, 1)
            eps = (x - alphabar[t].sqrt() * x0) / (1 - alphabar[t]).sqrt()
            alpha = alphabar[t] / alphabar[s]
            x = (x - (1 - alpha) / (1 - alphabar[t]).sqrt() * eps) / alpha.sqrt()
            if s > 0:
                x = x + (1 - alpha).sqrt() * noises[index].double()
    torch.testing.assert_close(out, ((x + 1) / 2).float(), rtol=1e-4, atol=1e-4)


def test_per_image_noise_makes_images_independent_of_the_batch(ddpm):
    seeds = [7, 8, 9, 10]

    def run(chunk):
        return ddpm.sample(len(chunk), (3, 16, 16), steps=3, eta=1.0, noise=PerImageNoise(chunk, "cpu"))

    whole = run(seeds)
    pieces = torch.cat([run(seeds[:3]), run(seeds[3:])])
    singles = torch.cat([run([seed]) for seed in seeds])
    # Identical noise; only the network's batched float32 kernels may round differently.
    torch.testing.assert_close(pieces, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(singles, whole, rtol=0, atol=1e-5)
    assert (whole[0] - whole[1]).abs().max() > 0.1


def test_per_image_noise_rows_depend_only_on_their_seed():
    batch = PerImageNoise([3, 4, 5], "cpu")
    alone = PerImageNoise([5], "cpu")
    for _ in range(2):
        assert torch.equal(batch((2, 4))[2], alone((2, 4))[0])
    assert not torch.equal(batch.randn_like(torch.zeros(3, 2, 4))[0], batch.randn_like(torch.zeros(3, 2, 4))[0])


def test_state_dict_holds_only_the_network(ddpm, net):
    keys = list(ddpm.state_dict())
    assert keys == [f"nn_model.{key}" for key in net.state_dict()]
    assert sorted(name for name, _ in ddpm.named_buffers() if not name.startswith("nn_model.")) == sorted(
        f"{kind}_{key}" for kind in ("ddpm", "ddim") for key in SCHEDULE_KEYS)


def test_sample_shape_and_range_with_default_noise(ddpm):
    torch.manual_seed(0)
    out = ddpm.sample(2, (3, 16, 16), steps=2)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    assert out.min() > -0.1 and out.max() < 1.1


def test_bad_arguments_are_rejected(ddpm):
    with pytest.raises(ValueError, match="mode"):
        ddpm.sample(1, (3, 16, 16), mode="ddim")
    with pytest.raises(ValueError, match="n_sample"):
        ddpm.sample(steps=2)
    with pytest.raises(ValueError, match="1001"):
        ddpm.get_feature(torch.zeros(1, 3, 16, 16), 1001)


class RecordingNet(torch.nn.Module):
    """A stand-in network that keeps the conditioning it is called with and predicts zeros."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.zeros(()))
        self.conditioning = []

    def forward(self, x, conditioning, *rest):
        self.conditioning.append(conditioning.detach().flatten())
        return x * self.scale


def test_default_training_timesteps_are_uniform_over_1_to_n_T():
    """DDPM.forward without ``t`` trains on t = 1..n_T (SPEC), each as often, never on t = 0."""
    n_T, draws = 10, 20000
    net = RecordingNet()
    torch.manual_seed(0)
    DDPM(net, n_T=n_T)(torch.rand(draws, 1, 1, 1))
    t = net.conditioning[0] * n_T  # the network sees t / n_T
    assert torch.allclose(t, t.round(), atol=1e-4)
    counts = torch.bincount(t.round().long(), minlength=n_T + 1)
    assert counts[0] == 0 and len(counts) == n_T + 1  # never 0, never above n_T
    assert (counts[1:] - draws / n_T).abs().max() < 0.1 * draws / n_T  # uniform: 2000 +- 5 standard deviations
