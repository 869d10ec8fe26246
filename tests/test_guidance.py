"""Classifier guidance by the model's own DDAE head (model/guidance.py, sample.py --classifier_head): the gradient
against finite differences of the head on the features it was trained on, the samplers' arithmetic (guided-
diffusion's condition_score and condition_mean), the sign, and sample.py's folder, record and refusals."""
import json
import os

import pytest
import torch
from torch import nn

import noisy_classifier_DDAE as ddae_script
import sample
from model.ddpm import DDPM, respaced_timesteps
from model.guidance import HeadGuidance
from model.heads import NoiseConditionalHead
from model.unet import UNet
from tests.helpers import make_checkpoint, make_config
from tests.launch import LAUNCHER_VARS
from utils.provenance import short_digest

BLOCK = "out_2"
CLASS = 3


@pytest.fixture(autouse=True)
def plain_python(monkeypatch):
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)


def tiny_guidance(dtype=torch.float64, scale=1.0, seed=0):
    """A random tiny UNet DDPM (8x8, n_T 1000) and a random head on its out_2, in ``dtype``."""
    torch.manual_seed(seed)
    net = UNet(image_shape=[3, 8, 8], n_channels=32, ch_mults=[1, 1], is_attn=[False, True], dropout=0.0, n_blocks=1)
    diffusion = DDPM(net, n_T=1000).to(dtype).eval().requires_grad_(False)
    head = NoiseConditionalHead(32, 10).to(dtype).requires_grad_(False)
    with torch.no_grad():  # a head whose logits move visibly with the feature
        for parameter in head.parameters():
            parameter.mul_(4)
    return diffusion, head, HeadGuidance(net, head, BLOCK, CLASS, scale, diffusion.n_T)


def head_log_prob(diffusion, head, x_t, t):
    """log p(CLASS | x_t) as noisy_classifier_DDAE.py trained the head: get_feature of clean images noised to
    x_t at timestep t (its own perturb), then the head at level t."""
    x0 = torch.full_like(x_t, 0.5)  # any clean image: the noise is chosen so that perturb gives x_t
    sqrtab, sqrtmab = diffusion.ddpm_sqrtab[t], diffusion.ddpm_sqrtmab[t]
    noise = (x_t - sqrtab * (2 * x0 - 1)) / sqrtmab
    features = diffusion.get_feature(x0, t, name=BLOCK, noise=noise)
    levels = torch.full((x_t.shape[0],), t, dtype=torch.long)
    return torch.log_softmax(head(features, levels), dim=-1)[:, CLASS]


def test_gradient_is_of_log_p_at_x_t_against_finite_differences():
    diffusion, head, guidance = tiny_guidance(scale=2.5)
    t = 500  # sqrt(alphabar_t) = 0.28: a gradient taken with respect to x_0 is off by that factor
    x_t = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    # The head sees the features it was trained on, at its level t.
    torch.testing.assert_close(guidance.log_prob(x_t, t), head_log_prob(diffusion, head, x_t, t), rtol=1e-10, atol=1e-10)
    grad = guidance(x_t, t) / 2.5
    assert not grad.requires_grad and grad.abs().max() > 1e-3
    directions = torch.randn(3, *x_t.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    h = 1e-5
    for direction in directions:
        numeric = (head_log_prob(diffusion, head, x_t + h * direction, t)
                   - head_log_prob(diffusion, head, x_t - h * direction, t)) / (2 * h)  # (B,)
        analytic = (grad * direction).sum(dim=(1, 2, 3))
        torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8)


class ZeroNet(nn.Module):
    """A network predicting no noise: the samplers then only rescale x, so guidance's share is exact."""

    def forward(self, x, t):
        return torch.zeros_like(x)


class GradientAt:
    """Guidance that returns ``g`` at timestep ``at`` only (zero elsewhere), and records the timesteps it is asked."""

    def __init__(self, g, at):
        self.g, self.at, self.asked = g, at, []

    def __call__(self, x, t):
        self.asked.append(t)
        return self.g if t == self.at else torch.zeros_like(x)


def zero_run(mode, steps, at):
    diffusion = DDPM(ZeroNet(), n_T=1000).double()
    g = 1e-3 * torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    guidance = GradientAt(g, at)
    x_T = torch.zeros_like(g)
    images = diffusion.sample(x_T=x_T, steps=steps, mode=mode, noise=lambda shape: torch.zeros(2, *shape,
                                                                                               dtype=torch.float64),
                              guidance=guidance)
    return diffusion, g, guidance, 2 * images - 1


