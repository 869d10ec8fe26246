"""The registry and the one model loader: original-layout checkpoints, ours, and clear errors."""
import argparse
from pathlib import Path

import pytest
import torch

from model.ddpm import DDPM
from model.edm import EDM
from model.ema import make_ema
from model.models import build_diffusion, count_parameters, load_config, load_diffusion, load_weights
from model.unet import UNet
from utils.checkpoint import save_checkpoint
from utils.cli import checkpoint_from_args
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
ORIGINAL_CKPT = GOLDEN / "original_ckpt_tiny_DDPM.pth"


def original_expectations():
    return torch.load(GOLDEN / "original_ckpt_tiny_DDPM.expect.pt", weights_only=True)


@pytest.mark.parametrize("weights, key", [("ema", "ema_out"), ("online", "model_out")])
def test_checkpoint_of_the_original_code_gives_recorded_outputs(weights, key):
    expect = original_expectations()
    diffusion = DDPM(UNet(**expect["config"]), **expect["diffusion"]).eval()
    load_weights(diffusion, ORIGINAL_CKPT, weights)
    with torch.no_grad():
        out = diffusion.nn_model(expect["x"], expect["t"])
    torch.testing.assert_close(out, expect[key], rtol=1e-5, atol=5e-6)  # atol: see tests/test_unet.py


def test_original_checkpoint_loads_the_entry_it_is_asked_for():
    expect = original_expectations()
    checkpoint = torch.load(ORIGINAL_CKPT, weights_only=True)
    loaded = {}
    for weights, entry, prefix in [("ema", "EMA", "ema_model.nn_model."), ("online", "MODEL", "module.nn_model.")]:
        diffusion = load_weights(DDPM(UNet(**expect["config"]), **expect["diffusion"]), ORIGINAL_CKPT, weights)
        loaded[weights] = diffusion.nn_model.state_dict()
        for name, value in loaded[weights].items():
            assert torch.equal(value, checkpoint[entry][prefix + name]), (weights, name)
    # After 3 steps the two differ, so a swap of the entries cannot pass.
    assert any(not torch.equal(loaded["ema"][name], loaded["online"][name]) for name in loaded["ema"])


@pytest.mark.parametrize("name, model_cls, n_params", [
    ("DDPM_ddpm", DDPM, 35_746_307), ("EDM_ddpm", EDM, 35_746_307), ("DDPM_ddpmpp", DDPM, 56_524_291),
    ("EDM_ddpmpp", EDM, 56_524_291), ("EDM_ddpmpp_aug", EDM, 56_525_443),
])
def test_registry_builds_every_shipped_config(name, model_cls, n_params):
    cfg = load_config(ROOT / "config" / f"{name}.yaml")
    diffusion = build_diffusion(cfg)
    assert type(diffusion) is model_cls
    assert count_parameters(diffusion) == n_params


def tiny_config(tmp_path, **network):
    text = (ROOT / "config" / "demo.yaml").read_text()
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    overrides = [f"network.{k}={v}" for k, v in network.items()] + [f"save_dir={tmp_path / 'run'}"]
    return load_config(path, overrides)


def test_our_checkpoint_round_trips_ema_and_online(tmp_path):
    cfg = tiny_config(tmp_path)
    torch.manual_seed(0)
    diffusion = build_diffusion(cfg)
    ema = make_ema(diffusion, 0.5)
    ema.update()
    with torch.no_grad():
        for p in diffusion.parameters():
            p.add_(0.01)
    ema.update()
    path = tmp_path / "model_0.pth"
    save_checkpoint({"MODEL": diffusion.state_dict(), "EMA": ema.state_dict(), "epoch": 0}, path)
    online = load_diffusion(cfg, path, "online")
    averaged = load_diffusion(cfg, path, "ema")
    for (name, p), q, r in zip(diffusion.named_parameters(), online.parameters(), averaged.parameters()):
        assert torch.equal(p, q), name
        assert torch.equal(ema.ema_model.state_dict()[name], r), name
    assert not online.training and not any(p.requires_grad for p in online.parameters())


def test_checkpoint_of_another_architecture_names_the_first_mismatching_key(tmp_path):
    cfg = tiny_config(tmp_path)
    with pytest.raises(UserError, match=r"original_ckpt_tiny_DDPM\.pth: key 'nn_model\.[^']+' .*--config"):
        load_diffusion(cfg, ORIGINAL_CKPT)


def test_file_that_is_not_a_checkpoint_is_a_one_line_error(tmp_path):
    cfg = tiny_config(tmp_path)
    bad = tmp_path / "notes.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(UserError, match="notes.pth") as err:
        load_diffusion(cfg, bad)
    assert "\n" not in str(err.value)


def test_dict_without_model_or_ema_is_rejected(tmp_path):
    cfg = tiny_config(tmp_path)
    path = tmp_path / "other.pth"
    save_checkpoint({"weights": torch.zeros(1)}, path)
    with pytest.raises(UserError, match="other.pth: no 'EMA' entry"):
        load_diffusion(cfg, path)


