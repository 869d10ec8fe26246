"""The U-ViT of DDAE's sister codebase FutureXiang/Diffusion (model/uvit.py, net_type UViT): parity with its own
code on the golden tensors bench/uvit_golden.py recorded (output and every block, unconditional and
class-conditional), its config and checkpoint layout loading unchanged, training with its AdamW, the early stop,
the token features, and every evaluation script on a tiny U-ViT."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ema_pytorch import EMA
from PIL import Image

import export_features
import finetune
import knn
import linear
import noisy_classifier_DDAE
import sample
import train
from model.ddpm import DDPM
from model.models import build_diffusion, count_parameters, load_config, load_diffusion
from model.uvit import UViT
from tests.helpers import UVIT_GOLDEN, seeded_weights, sister_config, small_synthetic
from tests.launch import REPO
from utils.checkpoint import load_checkpoint
from utils.errors import UserError

CONFIG = REPO / "config" / "DDPM_uvit.yaml"
# The golden "uncond" layout as --set overrides of the shipped config.
TINY = ["network.image_shape=[3,8,8]", "network.embed_dim=32", "network.depth=6", "network.num_heads=4"]


def golden():
    return torch.load(UVIT_GOLDEN, weights_only=True)


def golden_network(g):
    """Our UViT of the golden layout with the seeded weights, loaded under the sister's names (strict)."""
    net = UViT(**g["network"]).eval()
    net.load_state_dict(seeded_weights(g["shapes"], g["seed"]), strict=True)
    return net