def test_ddim_guidance_shifts_eps_by_sqrt_one_minus_alphabar_t():
    diffusion, g, guidance, x = zero_run("DDIM", 10, at=501)  # timesteps 901, 801, ..., 1, then 0
    assert guidance.asked == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    ab = diffusion.ddim_schedule["alphabar_t"]
    # At t = 501, from x = 0: eps' = -m g with m = sqrt(1 - ab_501), so x0' = (x - m eps') / sqrt(ab_501)
    # = m^2 g / sqrt(ab_501); DDIM to 401; every later step only rescales x by sqrt(ab_next / ab_t), down to ab_0.
    m = torch.sqrt(1 - ab[501])
    after = m * g * (m * torch.sqrt(ab[401] / ab[501]) - torch.sqrt(1 - ab[401]))
    # rtol: the schedule's square roots are float32 values (1e-7); ab of t - 1 (500) would be off by 4e-4
    torch.testing.assert_close(x, after * torch.sqrt(ab[0] / ab[401]), rtol=1e-6, atol=0)


def test_ancestral_guidance_shifts_the_mean_by_its_variance():
    diffusion, g, guidance, x = zero_run("DDPM", None, at=300)
    assert guidance.asked == list(range(1000, 0, -1))
    ab = diffusion.ddpm_schedule["alphabar_t"]
    beta = 1 - diffusion.ddpm_schedule["alpha_t"][300]
    torch.testing.assert_close(x, beta * g / torch.sqrt(ab[299]), rtol=1e-6, atol=0)  # then 1/sqrt(alpha) per step


def test_respaced_guidance_uses_the_respaced_steps_variance():
    times = respaced_timesteps(1000, 10)
    t, s = times[5], times[4]
    diffusion, g, guidance, x = zero_run("DDPM", 10, at=t)
    assert guidance.asked == times[::-1]
    ab = diffusion.ddpm_schedule["alphabar_t"]
    torch.testing.assert_close(x, (1 - ab[t] / ab[s]) * g / torch.sqrt(ab[s]), rtol=1e-6, atol=0)


class Stop(Exception):
    pass


def next_input_log_prob(scale):
    """log p(CLASS | x) of the second DDIM step's input (after one step guided with ``scale``), by the same head."""
    diffusion, head, guidance = tiny_guidance(dtype=torch.float32, scale=scale)
    seen = []

    def recording(x, t):
        seen.append((x.clone(), t))
        if len(seen) == 2:
            raise Stop
        return guidance(x, t)

    x_T = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with pytest.raises(Stop):
        diffusion.sample(x_T=x_T, steps=100, guidance=recording)
    (x_first, t_first), (x_next, t_next) = seen
    assert (t_first, t_next) == (991, 981)
    with torch.no_grad():
        return guidance.log_prob(x_next, t_next)


def test_guidance_raises_log_p_of_the_next_steps_input():
    unguided, guided, away = next_input_log_prob(0.0), next_input_log_prob(20.0), next_input_log_prob(-20.0)
    assert (guided > unguided).all() and (away < unguided).all(), (away, unguided, guided)


# sample.py end to end, on a head that noisy_classifier_DDAE.py trained.

@pytest.fixture(scope="module")
def trained_head(tmp_path_factory):
    folder = tmp_path_factory.mktemp("guided")
    cfg, config = make_config(folder, overrides=["diffusion.n_T=100", "linear.blockname=out_2", "linear.n_epoch=1"])
    checkpoint = make_checkpoint(cfg, 1)
    ddae_script.main(ddae_script.parse_args(["--config", str(config), "--set", f"save_dir={cfg.save_dir}",
                                             "--set", "diffusion.n_T=100", "--ckpt", str(checkpoint),
                                             "--max_images", "32", "--device", "cpu"]))
    head = os.path.join(cfg.save_dir, f"noisy_DDAE_{ddae_script.run_tag(str(checkpoint), max_images=32)}", "head.pth")
    return cfg, config, checkpoint, head


