"""DiT parity with the golden vectors (network, schedule, feature), the early stop, configs and the loader."""
from pathlib import Path

import pytest
import torch

from model.dit import DiT, DiTDiffusion, linear_alphas_cumprod
from model.models import build_diffusion, count_parameters, feature_dims, load_config, load_diffusion
from tests.helpers import golden_dit, save_golden_weights, write_tiny_config
from utils.cli import checkpoint_from_args
from utils.config import save_config
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TOL = dict(rtol=1e-5, atol=1e-5)


def test_network_matches_golden():
    g = golden_dit()
    net = DiT(**g["kwargs"]).eval()
    torch.testing.assert_close(net.pos_embed.data, g["state_dict"]["pos_embed"], rtol=0, atol=1e-6)  # fixed sin-cos
    net.load_state_dict(g["state_dict"], strict=True)
    assert count_parameters(net) == g["n_params"]
    with torch.no_grad():
        out, activations = net(g["x"], g["t"], g["y"], ret_activation=True)
        null_label_out = net(g["x"], g["t"])  # y=None is the null class
    torch.testing.assert_close(out, g["out"], **TOL)
    torch.testing.assert_close(null_label_out, g["out"], **TOL)
    assert sorted(activations) == sorted(g["activations"]) == net.block_names
    for name, expected in g["activations"].items():
        torch.testing.assert_close(activations[name], expected, **TOL, msg=name)


def test_schedule_and_feature_match_golden():
    g = golden_dit()
    diffusion = DiTDiffusion(DiT(**g["kwargs"])).eval()
    diffusion.nn_model.load_state_dict(g["state_dict"])
    assert diffusion.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(diffusion.alphas_cumprod, g["alphas_cumprod"], rtol=0, atol=1e-12)
    torch.testing.assert_close(linear_alphas_cumprod(), g["alphas_cumprod"], rtol=0, atol=1e-12)
    feature = g["feature"]
    t = torch.full((2,), feature["t"])
    torch.testing.assert_close(diffusion.q_sample(g["x"], t, feature["noise"]), feature["x_t"], **TOL)
    with torch.no_grad():
        value = diffusion.get_feature(g["x"], feature["t"], name=feature["block"], noise=feature["noise"])
        as_tensor_t = diffusion.get_feature(g["x"], t, name=[feature["block"]], norm=True, noise=feature["noise"])
    torch.testing.assert_close(value, feature["value"], **TOL)
    torch.testing.assert_close(as_tensor_t[feature["block"]], torch.nn.functional.normalize(feature["value"]), **TOL)
    with pytest.raises(ValueError, match="outside 0..999"):
        diffusion.get_feature(g["x"], 1000, name="layer-0")


def test_feature_pass_stops_after_the_deepest_block_needed():
    g = golden_dit()
    net = DiT(**g["kwargs"]).eval()
    net.load_state_dict(g["state_dict"])
    called = []
    hooks = [module.register_forward_hook(lambda module, args, out: called.append(module))
             for module in [*net.blocks, net.final_layer]]
    with torch.no_grad():
        features = net.forward_features(g["x"], g["t"], ["layer-1", "layer-0"])
    for hook in hooks:
        hook.remove()
    assert called == [net.blocks[0], net.blocks[1]]
    for name in ("layer-0", "layer-1"):
        torch.testing.assert_close(features[name], g["activations"][name], **TOL)
    with pytest.raises(ValueError, match="unknown block 'out_1'"):
        net.forward_features(g["x"], g["t"], ["out_1"])


def test_shipped_configs_build_dit_xl_2(tmp_path):
    for name, timestep, classes in (("DiT_XL_2_cifar", 121, 10), ("DiT_XL_2_tinyimagenet", 81, 200)):
        cfg = load_config(ROOT / "config" / f"{name}.yaml", allow_dit=True)
        assert (cfg.linear.timestep, cfg.linear.blockname, cfg.classes) == (timestep, "layer-13", classes)
        with torch.device("meta"):  # the 675M values are not allocated
            diffusion = build_diffusion(cfg)
        assert type(diffusion) is DiTDiffusion and type(diffusion.nn_model) is DiT
        assert count_parameters(diffusion) == 675_129_632  # SPEC §12, pos_embed included
        assert diffusion.nn_model.block_names[-1] == "layer-27"
    saved = save_config(cfg, tmp_path / "config.yaml")  # as a run folder records it
    assert load_config(saved, allow_dit=True) == cfg


