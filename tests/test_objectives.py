"""The training objective's seams (model/objectives.py): prediction targets that every sampler reads back,
min-SNR weighting, logit-normal timesteps on DDPM's steps, EDM's defaults, what a checkpoint and a resume
refuse, and subclassing a diffusion kind with **kwargs."""
from pathlib import Path

import pytest
import torch
from torch import nn

from model.ddpm import DDPM
from model.edm import EDM
from model.models import load_config, load_diffusion, load_weights
from model.objectives import PREDICTIONS, logit_normal_timesteps
from model.schedules import make_schedule
from tests.helpers import tiny_config, tiny_diffusion
from utils.checkpoint import save_checkpoint
from utils.errors import UserError

REPO = Path(__file__).resolve().parent.parent


class ExactDenoiser(nn.Module):
    """The exact denoiser of a one-image data set: at (x_t, t) it knows eps = (x_t - sqrtab x0) / sqrtmab and
    outputs what ``prediction`` asks for, written here independently of model/objectives.py."""

    def __init__(self, image, n_T, schedule, prediction):
        super().__init__()
        self.image, self.n_T, self.prediction = image, n_T, prediction
        alphabar = make_schedule(1e-4, 0.02, n_T, True, schedule)["alphabar_t"].double()
        self.sqrtab, self.sqrtmab = alphabar.sqrt(), (1 - alphabar).sqrt()

    def forward(self, x, t_input):
        t = round(float(t_input[0]) * self.n_T)
        a, s, x = self.sqrtab[t], self.sqrtmab[t], x.double()
        eps = (x - a * self.image) / s
        return {"eps": eps, "x0": self.image.expand_as(x), "v": a * eps - s * self.image}[self.prediction].float()


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_every_sampler_reads_the_prediction_target_back(prediction):
    torch.manual_seed(0)
    image = torch.rand(1, 3, 4, 4, dtype=torch.float64) * 1.6 - 0.8
    # cosine: DDIM converts with the training schedule too, so the exact denoiser is exact for every sampler
    ddpm = DDPM(ExactDenoiser(image, 20, "cosine", prediction), n_T=20, schedule="cosine", prediction=prediction)
    for sampler in ({"mode": "DDIM", "steps": 20}, {"mode": "DDIM", "steps": 5, "eta": 1.0}, {"mode": "DDPM"},
                    {"mode": "DDPM", "steps": 6}):
        images = ddpm.sample(3, (3, 4, 4), **sampler)
        torch.testing.assert_close(images, ((image.float() + 1) / 2).expand(3, -1, -1, -1), atol=2e-4, rtol=0,
                                   msg=f"{prediction} {sampler}")
    x_t = torch.randn(2, 3, 4, 4)
    eps, x0 = ddpm.denoise(x_t, 7)
    torch.testing.assert_close(x0, image.float().expand(2, -1, -1, -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(ddpm.perturb(x0, 7, eps), x_t, atol=1e-5, rtol=0)


def test_v_target_is_diffusers_velocity():
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    x0, eps, t = torch.rand(4, 3, 4, 4) * 2 - 1, torch.randn(4, 3, 4, 4), torch.tensor([1, 250, 700, 1000])
    ddpm = DDPM(nn.Identity(), prediction="v")
    sqrtab, sqrtmab = ddpm.ddpm_sqrtab[t].view(-1, 1, 1, 1), ddpm.ddpm_sqrtmab[t].view(-1, 1, 1, 1)
    velocity = DDPMScheduler(num_train_timesteps=1000).get_velocity(x0, eps, t - 1)  # our t is its index t - 1
    torch.testing.assert_close(ddpm.prediction_target.target(x0, eps, sqrtab, sqrtmab), velocity, atol=2e-5, rtol=0)


class Zero(nn.Module):
    def forward(self, x, t):
        return torch.zeros_like(x)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_weights_the_target_error_as_hang_et_al(prediction):
    torch.manual_seed(0)
    x0, noise, t = torch.rand(3, 3, 4, 4), torch.randn(3, 3, 4, 4), torch.tensor([1, 150, 1000])
    ddpm = DDPM(Zero(), prediction=prediction, loss_weighting="min_snr", loss_weighting_args={"gamma": 5.0})
    loss = ddpm(x0, t=t, noise=noise)
    # by hand, in float64: snr 1e4 (t = 1), 3.7 (t = 150), 4e-5 (t = 1000) around gamma = 5
    alphabar = make_schedule(1e-4, 0.02, 1000, True)["alphabar_t"].double()[t]
    snr, a, s = alphabar / (1 - alphabar), alphabar.sqrt().view(-1, 1, 1, 1), (1 - alphabar).sqrt().view(-1, 1, 1, 1)
    x = 2 * x0.double() - 1
    target = {"eps": noise.double(), "x0": x, "v": a * noise.double() - s * x}[prediction]
    weight = snr.clamp(max=5.0) / {"eps": snr, "x0": torch.ones(3, dtype=torch.float64), "v": snr + 1}[prediction]
    assert snr[0] > 5 > snr[1]
    expected = (weight.view(-1, 1, 1, 1) * target ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    unweighted = DDPM(Zero(), prediction=prediction)(x0, t=t, noise=noise)
    assert unweighted.item() == pytest.approx((target ** 2).mean().item(), rel=1e-5)


def test_logit_normal_takes_step_k_for_u_in_its_bin():
    ddpm = DDPM(Zero(), n_T=1000, t_sampling="logit_normal", t_sampling_args={"loc": 0.3, "scale": 0.8})
    torch.manual_seed(5)
    t = ddpm.training_timesteps(4096, "cpu")
    torch.manual_seed(5)
    u = torch.sigmoid(0.3 + 0.8 * torch.randn(4096).double())
    expected = (u * 1000).floor().long() + 1  # step k takes u in [(k - 1) / n_T, k / n_T)
    assert (t - expected).abs().max() <= 1 and (t == expected).float().mean() > 0.99  # float32 rounding at a bin edge
    assert t.dtype == torch.long and t.min() >= 1 and t.max() <= 1000
    for loc, step in ((-30.0, 1), (30.0, 1000)):  # u -> 0 is step 1, u -> 1 (1.0 in float32) is step n_T
        assert set(logit_normal_timesteps(ddpm, 64, "cpu", loc=loc).tolist()) == {step}
    torch.manual_seed(6)
    assert torch.equal(DDPM(Zero(), n_T=1000).training_timesteps(64, "cpu"),
                       torch.manual_seed(6) and torch.randint(1, 1001, (64,)))  # uniform: the original's draw


class TinyDenoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, c_noise, aug=None):
        return self.conv(x) * c_noise.view(-1, 1, 1, 1)


def test_edm_defaults_are_its_own_draw_and_weighting_and_min_snr_reweights_them():
    torch.manual_seed(0)
    edm, x0, noise = EDM(TinyDenoiser()), torch.rand(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    torch.manual_seed(1)
    drawn = edm(x0, noise=noise)
    torch.manual_seed(1)
    rnd_normal = torch.randn(4, 1, 1, 1)
    assert torch.equal(drawn, edm(x0, rnd_normal=rnd_normal, noise=noise))
    sigma = (rnd_normal * 1.2 - 1.2).exp()
    with torch.no_grad():
        error = (edm.denoise(2 * x0 - 1 + sigma * noise, sigma) - (2 * x0 - 1)) ** 2
    edm_weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    assert drawn.item() == pytest.approx((edm_weight * error).mean().item(), rel=1e-5)
    min_snr = EDM(edm.nn_model, loss_weighting="min_snr", loss_weighting_args={"gamma": 2.0})
    expected = ((sigma ** -2).clamp(max=2.0) * error).mean()  # the denoiser predicts x0: weight min(snr, gamma)
    assert min_snr(x0, rnd_normal=rnd_normal, noise=noise).item() == pytest.approx(expected.item(), rel=1e-5)


def test_prediction_is_refused_by_name_and_the_objective_only_on_resume(tmp_path):
    cfg = tiny_config(tmp_path, ["diffusion.prediction=v", "diffusion.loss_weighting=min_snr"])
    path = tmp_path / "model_0.pth"
    save_checkpoint({"MODEL": tiny_diffusion(cfg).state_dict(), "config": cfg.to_dict()}, path)
    with pytest.raises(UserError, match=r"trained with diffusion.prediction = v, but the config gives eps; the network "
                                        r"outputs its training prediction target: drop the --set diffusion.prediction"):
        load_diffusion(tiny_config(tmp_path, ["diffusion.prediction=eps", "diffusion.loss_weighting=min_snr"]), path)
    other = tiny_config(tmp_path, ["diffusion.prediction=v", "diffusion.t_sampling=logit_normal"])
    assert load_diffusion(other, path).prediction == "v"  # sampling and probing ignore the training-only keys
    with pytest.raises(UserError, match=r"trained with diffusion.loss_weighting = min_snr, but the config gives none; "
                                        r"a resumed run keeps its training objective"):
        load_weights(tiny_diffusion(other), path, weights="online", resume=True)
    regamma = tiny_config(tmp_path, ["diffusion.prediction=v", "diffusion.loss_weighting=min_snr",
                                     "diffusion.loss_weighting_args={gamma: 1.0}"])
    with pytest.raises(UserError, match=r"diffusion.loss_weighting_args = \{\}, but the config gives \{'gamma': 1.0\}"):
        load_weights(tiny_diffusion(regamma), path, weights="online", resume=True)
    load_weights(tiny_diffusion(cfg), path, weights="online", resume=True)
    # a checkpoint from before these keys existed had their defaults
    older = tiny_config(tmp_path)
    saved = older.to_dict()
    for key in ("prediction", "loss_weighting", "loss_weighting_args", "t_sampling", "t_sampling_args"):
        del saved["diffusion"][key]
    save_checkpoint({"MODEL": tiny_diffusion(older).state_dict(), "config": saved}, path)
    load_weights(tiny_diffusion(older), path, weights="online", resume=True)
    with pytest.raises(UserError, match=r"diffusion.prediction = eps, but the config gives x0"):
        load_diffusion(tiny_config(tmp_path, ["diffusion.prediction=x0"]), path)


def test_bad_objective_keys_are_one_line(tmp_path):
    for overrides, message in (
            (["diffusion.prediction=velocity"], "key 'diffusion.prediction' must be one of eps, x0, v or the import "
                                                "path of a prediction target class"),
            (["diffusion.prediction=tests.test_objectives.Zero"], "'tests.test_objectives.Zero' lacks target, "
                                                                  "eps_and_x0, x0_loss_scale"),
            (["diffusion.loss_weighting=min_snr", "diffusion.loss_weighting_args={gama: 3}"],
             "key 'diffusion.loss_weighting_args' {'gama': 3} does not fit 'min_snr', which takes gamma"),
            (["diffusion.loss_weighting=min_snr", "diffusion.loss_weighting_args={gamma: 0}"], "gamma must be positive"),
            (["diffusion.t_sampling=logit_normal", "diffusion.t_sampling_args={scale: -1}"], "scale must be positive"),
            (["diffusion.t_sampling=mypkg.nowhere.draw"], "key 'diffusion.t_sampling' 'mypkg.nowhere.draw' cannot be "
                                                          "imported")):
        with pytest.raises(UserError) as err:
            tiny_config(tmp_path, overrides)
        assert message in str(err.value) and "\n" not in str(err.value)


class KwDDPM(DDPM):
    """A user's DDPM that adds one key and passes the rest on."""

    def __init__(self, nn_model, shift: float = 0.0, **kwargs):
        super().__init__(nn_model, **kwargs)
        self.shift = shift


class RestatedDDPM(DDPM):
    """A user's DDPM written before DDPM had its objective keys: it restates the parameters DDPM had then."""

    def __init__(self, nn_model, betas: list[float] = (1e-4, 0.02), n_T: int = 1000, schedule: str = "linear"):
        super().__init__(nn_model, betas, n_T, schedule)


def test_a_subclass_passing_kwargs_on_takes_the_parents_keys(tmp_path):
    cfg = tiny_config(tmp_path, ["model_type=tests.test_objectives.KwDDPM", "diffusion.shift=0.5",
                                 "diffusion.n_T=100", "diffusion.prediction=v"])
    diffusion = tiny_diffusion(cfg)
    assert (type(diffusion), diffusion.shift, diffusion.n_T, diffusion.prediction) == (KwDDPM, 0.5, 100, "v")
    assert diffusion.t_sampling == "uniform"  # a key it never names reaches it with the parent's default
    with pytest.raises(UserError, match=r"unknown key 'diffusion.n_TT'.*did you mean 'diffusion.n_T'"):
        tiny_config(tmp_path, ["model_type=tests.test_objectives.KwDDPM", "diffusion.n_TT=100"])
    with pytest.raises(UserError) as err:  # DDPM's check reads a key this class does not take
        tiny_config(tmp_path, ["model_type=tests.test_objectives.RestatedDDPM"])
    assert "key 'diffusion.prediction' is read by a settings check, but tests.test_objectives.RestatedDDPM takes " \
           "no parameter 'prediction'; add it to its __init__, or take **kwargs" in str(err.value)


def test_objectives_benchmark_trains_samples_and_probes_each_row(tmp_path):
    import json
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    import objectives

    out = tmp_path / "bench"
    objectives.main(objectives.build_parser().parse_args(
        ["--rows", "v/min_snr/logit_normal", "x0/none/uniform", "--train_images", "16", "--test_images", "8",
         "--probe_epochs", "1", "--sample_steps", "2", "--set", "batch_size=8", "--set", "n_sample=2",
         "--set", "linear.batch_size=8", "--set", "network.image_shape=[3,8,8]", "--out", str(out)]))
    rows = json.loads((out / "objectives.json").read_text())["rows"]
    assert [(row["prediction"], row["loss_weighting"], row["t_sampling"], row["steps"]) for row in rows] == \
        [("v", "min_snr", "logit_normal", 2), ("x0", "none", "uniform", 2)]
    assert len({row["weights_sha256"] for row in rows}) == 2 and all(0 <= row["probe_accuracy"] <= 100 for row in rows)
    assert all((out / row["samples"]).is_file() for row in rows)
    table = (out / "objectives.md").read_text()
    assert f"| v | min_snr | logit_normal | 2 | {rows[0]['first_loss']:.4f} |" in table
    assert rows[0]["weights_sha256"][:16] in table