def test_a_schedule_other_than_the_trained_one_is_refused(tmp_path):
    cfg = load_config(ROOT / "config" / "demo.yaml")
    trained = build_diffusion(cfg)
    path = tmp_path / "model_0.pth"
    save_checkpoint({"MODEL": trained.state_dict(), "config": cfg.to_dict()}, path)
    load_diffusion(cfg, path)  # the same schedule loads
    shorter = load_config(ROOT / "config" / "demo.yaml", ["diffusion.n_T=100"])
    with pytest.raises(UserError, match=r"model_0.pth was trained with diffusion.n_T = 1000, but the config gives 100; "
                                        r"the model only knows its training schedule: drop the --set diffusion.n_T"):
        load_diffusion(shorter, path)
    save_checkpoint({"MODEL": trained.state_dict()}, path)  # no config recorded (the original code's): not checked
    load_diffusion(shorter, path)


def test_zero_terminal_snr_is_a_training_setting_and_only_ddaes_ancestral_sampler_refuses_it(tmp_path):
    """diffusion.zero_terminal_snr: alphabar_T is 0 and alphabar_1 unchanged; DDIM samples, the ancestral sampler
    (a step dividing by alpha_T = 0) is refused in one line; a checkpoint trained with it refuses a config without."""
    zero = ["diffusion.n_T=20", "diffusion.prediction=v"]
    cfg = load_config(ROOT / "config" / "demo.yaml", zero + ["diffusion.zero_terminal_snr=true"])
    trained, plain = build_diffusion(cfg).eval(), build_diffusion(load_config(ROOT / "config" / "demo.yaml", zero))
    assert trained.ddpm_alphabar_t[-1] == 0 and trained.ddpm_alphabar_t[1] == plain.ddpm_alphabar_t[1]
    assert torch.isfinite(trained.sample(2, (3, 16, 16), steps=4, eta=0.5)).all()
    with pytest.raises(UserError, match=r"^--mode DDPM: DDAE's ancestral sampler cannot run "
                                        r"diffusion.zero_terminal_snr: true \(its step at T divides by alpha_T = "
                                        r"0\); use --mode DDIM$"):
        trained.sampler_name({"mode": "DDPM", "steps": None, "eta": None})
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        trained.sample(2, (3, 16, 16), mode="DDPM")
    weighted = build_diffusion(load_config(ROOT / "config" / "demo.yaml", zero + ["diffusion.zero_terminal_snr=true",
                                                                              "diffusion.loss_weighting=min_snr"]))
    assert torch.isfinite(weighted(torch.rand(2, 3, 16, 16), t=torch.tensor([20, 20])))
    with pytest.raises(UserError, match=r"key 'diffusion.zero_terminal_snr' true gives snr = 0 at t = n_T, where "
                                        r"min_snr's weight for prediction eps is 0 / 0; use prediction v or x0"):
        load_config(ROOT / "config" / "demo.yaml", ["diffusion.zero_terminal_snr=true",
                                                     "diffusion.loss_weighting=min_snr"])
    path = tmp_path / "model_0.pth"
    save_checkpoint({"MODEL": trained.state_dict(), "config": cfg.to_dict()}, path)
    load_diffusion(cfg, path)
    with pytest.raises(UserError, match=r"trained with diffusion.zero_terminal_snr = True, but the config gives False"):
        load_diffusion(load_config(ROOT / "config" / "demo.yaml", zero), path)


def test_only_training_settings_are_refused_and_the_fix_names_where_the_value_came_from(tmp_path):
    small = ["network.image_shape=[3,16,16]", "network.ch_mults=[1,2]", "network.is_attn=[False,False]",
             "network.n_channels=32", "linear.blockname=out_2"]
    edm = load_config(ROOT / "config" / "EDM_ddpm.yaml", small)
    path = tmp_path / "model_0.pth"
    save_checkpoint({"MODEL": build_diffusion(edm).state_dict(), "config": edm.to_dict()}, path)
    for sampler_only in ("diffusion.sigma_max=40", "diffusion.rho=5", "diffusion.S_noise=1.0"):
        load_diffusion(load_config(ROOT / "config" / "EDM_ddpm.yaml", small + [sampler_only]), path)
    with pytest.raises(UserError, match=r"trained with diffusion.sigma_data = 0.5, but the config gives 0.4; .*"
                                        r"drop the --set diffusion.sigma_data override"):
        load_diffusion(load_config(ROOT / "config" / "EDM_ddpm.yaml", small + ["diffusion.sigma_data=0.4"]), path)

    ddpm = load_config(ROOT / "config" / "demo.yaml")
    save_checkpoint({"MODEL": build_diffusion(ddpm).state_dict(), "config": ddpm.to_dict()}, path)
    text = (ROOT / "config" / "demo.yaml").read_text().replace("n_T: 1000", "n_T: 100")
    (tmp_path / "short.yaml").write_text(text)
    with pytest.raises(UserError) as error:  # the value came from a file, not a --set: name the file
        load_diffusion(load_config(tmp_path / "short.yaml"), path)
    assert "--set" not in str(error.value)
    assert f"set diffusion.n_T: 1000 in {tmp_path / 'short.yaml'}, or use that run's config" in str(error.value)


def test_missing_ckpt_names_the_flag(tmp_path):
    cfg = load_config(ROOT / "config" / "demo.yaml", [f"save_dir={tmp_path}"])
    args = argparse.Namespace(ckpt=str(tmp_path / "nope.pth"), epoch=-1)
    with pytest.raises(UserError) as error:
        checkpoint_from_args(cfg, args)
    assert str(error.value).startswith(f"--ckpt {tmp_path / 'nope.pth'}: file not found; pass an existing checkpoint")
    assert "--epoch" not in str(error.value).split(";")[0]
