"""OpenAI's ADM UNet (model/adm.py, net_type ADM): parity with OpenAI's own code on the golden tensors that
bench/adm_golden.py recorded (loss, network output, every block, learned-variance posterior) in the layouts
of improved-diffusion's CIFAR-10 and guided-diffusion's 256x256 models, the published files' parameter names,
the early stop, bf16, every script on a plain OpenAI-layout state dict, and the refusals."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import export_features
import finetune
import knn
import linear
import noisy_classifier_DDAE
import sample
from evaluation.cells import probe_cells
from evaluation.frozen import prepare_frozen
from model.adm import ADM
from model.ddpm import DDPM
from model.models import build_diffusion, count_parameters, load_config, load_diffusion
from tests.helpers import ADM_GOLDEN, CPU, interrupt_on_call, seeded_weights
from tests.launch import REPO
from utils.checkpoint import load_checkpoint
from utils.data import config_splits, probe_train_transform
from utils.errors import UserError

CIFAR_CONFIG = REPO / "config" / "ADM_improved_cifar10.yaml"
IMAGENET_CONFIG = REPO / "config" / "ADM_guided_256_uncond.yaml"
TOL = dict(rtol=1e-5, atol=1e-5)


def one_file(folder, pattern):
    """The text of the one file under ``folder`` matching ``pattern`` (results are named by the weights' hash)."""
    (path,) = folder.glob(pattern)
    return path.read_text()


def golden(layout):
    return torch.load(ADM_GOLDEN[layout], weights_only=True)


def golden_network(g):
    """Our ADM of the golden flags with the seeded weights, loaded under OpenAI's names (strict)."""
    net = ADM(**g["network"]).eval()
    net.load_state_dict(seeded_weights(g["shapes"], g["seed"]), strict=True)
    return net


@pytest.mark.parametrize("layout", ["improved", "guided", "new_order"])
def test_loss_output_and_blocks_equal_openai(layout):
    """At our t = their index + 1: the loss is their training_losses' MSE term, the network output (noise and
    variance channels) theirs, and every input_k / middle / output_k feature their block's output, pooled."""
    g = golden(layout)
    net = ADM(**g["network"])
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == g["shapes"]  # OpenAI's names and shapes
    diffusion = DDPM(golden_network(g), **g["diffusion"]).eval()
    t = g["index"] + 1
    # improved-diffusion's cosine betas (betas_for_alpha_bar, max_beta 0.999) are ours bit for bit; our linear
    # schedule is float32 (the original DDAE's), theirs float64
    exact = g["diffusion"]["schedule"] == "cosine"
    torch.testing.assert_close(diffusion.perturb(2 * g["x0"] - 1, t, g["noise"]), g["x_t"], rtol=0,
                               atol=0 if exact else 1e-5)
    with torch.no_grad():
        loss = diffusion(g["x0"], t=t, noise=g["noise"])
        eps, v = diffusion.nn_model(g["x_t"], t / diffusion.n_T, with_variance=True)
        features = diffusion.get_feature(g["x0"], t, name=diffusion.nn_model.block_names, noise=g["noise"])
    assert abs(loss.item() - g["mse"].mean().item()) <= 1e-5 * g["mse"].mean().item()
    torch.testing.assert_close(eps if v is None else torch.cat([eps, v], dim=1), g["out"], **TOL)
    assert list(features) == list(g["pooled"])
    for name, expected in g["pooled"].items():
        torch.testing.assert_close(features[name], expected, rtol=1e-5, atol=1e-4, msg=name)


@pytest.mark.parametrize("layout", ["improved", "guided"])
def test_learned_variance_posterior_equals_openai(layout):
    """The ancestral sampler's step (mean of the clipped x0 posterior, log-variance interpolated by v between
    beta and beta-tilde, the first step's clipped) is their p_mean_variance at every recorded index."""
    g = golden(layout)
    diffusion = DDPM(golden_network(g), **g["diffusion"]).eval()
    steps = diffusion.learned_variance_steps(list(range(1, diffusion.n_T + 1)))
    for row, index in enumerate(g["index"].tolist()):
        with torch.no_grad():
            mean, log_variance = diffusion.learned_variance_step(g["x_t"][row:row + 1], steps[index])
        torch.testing.assert_close(mean, g["p_mean"][row:row + 1], **TOL)
        torch.testing.assert_close(log_variance, g["p_log_variance"][row:row + 1], **TOL)


@pytest.mark.parametrize("config, layout, n_params", [(CIFAR_CONFIG, "improved", 52_546_438),
                                                      (IMAGENET_CONFIG, "guided", 552_814_086)])
def test_shipped_configs_have_the_published_files_names_and_shapes(config, layout, n_params):
    """Built from the shipped config (on the meta device), the network has exactly the parameter names and
    shapes of OpenAI's network for the published flags (recorded with their code), so the file loads."""
    cfg = load_config(config, [])
    with torch.device("meta"):
        net = build_diffusion(cfg).nn_model
    published = golden(layout)["published"]
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == published["shapes"]
    assert count_parameters(net) == n_params


def test_feature_pass_stops_after_the_deepest_block_and_bf16_is_close():
    g = golden("guided")
    net = golden_network(g)
    x, t = g["x_t"], torch.tensor([0.001, 0.5, 1.0])
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in (net.middle_block, *net.output_blocks)]
    with torch.no_grad():
        early = net.forward_features(x, t, ["input_1", "input_4"])
        for hook in hooks:
            hook.remove()
        full, activations = net(x, t, ret_activation=True)
        every = net.forward_features(x, t, net.block_names)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x, t)
    assert calls == [] and list(early) == ["input_1", "input_4"]
    torch.testing.assert_close(early["input_4"], every["input_4"], rtol=0, atol=0)
    assert sorted(activations) == sorted(net.grid_blocks) == sorted(k for k in every if k.startswith("output_"))
    assert low.dtype == torch.bfloat16
    assert (low.float() - full).abs().max() <= 0.05 * full.abs().max()