def test_dit_config_errors(tmp_path):
    path = write_tiny_config(tmp_path)
    with pytest.raises(UserError, match="model_type DiT is a pre-trained network evaluated on cached latents; "
                                        "use it with linear.py"):
        load_config(path)  # e.g. train.py, which cannot train it
    with pytest.raises(UserError, match=r"key 'linear.blockname' must name a block of this network "
                                        r"\(layer-0, layer-1, layer-2\), got 'out_6'"):
        load_config(path, ["linear.blockname=out_6"], allow_dit=True)
    with pytest.raises(UserError, match=r"key 'linear.timestep' must be in 0..999 \(DiT's timesteps"):
        load_config(path, ["linear.timestep=1000"], allow_dit=True)
    with pytest.raises(UserError, match=r"key 'latents.image_size' must be 8 x network.input_size \(64\)"):
        load_config(path, ["latents.image_size=256"], allow_dit=True)
    with pytest.raises(UserError, match=r"unknown key 'network.n_blocks'"):
        load_config(path, ["network.n_blocks=2"], allow_dit=True)
    with pytest.raises(UserError, match=r"key 'latents.dtype' must be one of float16, float32, got 'int8'"):
        load_config(path, ["latents.dtype=int8"], allow_dit=True)


class Args:
    ckpt = None
    epoch = -1


def test_released_plain_state_dict_loads_through_the_one_loader(tmp_path):
    path = write_tiny_config(tmp_path)
    cfg = load_config(path, allow_dit=True)
    with pytest.raises(UserError, match=rf"DiT checkpoint {tmp_path / 'dit.pt'} not found; download "
                                        r"https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt .* and put it at "):
        checkpoint_from_args(cfg, Args())
    save_golden_weights(tmp_path / "dit.pt")
    diffusion = load_diffusion(cfg, checkpoint_from_args(cfg, Args()))
    g = golden_dit()
    with torch.no_grad():
        torch.testing.assert_close(diffusion.nn_model(g["x"], g["t"], g["y"]), g["out"], **TOL)
    assert feature_dims(diffusion, cfg.image_shape) == {f"layer-{k}": 64 for k in range(3)}

    other = Args()
    other.ckpt = str(tmp_path / "other.pt")
    state = golden_dit()["state_dict"]
    state["blocks.0.attn.qkv.weight"] = state["blocks.0.attn.qkv.weight"][:96]
    torch.save(state, other.ckpt)
    with pytest.raises(UserError, match=r"other.pt: key 'blocks.0.attn.qkv.weight' has shape \(96, 64\)"):
        load_diffusion(cfg, checkpoint_from_args(cfg, other))


def test_a_dit_under_a_unet_config_and_the_reverse_name_the_network_and_the_config(tmp_path):
    from tests.helpers import make_checkpoint, make_config
    from utils.errors import UserError

    dit_file = save_golden_weights(tmp_path / "dit.pt")
    unet_cfg, _ = make_config(tmp_path)
    with pytest.raises(UserError) as refused:
        load_diffusion(unet_cfg, dit_file)
    assert str(refused.value) == (
        f"{dit_file} holds DiT weights, but the config describes a UNet network; evaluate it with a config with "
        f"model_type: DiT (e.g. config/DiT_XL_2_cifar.yaml), in linear.py, knn.py or export_features.py")
    unet_file = make_checkpoint(unet_cfg, 3)  # a train.py checkpoint
    dit_cfg = load_config(write_tiny_config(tmp_path), allow_dit=True)
    with pytest.raises(UserError) as refused:
        load_diffusion(dit_cfg, unet_file)
    assert str(refused.value) == (
        f"{unet_file} holds UNet weights, but the config describes a DiT network; evaluate it with the DDPM or EDM "
        f"config it was trained with (e.g. config/DDPM_ddpm.yaml)")