def run_sample(config, checkpoint, *flags):
    save_dir = os.path.join(os.path.dirname(str(config)), "run")  # make_config's
    args = sample.build_parser().parse_args(["--config", str(config), "--device", "cpu", "--ckpt", str(checkpoint),
                                             "--set", "diffusion.n_T=100", "--set", f"save_dir={save_dir}",
                                             "--n_samples", "2", "--steps", "4", *map(str, flags)])
    return sample.main(args)


def test_sample_py_guided_folder_record_and_effect(trained_head, tmp_path, capsys):
    cfg, config, checkpoint, head = trained_head
    guided = run_sample(config, checkpoint, "--classifier_head", head, "--class", 2, "--classifier_scale", 50)
    unguided = run_sample(config, checkpoint)
    name = os.path.basename(guided["out_dir"])
    digest = short_digest(head)[3:]
    assert name == f"EMAgenerated_ep1_ddim_steps4_eta0.0_guided{digest}_class2_scale50.0"
    assert os.path.basename(unguided["out_dir"]) == "EMAgenerated_ep1_ddim_steps4_eta0.0"
    with open(os.path.join(guided["out_dir"], "sampling.json")) as file:
        record = json.load(file)["classifier_guidance"]
    assert record["head"] == os.path.abspath(head) and record["head_sha256"].startswith(digest)
    assert (record["class"], record["scale"]) == (2, 50.0)
    same = [open(os.path.join(folder, "pngs", "0.png"), "rb").read() for folder in (guided["out_dir"],
                                                                                  unguided["out_dir"])]
    assert same[0] != same[1]  # same seed, the guidance moved the pixels
    # Another scale never mixes into the guided folder, and guided images never into an unguided one.
    capsys.readouterr()
    for flags in ([ "--classifier_head", head, "--class", 2, "--classifier_scale", 1, "--out_dir", guided["out_dir"]],
                  ["--out_dir", guided["out_dir"]]):
        with pytest.raises(SystemExit) as stop:
            run_sample(config, checkpoint, *flags)
        assert stop.value.code == 2
        assert "classifier_guidance=" in capsys.readouterr().err


def refusal(capsys, config, checkpoint, *flags):
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_sample(config, checkpoint, *flags)
    error = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "\n" not in error and "Traceback" not in error
    return error


def test_sample_py_refuses_bad_guidance_in_one_line(trained_head, tmp_path, capsys):
    cfg, config, checkpoint, head = trained_head
    error = refusal(capsys, config, checkpoint, "--classifier_head", checkpoint, "--class", 1)
    assert "has no 'head' entry" in error and "noisy_classifier_DDAE.py" in error  # a model checkpoint, not a head
    error = refusal(capsys, config, checkpoint, "--classifier_head", tmp_path / "none.pth", "--class", 1)
    assert "no such file" in error
    (tmp_path / "text.pth").write_text("not a head")
    assert "not a readable head file" in refusal(capsys, config, checkpoint, "--classifier_head",
                                                 tmp_path / "text.pth", "--class", 1)
    other = make_checkpoint(cfg, 7, seed=1)  # another model of the same shape
    error = refusal(capsys, config, other, "--classifier_head", head, "--class", 1)
    assert f"was trained on {checkpoint}" in error and "python noisy_classifier_DDAE.py" in error
    assert "pass --class 0 to 9" in refusal(capsys, config, checkpoint, "--classifier_head", head, "--class", 10)
    assert "pass --class 0 to 9" in refusal(capsys, config, checkpoint, "--classifier_head", head, "--class", -1)
    assert "needs --classifier_head" in refusal(capsys, config, checkpoint, "--class", 1)
    assert "needs --class K" in refusal(capsys, config, checkpoint, "--classifier_head", head)
    assert not os.path.exists(os.path.join(cfg.save_dir, "EMAgenerated_ep7_ddim_steps4_eta0.0"))


def test_edm_refuses_guidance_before_loading(tmp_path, capsys):
    cfg, config = make_config(tmp_path, model_type="EDM")
    checkpoint = make_checkpoint(cfg, 1)
    capsys.readouterr()
    args = sample.build_parser().parse_args(["--config", str(config), "--device", "cpu", "--ckpt", str(checkpoint),
                                             "--classifier_head", "head.pth", "--class", "1", "--n_samples", "1"])
    with pytest.raises(SystemExit):
        sample.main(args)
    assert "model_type EDM has no classifier-guided sampler" in capsys.readouterr().err