@pytest.mark.parametrize("layout", ["uncond", "plain", "cond"])
def test_output_and_every_block_equal_the_sister_code(layout):
    """The noise prediction and in_k / mid / out_k (its in_blocks.k-1, mid_block, out_blocks.k-1: their patch
    tokens) equal its network's; conditional: with labels, some dropped to the null label, and all null."""
    g = golden()[layout]
    net = golden_network(g)
    labels = dict(c=g["c"], drop_mask=g["drop_mask"]) if "c" in g else {}
    with torch.no_grad():
        out, activations = net(g["x"], g["t"], ret_activation=True, **labels)
        features = net.forward_features(g["x"], g["t"], net.block_names, **labels)
        again = net(g["x"], g["t"]) if labels else net(g["x"], g["t"][2:3])  # null labels; one t for all
    torch.testing.assert_close(out, g["out"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, g["out_null" if labels else "out_one_t"], rtol=1e-5, atol=1e-6)
    half = g["network"]["depth"] // 2
    theirs = [f"in_blocks.{k}" for k in range(half)] + ["mid_block"] + [f"out_blocks.{k}" for k in range(half)]
    assert list(g["blocks"]) == theirs
    assert net.block_names == [f"in_{k}" for k in range(1, half + 1)] + ["mid"] + \
        [f"out_{k}" for k in range(1, half + 1)]
    extras = 2 if labels else 1  # [label token,] time token before the patches
    for name, their_name in zip(net.block_names, theirs):
        torch.testing.assert_close(features[name], g["blocks"][their_name][:, extras:], rtol=1e-5, atol=1e-6,
                                   msg=f"{name} vs their {their_name}")
    assert list(activations) == net.grid_blocks == net.block_names  # --grid probes every block


def test_shipped_and_sister_configs_build_the_published_network_and_train_with_its_adamw(tmp_path, monkeypatch):
    """config/DDPM_uvit.yaml and the sister's own file (no linear section) build its 44.3M network, names and
    shapes recorded from its code; train.py steps with AdamW(weight_decay 0.03, betas (0.99, 0.999))."""
    published = golden()["published"]["uncond"]["shapes"]
    for path in (CONFIG, sister_config(tmp_path, "cifar_unconditional_vit.yaml")):
        cfg = load_config(path)
        with torch.device("meta"):
            net = build_diffusion(cfg).nn_model
        assert {k: list(v.shape) for k, v in net.state_dict().items()} == published
        assert count_parameters(net) == 44_255_328  # the sister README's 44.3M
        assert (cfg.optim, cfg.optim_args) == ("AdamW", {"weight_decay": 0.03, "betas": [0.99, 0.999]})
        assert (cfg.linear.timestep, cfg.linear.blockname) == (11, "mid")  # the sister's: probe_defaults
    with torch.device("meta"):
        conditional = UViT(**golden()["published"]["cond"]["network"])
    assert {k: list(v.shape) for k, v in conditional.state_dict().items()} == golden()["published"]["cond"]["shapes"]

    monkeypatch.setattr(train, "build_dataset", small_synthetic)
    sets = [*TINY, "dataset=synthetic", "batch_size=32", "n_epoch=1", "num_workers=0", f"save_dir={tmp_path / 'run'}",
            "diffusion.n_T=20", "n_sample=2"]
    args = train.parse_args(["--config", str(tmp_path / "cifar_unconditional_vit.yaml"), "--device", "cpu",
                             *[a for s in sets for a in ("--set", s)]])
    train.train(load_config(args.config, args.set), args)
    (saved,) = (tmp_path / "run" / "ckpts").glob("model_0.pth")
    group = load_checkpoint(saved)["opt"]["param_groups"][0]
    assert (group["weight_decay"], tuple(group["betas"])) == (0.03, (0.99, 0.999))
    assert group["decoupled_weight_decay"]  # AdamW, not Adam's L2 penalty


def sister_checkpoint(diffusion):
    """``diffusion``'s weights in the sister's train.py layout: DDP's 'module.' keys, an ema-pytorch EMA, 'opt'."""
    ema = EMA(diffusion, beta=0.9999, update_after_step=0, update_every=1)
    optimizer = torch.optim.AdamW(diffusion.parameters(), lr=1e-4, weight_decay=0.03, betas=(0.99, 0.999))
    return {"MODEL": {f"module.{k}": v for k, v in diffusion.state_dict().items()}, "EMA": ema.state_dict(),
            "opt": optimizer.state_dict()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The golden uncond weights as a sister-codebase checkpoint, and a tiny 8x8 image folder (2 classes)."""
    root = tmp_path_factory.mktemp("uvit")
    g = golden()["uncond"]
    torch.save(sister_checkpoint(DDPM(golden_network(g), n_T=1000)), root / "model_1299.pth")
    generator = np.random.default_rng(0)
    for split, count in (("train", 8), ("test", 4)):
        for label in ("cat", "dog"):
            (root / "images" / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = generator.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "images" / split / label / f"{i}.png")
    return root


def script_argv(root, *extra, sets=()):
    sets = [*TINY, "dataset=folder", "classes=2", f"save_dir={root / 'run'}", "num_workers=0", "linear.n_epoch=1",
            "linear.batch_size=8", *sets]
    return ["--config", str(CONFIG), *[a for s in sets for a in ("--set", s)], "--ckpt", str(root / "model_1299.pth"),
            "--device", "cpu", "--data_root", str(root / "images"), *extra]


def one_file(folder, pattern):
    (path,) = folder.glob(pattern)
    return path.read_text()


def test_sister_checkpoint_loads_its_ema_weights(tiny):
    """Its 'EMA' entry ('ema_model.nn_model.*') is what --ckpt loads; 'MODEL' ('module.nn_model.*') with online."""
    g = golden()["uncond"]
    cfg = load_config(CONFIG, TINY)
    for weights in ("ema", "online"):
        net = load_diffusion(cfg, str(tiny / "model_1299.pth"), weights).nn_model
        with torch.no_grad():
            torch.testing.assert_close(net(g["x"], g["t"]), g["out"], rtol=1e-5, atol=1e-6)


def test_feature_pass_stops_after_the_deepest_block_and_gives_tokens():
    g = golden()["uncond"]
    net = golden_network(g)
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in (net.mid_block, *net.out_blocks,
                                                                            net.final)]
    with torch.no_grad():
        early = net.forward_features(g["x"], g["t"], ["in_1", "in_3"])
    for hook in hooks:
        hook.remove()
    assert calls == [] and list(early) == ["in_1", "in_3"]
    assert early["in_3"].shape == (4, 16, 32) and net.feature_axis == -1  # (B, 8/2 * 8/2 patches, embed_dim)
    diffusion = DDPM(net, n_T=1000).eval()
    noise = torch.randn_like(g["x"])
    with torch.no_grad():
        pooled = diffusion.get_feature(g["x"], 11, name="out_2", noise=noise)
        tokens = diffusion.get_feature(g["x"], 11, name="out_2", noise=noise, tokens=True)
    assert pooled.shape == (4, 32) and tokens.shape == (4, 16, 32)
    torch.testing.assert_close(pooled, tokens.mean(dim=1))


def test_finetune_stages_hold_exactly_the_parameters_the_block_uses():
    net = golden_network(golden()["uncond"]).requires_grad_(True)
    for block in ("in_1", "mid", "out_1", "out_3"):
        net.zero_grad(set_to_none=True)
        net.forward_features(torch.randn(2, 3, 8, 8), torch.tensor([0.5]), [block])[block].square().sum().backward()
        used = {id(p) for p in net.parameters() if p.grad is not None}
        staged = {id(p) for _, modules in finetune.network_stages(net, block) for m in modules for p in m.parameters()}
        assert staged == used, block


def test_conditional_network_reads_the_null_label_and_drops_by_the_mask():
    g = golden()["cond"]
    net = golden_network(g)
    with torch.no_grad():
        null = net.forward_features(g["x"], g["t"], ["out_2"])["out_2"]
        dropped = net.forward_features(g["x"], g["t"], ["out_2"], c=g["c"], drop_mask=torch.ones(4))["out_2"]
        kept = net.forward_features(g["x"], g["t"], ["out_2"], c=g["c"], drop_mask=torch.zeros(4))["out_2"]
    torch.testing.assert_close(null, dropped, rtol=0, atol=0)
    assert (kept - null).abs().amax(dim=(1, 2)).min() > 0  # a kept label changes every image's features


def test_every_script_on_a_sister_checkpoint(tiny, tmp_path):
    """linear (every head, --grid), knn, export_features, finetune, noisy_classifier_DDAE and DDIM sampling."""
    run = tiny / "run"
    linear.main(linear.build_parser().parse_args(script_argv(tiny)))
    assert json.loads(one_file(run / "linear", "model_1299_sha*_t11_mid_ep1_lr0.001_bs8.json"))["test_images"] == 8
    every_block = {"in_1", "in_2", "in_3", "mid", "out_1", "out_2", "out_3"}
    small_head = ["linear.head_args.width=16", "linear.head_args.heads=2"]
    for head, cells in (("linear", None), ("attention", None), ("fusion", {"fused"})):
        sets = small_head if head != "linear" else []
        linear.main(linear.build_parser().parse_args(script_argv(tiny, "--grid", "--head", head, sets=sets)))
        name = "grid" if head == "linear" else f"grid_{head}-width16-heads2"
        result = json.loads(one_file(run / "linear", f"model_1299_sha*_{name}_ep1_lr0.001_bs8.json"))
        assert set(result["accuracy"]) == (cells or {"1", "11", "21"})
        if cells is None:
            assert all(set(row) == every_block for row in result["accuracy"].values())
    linear.main(linear.build_parser().parse_args(script_argv(tiny, "--head", "mlp")))
    assert json.loads(one_file(run / "linear", "model_1299_sha*_t11_mid_mlp_ep1_lr0.001_bs8.json"))["head"] == "mlp"

    knn.main(knn.build_parser().parse_args(script_argv(tiny, "--k", "3")))
    assert json.loads(one_file(run / "knn", "model_1299_sha*_t11_mid_k3_T0.07.json"))["test_images"] == 8

    export_features.main(export_features.build_parser().parse_args(
        script_argv(tiny, "--blocks", "in_1", "mid", "--out", str(tmp_path / "features"))))
    assert np.load(tmp_path / "features" / "in_1.npy").shape == (8, 32)

    finetune.main(finetune.build_parser().parse_args(
        script_argv(tiny, "--epochs", "1", "--batch_size", "8", "--layer_decay", "0.9")))
    assert json.loads(one_file(run / "finetune", "model_1299_sha*_t11_mid.json"))["test_images"] == 8

    noisy_classifier_DDAE.main(noisy_classifier_DDAE.parse_args(script_argv(tiny)))
    assert json.loads(one_file(run, "noisy_DDAE_ep1299_sha*/*.json"))["n_test_images"] == 8

    ddim = sample.main(sample.build_parser().parse_args(script_argv(tiny, "--n_samples", "2", "--steps", "2")))
    assert len(list(Path(ddim["out_dir"], "pngs").glob("*.png"))) == 2


def test_a_uvit_file_under_a_unet_config_is_refused_naming_the_config(tiny):
    with pytest.raises(UserError, match="holds UViT weights, but the config describes a UNet network.*"
                                        "config/cifar_unconditional_vit.yaml"):
        small_unet = ["network.n_channels=32", "network.ch_mults=[1]", "network.is_attn=[False]",
                      "linear.blockname=out_1"]
        load_diffusion(load_config(REPO / "config" / "DDPM_ddpm.yaml", small_unet), str(tiny / "model_1299.pth"))


@pytest.mark.parametrize("override, message", [
    ("network.patch_size=3", "key 'network.patch_size' must divide the image side 32"),
    ("network.num_heads=6", "key 'network.embed_dim' must be a multiple of network.num_heads (6)"),
    ("network.image_shape=[3,32,16]", "key 'network.image_shape' must be [C, H, H] (square images)"),
    ("network.depth=1", "key 'network.depth' must be at least 2"),
    ("network.n_classes=0", "key 'network.n_classes' must be -1 (unconditional) or a class count"),
    ("linear.blockname=out_7", "key 'linear.blockname' must name a block of this network"),
])
def test_config_refusals(override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(CONFIG, [override])