def test_finetune_stages_hold_exactly_the_parameters_the_block_uses():
    net = golden_network(golden("guided")).requires_grad_(True)
    for block in ("input_0", "input_3", "middle", "output_0", "output_8"):
        net.zero_grad(set_to_none=True)
        net.forward_features(torch.randn(2, 3, 32, 32), torch.tensor([0.5]), [block])[block].square().sum().backward()
        used = {id(p) for p in net.parameters() if p.grad is not None}
        staged = {id(p) for _, modules in finetune.network_stages(net, block) for m in modules for p in m.parameters()}
        assert staged == used, block


# Every script on the improved-diffusion layout (32x32, 4000 cosine steps) as a plain state dict .pt.
TINY = ["network.num_channels=32", "network.num_res_blocks=1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The golden improved-layout weights as OpenAI's file format, and a tiny 32x32 image folder (2 classes)."""
    root = tmp_path_factory.mktemp("adm")
    g = golden("improved")
    torch.save(seeded_weights(g["shapes"], g["seed"]), root / "cifar10_tiny.pt")
    generator = np.random.default_rng(0)
    for split, count in (("train", 8), ("test", 4)):
        for label in ("cat", "dog"):
            (root / "images" / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = generator.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "images" / split / label / f"{i}.png")
    return root


def script_argv(root, *extra, config=CIFAR_CONFIG, ckpt="cifar10_tiny.pt"):
    sets = [*TINY, "dataset=folder", "classes=2", f"save_dir={root / 'run'}", "num_workers=0", "linear.n_epoch=1",
            "linear.batch_size=8"]
    return ["--config", str(config), *[a for s in sets for a in ("--set", s)], "--ckpt", str(root / ckpt),
            "--device", "cpu", "--data_root", str(root / "images"), *extra]


def test_plain_openai_file_loads_and_matches_golden(tiny):
    g = golden("improved")
    diffusion = load_diffusion(load_config(CIFAR_CONFIG, TINY), str(tiny / "cifar10_tiny.pt"))
    with torch.no_grad():
        loss = diffusion(g["x0"], t=g["index"] + 1, noise=g["noise"])
    assert abs(loss.item() - g["mse"].mean().item()) <= 1e-5 * g["mse"].mean().item()


def test_sampling_ddim_ancestral_and_fid(tiny, monkeypatch):
    import fid
    from tests.helpers import RandomFeatures

    monkeypatch.setattr(fid, "load_inception", lambda device: RandomFeatures())  # no Inception weights here
    ddim = sample.main(sample.build_parser().parse_args(
        script_argv(tiny, "--n_samples", "3", "--steps", "2", "--fid", str(tiny / "images" / "test" / "cat"),
                    "--ref_cache", "", "--fid_workers", "0")))
    assert Path(ddim["out_dir"]).name == "EMAgenerated_cifar10_tiny_ddim_steps2_eta0.0"
    assert len(list(Path(ddim["out_dir"], "pngs").glob("*.png"))) == 3 and ddim["fid"] > 0
    ancestral = sample.main(sample.build_parser().parse_args(
        script_argv(tiny, "--n_samples", "2", "--mode", "DDPM", "--steps", "3")))
    assert len(list(Path(ancestral["out_dir"], "pngs").glob("*.png"))) == 2
    recorded = json.loads(Path(ancestral["out_dir"], "sampling.json").read_text())["sampler"]
    assert recorded == "DDAE DDPM, learned variance"  # never mixed with fixed-variance images


def test_learned_variance_sampler_uses_v():
    """With v = +1 the ancestral step's variance is beta, with v = -1 beta-tilde (the network's own v decides)."""
    g = golden("improved")
    diffusion = DDPM(golden_network(g), **g["diffusion"]).eval()
    step = diffusion.learned_variance_steps([1, 2000, 4000])[1]
    for bound, expected in ((1.0, step[4]), (-1.0, step[5])):
        diffusion.nn_model.forward = lambda x, t, with_variance=False, b=bound: \
            (torch.zeros_like(x), torch.full_like(x, b))
        _, log_variance = diffusion.learned_variance_step(torch.zeros(1, 3, 32, 32), step)
        torch.testing.assert_close(log_variance, torch.full_like(log_variance, expected))


def test_probes_knn_export_finetune_and_noisy_classifier(tiny, tmp_path):
    run = tiny / "run"
    linear.main(linear.build_parser().parse_args(script_argv(tiny)))
    one = json.loads(one_file(run / "linear", "cifar10_tiny_sha*_t92_output_7_ep1_lr0.001_bs8.json"))
    assert one["test_images"] == 8
    linear.main(linear.build_parser().parse_args(script_argv(tiny, "--grid")))
    grid = json.loads(one_file(run / "linear", "cifar10_tiny_sha*_grid_ep1_lr0.001_bs8.json"))
    assert set(grid["accuracy"]["174"]) == {f"output_{k}" for k in range(8)}
    linear.main(linear.build_parser().parse_args(script_argv(tiny, "--grid", "--blocks", "input_2,middle")))
    chosen = json.loads(one_file(run / "linear", "cifar10_tiny_sha*_t9-92-174_input_2-middle_ep1_lr0.001_bs8.json"))
    assert chosen["timesteps"] == [9, 92, 174]  # the noise levels of DDAE's 1, 11, 21 on the cosine schedule
    assert set(chosen["accuracy"]["174"]) == {"input_2", "middle"}

    knn.main(knn.build_parser().parse_args(script_argv(tiny, "--k", "3", "--precision", "bf16")))
    assert json.loads(one_file(run / "knn", "cifar10_tiny_sha*_t92_output_7_k3_T0.07_bf16.json"))["test_images"] == 8

    export_features.main(export_features.build_parser().parse_args(
        script_argv(tiny, "--blocks", "output_7", "middle", "--out", str(tmp_path / "features"))))
    assert np.load(tmp_path / "features" / "output_7.npy").shape == (8, 32)  # the last block here
    assert np.load(tmp_path / "features" / "middle.npy").shape == (8, 64)

    finetune.main(finetune.build_parser().parse_args(
        script_argv(tiny, "--epochs", "1", "--batch_size", "8", "--layer_decay", "0.9")))
    assert json.loads(one_file(run / "finetune", "cifar10_tiny_sha*_t92_output_7.json"))["test_images"] == 8

    noisy_classifier_DDAE.main(noisy_classifier_DDAE.parse_args(script_argv(tiny)))
    result = json.loads(one_file(run, "noisy_DDAE_cifar10_tiny_sha*/*.json"))
    assert result["n_test_images"] == 8


SMALL_HEAD = ["linear.head_args.width=16", "linear.head_args.heads=2"]
SMALL_HEAD_FLAGS = [arg for value in SMALL_HEAD for arg in ("--set", value)]


def test_linear_py_runs_every_head_on_a_plain_openai_file(tiny):
    """linear.py as a user types it, --head attention / fusion --grid and --head mlp, on OpenAI's layout."""
    run = tiny / "heads_run"
    base = [sys.executable, "linear.py", *script_argv(tiny), "--set", f"save_dir={run}"]
    every_output, grid_run = {f"output_{k}" for k in range(8)}, None
    for flags, name, cells in (
            (["--head", "attention", "--grid", *SMALL_HEAD_FLAGS], "grid_attention-width16-heads2",
             {"9": every_output, "92": every_output, "174": every_output}),
            (["--head", "fusion", "--grid", *SMALL_HEAD_FLAGS], "grid_fusion-width16-heads2", {"fused": None}),
            (["--head", "mlp"], "t92_output_7_mlp", {"92": {"output_7"}})):
        done = subprocess.run(base + flags, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        grid_run = done if flags[1] == "attention" else grid_run
        result = json.loads(one_file(run / "linear", f"cifar10_tiny_sha*_{name}_ep1_lr0.001_bs8.json"))
        assert result["test_images"] == 8 and result["head"] == flags[1]
        assert {t: set(row) if isinstance(row, dict) else None for t, row in result["accuracy"].items()} == cells
    assert "timestep(s) 9, 92, 174 x 8 block(s)" in grid_run.stdout  # the grid is said before the probe


def test_attention_head_on_an_openai_file_resumes_to_the_straight_run(tiny, monkeypatch):
    """An exact resume of a token head on ADM's features (their own layout, an input and an output block)."""
    cfg = load_config(CIFAR_CONFIG, [*TINY, *SMALL_HEAD, "dataset=folder", "classes=2", "linear.head=attention",
                                     "linear.n_epoch=2", "linear.batch_size=8"])
    splits = config_splits(cfg, str(tiny / "images"), probe_train_transform(32))
    timesteps, _ = probe_cells(cfg, grid=True)

    def probe(out_dir):
        diffusion = prepare_frozen(load_diffusion(cfg, str(tiny / "cifar10_tiny.pt")), CPU)
        return linear.run_probe(cfg, diffusion, *splits, timesteps, ["input_2", "output_7"], CPU, out_dir, "probe")

    straight = probe(tiny / "straight")
    original = interrupt_on_call(monkeypatch, linear, "train_one_epoch")
    with pytest.raises(KeyboardInterrupt):
        probe(tiny / "resumed")
    monkeypatch.setattr(linear, "train_one_epoch", original)
    resumed = probe(tiny / "resumed")
    first, second = (load_checkpoint(tiny / run / "probe.state.pth")["heads"] for run in ("straight", "resumed"))
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
    assert [(e["train_loss"], e["test_accuracy"]) for e in straight["epochs"]] == \
           [(e["train_loss"], e["test_accuracy"]) for e in resumed["epochs"]]


# The guided-diffusion 256x256 layout, shrunk to 32x32 and 3 levels (the golden "guided" network).
GUIDED_TINY = ["network.image_size=32", "network.channel_mult=1,1,2", "network.num_channels=32",
               "network.num_head_channels=32"]


def test_guided_layout_runs_through_the_256_config(tiny, tmp_path):
    """The shipped 256x256 config, shrunk by --set to the golden guided layout, loads that layout's plain .pt; the
    probe resizes and centre-crops a folder of 48x40 images to 32x32; linear, export and ancestral sampling run."""
    g = golden("guided")
    torch.save(seeded_weights(g["shapes"], g["seed"]), tmp_path / "guided_tiny.pt")
    generator = np.random.default_rng(1)
    for split, count in (("train", 4), ("val", 2)):
        for label in ("n01", "n02"):
            (tmp_path / "imagenet" / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = generator.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "imagenet" / split / label / f"{i}.JPEG")
    sets = [*GUIDED_TINY, "classes=2", f"save_dir={tmp_path / 'run'}", "num_workers=0", "linear.n_epoch=1",
            "linear.batch_size=4", "linear.blockname=output_5"]
    argv = ["--config", str(IMAGENET_CONFIG), *[a for s in sets for a in ("--set", s)], "--ckpt",
            str(tmp_path / "guided_tiny.pt"), "--device", "cpu", "--data_root", str(tmp_path / "imagenet")]
    linear.main(linear.build_parser().parse_args([*argv, "--grid", "--blocks", "input_3,output_5"]))
    grid = json.loads(one_file(tmp_path / "run" / "linear",
                               "guided_tiny_sha*_t1-11-21_input_3-output_5_ep1_lr0.001_bs4.json"))
    assert set(grid["accuracy"]["11"]) == {"input_3", "output_5"} and grid["test_images"] == 4
    export_features.main(export_features.build_parser().parse_args(
        [*argv, "--blocks", "output_8", "--out", str(tmp_path / "features")]))
    assert np.load(tmp_path / "features" / "output_8.npy").shape == (4, 32)
    ancestral = sample.main(sample.build_parser().parse_args([*argv, "--n_samples", "2", "--mode", "DDPM",
                                                              "--steps", "2"]))
    assert len(list(Path(ancestral["out_dir"], "pngs").glob("*.png"))) == 2


def refusal(config, overrides, path):
    with pytest.raises(UserError) as error:
        load_diffusion(load_config(config, overrides), str(path))
    return str(error.value)


def test_files_of_another_layout_are_refused_naming_the_key_and_the_config(tiny, tmp_path, capsys):
    # the CIFAR-10 layout under the full-size CIFAR-10 config: the first differing shape, and the configs to use
    message = refusal(CIFAR_CONFIG, [], tiny / "cifar10_tiny.pt")
    assert "key 'time_embed.0.weight' has shape (128, 32) in the checkpoint but (512, 128)" in message
    assert "config/ADM_improved_cifar10.yaml for cifar10_uncond_50M_500K.pt" in message
    # the guided layout (resblock_updown, 3 levels) under the CIFAR-10 layout's config: the first missing key
    g = golden("guided")
    torch.save(seeded_weights(g["shapes"], g["seed"]), tmp_path / "guided_tiny.pt")
    message = refusal(CIFAR_CONFIG, TINY, tmp_path / "guided_tiny.pt")
    assert "guided_tiny.pt: key 'input_blocks.2.0.op.weight' is missing" in message
    # an ADM file under a config of our UNet, through a script: one line, exit code 2
    with pytest.raises(SystemExit) as stopped:
        knn.main(knn.build_parser().parse_args(["--config", str(REPO / "config" / "DDPM_ddpm.yaml"), "--ckpt",
                                                str(tiny / "cifar10_tiny.pt"), "--device", "cpu"]))
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds ADM weights, but the config describes a UNet network" in err
    assert "config/ADM_guided_256_uncond.yaml for 256x256_diffusion_uncond.pt" in err


def test_attention_resolutions_takes_an_int_as_openais_flag_does():
    from model.models import build_network

    as_int, as_text = (load_config(CIFAR_CONFIG, [*TINY, f"network.attention_resolutions={value}"])
                       for value in ("16", "'16'"))
    assert as_int.network.attention_resolutions == 16
    assert str(build_network(as_int)) == str(build_network(as_text))  # attention at 16x16 only, in both
    default = str(build_network(load_config(CIFAR_CONFIG, TINY)))  # "16,8"
    assert 1 < str(build_network(as_int)).count("AttentionBlock(") < default.count("AttentionBlock(")
    with pytest.raises(UserError, match="key 'network.attention_resolutions' must be comma-separated divisors of "
                                        "image_size 32 .*, got int 7 .from --set network.attention_resolutions=7."):
        load_config(CIFAR_CONFIG, ["network.attention_resolutions=7"])


def test_a_truncated_openai_file_is_told_to_be_downloaded_again(tiny, tmp_path, capsys):
    truncated = tmp_path / "cifar10_uncond_50M_500K.pt"
    truncated.write_bytes((tiny / "cifar10_tiny.pt").read_bytes()[:5000])
    with pytest.raises(SystemExit) as stopped:
        knn.main(knn.build_parser().parse_args(script_argv(tiny, ckpt=truncated)))
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {truncated} is not a readable PyTorch checkpoint (")
    assert err.endswith("); it is truncated or damaged: download or copy it again\n")


@pytest.mark.parametrize("override, message", [
    ("network.diffusion_steps=1000", "key 'network.diffusion_steps' must equal diffusion.n_T (4000)"),
    ("network.class_cond=True", "key 'network.class_cond' must be False"),
    ("network.channel_mult=", "no default for image_size 48"),
    ("network.attention_resolutions=16;8", "key 'network.attention_resolutions' must be comma-separated divisors"),
    ("network.num_heads=3", "key 'network.num_heads' must divide every width"),
    ("model_type=EDM", "key 'model_type' must be DDPM for net_type ADM"),
])
def test_config_refusals(override, message):
    extra = {"network.channel_mult=": ["network.image_size=48"], "model_type=EDM": ["diffusion={}"]}
    overrides = [override, *extra.get(override, [])]
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(CIFAR_CONFIG, overrides)
