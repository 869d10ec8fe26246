"""A diffusers UNet2DModel folder as --ckpt or net_type UNet2DModel (model/diffusers_unet.py): the
google/ddpm-cifar10-32 layout with random weights, its loss against diffusers' own, its in_k / mid / out_k,
every evaluation script on it, the schedules it maps, and the refusals."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image

import export_features
import finetune
import knn
import linear
import noisy_classifier_DDAE
import sample
import train
from model.models import build_diffusion, count_parameters, load_config, load_diffusion
from tests.helpers import interrupt_on_call
from tests.launch import REPO
from utils.errors import UserError

CONFIG = REPO / "config" / "DDPM_ddpm.yaml"
# google/ddpm-cifar10-32's UNet2DModel (its config.json, as the issue lists it).
CIFAR10_LAYOUT = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
    norm_num_groups=32, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1, time_embedding_type="positional",
    downsample_padding=0, dropout=0.1)
SMALL_LAYOUT = {**CIFAR10_LAYOUT, "block_out_channels": (16, 32, 32, 32), "norm_num_groups": 8}  # same blocks, fast


def ddpm_scheduler(**changes):
    return DDPMScheduler(**{"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                            "beta_schedule": "linear", **changes})


def save_pipeline(folder, layout, seed=0):
    torch.manual_seed(seed)
    unet = UNet2DModel(**layout).eval()
    DDPMPipeline(unet=unet, scheduler=ddpm_scheduler()).save_pretrained(folder)
    return unet


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A pipeline folder of the small layout, its UNet, and a tiny 32x32 image folder (2 classes)."""
    root = tmp_path_factory.mktemp("diffusers")
    unet = save_pipeline(root / "ddpm-small", SMALL_LAYOUT)
    generator = np.random.default_rng(0)
    for split, count in (("train", 8), ("test", 4)):
        for label in ("cat", "dog"):
            (root / "images" / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = generator.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "images" / split / label / f"{i}.png")
    return root, unet


def overrides(root):
    return ["dataset=folder", "classes=2", f"save_dir={root / 'run'}", "num_workers=0", "linear.n_epoch=1",
            "linear.batch_size=8"]


def script_argv(root, *extra):
    sets = [arg for override in overrides(root) for arg in ("--set", override)]
    return ["--config", str(CONFIG), *sets, "--ckpt", str(root / "ddpm-small"), "--device", "cpu",
            "--data_root", str(root / "images"), *extra]


def test_cifar10_layout_loss_equals_diffusers(tmp_path):
    """The official layout has our DDPM UNet's parameter count, and the loss at fixed (t, noise) is diffusers'."""
    unet = save_pipeline(tmp_path / "ddpm-cifar10-32", CIFAR10_LAYOUT)
    cfg = load_config(CONFIG, [])
    assert count_parameters(unet) == count_parameters(build_diffusion(cfg).nn_model) == 35_746_307
    diffusion = load_diffusion(cfg, str(tmp_path / "ddpm-cifar10-32"))

    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 32, 32, generator=generator)
    noise = torch.randn(4, 3, 32, 32, generator=generator)
    t_diffusers = torch.tensor([0, 10, 500, 999])
    scheduler = DDPMScheduler.from_pretrained(tmp_path / "ddpm-cifar10-32" / "scheduler")
    with torch.no_grad():
        theirs = F.mse_loss(unet(scheduler.add_noise(2 * x0 - 1, noise, t_diffusers), t_diffusers).sample, noise)
        ours = diffusion(x0, t=t_diffusers + 1, noise=noise)
    assert abs(ours.item() - theirs.item()) <= 1e-5 * theirs.item()

    # Same probe places as our UNet: every in_k, mid and out_k has the shape of ours (channels and resolution).
    x, ours_net = torch.randn(1, 3, 32, 32), build_diffusion(cfg).nn_model
    assert diffusion.nn_model.block_names == ours_net.block_names
    with torch.no_grad():
        mine = diffusion.nn_model.forward_features(x, torch.tensor([0.011]), ours_net.block_names)
        reference = ours_net.forward_features(x, torch.tensor([0.011]), ours_net.block_names)
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in reference.items()}


def test_wrapper_is_the_unet_and_stops_after_the_deepest_block(small):
    root, unet = small
    net = load_diffusion(load_config(CONFIG, []), str(root / "ddpm-small")).nn_model
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([1, 11, 1000])
    with torch.no_grad():
        out, activations = net(x, t / 1000, ret_activation=True)
        torch.testing.assert_close(out, unet(x, t - 1).sample, rtol=0, atol=1e-6)
        # Our t = 1 is their index 0; rounded, not truncated: t / 1000 * 1000 is 250.99998 in float32 at t = 251.
        t_ours = torch.tensor([1, 251, 502, 1000])
        assert net.timestep_index(t_ours / 1000, 4).tolist() == [0, 250, 501, 999]
        calls = []
        hooks = [block.register_forward_hook(lambda *_: calls.append(1)) for block in unet.up_blocks[2].resnets]
        features = net.forward_features(x, t / 1000, ["out_2", "out_6"])
        for hook in hooks:
            hook.remove()
    assert calls == [] and list(features) == ["out_2", "out_6"]  # up_blocks[2] holds out_7..out_9: not run
    torch.testing.assert_close(features["out_6"], activations["out_6"], rtol=0, atol=0)


def test_in_k_and_mid_are_the_down_pairs_and_the_middle_block_of_diffusers(small):
    """in_k is the k-th (resnet, attention) output of UNet2DModel's down path (its downsamplers' outputs
    skipped, as our UNet skips its Downsample), mid the middle block's output; a pass for in_3 stops there."""
    root, unet = small
    net = load_diffusion(load_config(CONFIG, []), str(root / "ddpm-small")).nn_model
    seen = {}
    hooks = [block.register_forward_hook(lambda module, args, out, i=i: seen.__setitem__(i, out[1]))
             for i, block in enumerate(unet.down_blocks)]
    hooks.append(unet.mid_block.register_forward_hook(lambda module, args, out: seen.__setitem__("mid", out)))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([11, 700])
    with torch.no_grad():
        unet(x, t - 1)
        expected = [state for i, block in enumerate(unet.down_blocks) for state in seen[i][:len(block.resnets)]]
        expected_mid = seen["mid"]
        features = net.forward_features(x, t / 1000, [f"in_{k}" for k in range(1, 9)] + ["mid"])
        seen.clear()
        net.forward_features(x, t / 1000, ["in_3"])
    for hook in hooks:
        hook.remove()
    assert len(expected) == 8
    for k, state in enumerate(expected, start=1):
        torch.testing.assert_close(features[f"in_{k}"], state, rtol=0, atol=1e-6)
    torch.testing.assert_close(features["mid"], expected_mid, rtol=0, atol=1e-6)
    assert "mid" not in seen  # in_3 is in down_blocks[1]: the middle block is not run


def test_finetune_stages_hold_exactly_the_parameters_the_block_uses(small):
    root, _ = small
    net = load_diffusion(load_config(CONFIG, []), str(root / "ddpm-small")).nn_model.requires_grad_(True)
    for block in ("in_1", "in_3", "in_8", "mid", "out_1", "out_7", "out_12"):
        net.zero_grad(set_to_none=True)
        net.forward_features(torch.randn(2, 3, 32, 32), torch.tensor([0.5]), [block])[block].square().sum().backward()
        used = {id(p) for p in net.parameters() if p.grad is not None}
        staged = {id(p) for _, modules in finetune.network_stages(net, block) for m in modules for p in m.parameters()}
        assert staged == used, block


def test_bare_folders_load_the_same_network(small, tmp_path):
    root, unet = small
    cfg = load_config(CONFIG, [])
    unet.save_pretrained(tmp_path / "safetensors")
    ddpm_scheduler().save_pretrained(tmp_path / "safetensors")  # scheduler_config.json beside config.json
    unet.save_pretrained(tmp_path / "bin", safe_serialization=False)  # diffusion_pytorch_model.bin, no scheduler
    # ... with the attention names of the older Hub files (google/ddpm-cifar10-32's era), which diffusers renames.
    weights = tmp_path / "bin" / "diffusion_pytorch_model.bin"
    old_names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    state = {}
    for key, value in torch.load(weights, weights_only=True).items():
        for new, old in old_names.items():
            key = key.replace(new, old)
        state[key] = value
    assert "up_blocks.2.attentions.0.proj_attn.weight" in state
    torch.save(state, weights)
    x0, noise = torch.rand(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    losses = [load_diffusion(cfg, str(folder))(x0, t=torch.tensor([5, 900]), noise=noise).item()
              for folder in (root / "ddpm-small", tmp_path / "safetensors", tmp_path / "bin")]
    assert losses[0] == losses[1] == losses[2]


def test_sampling_and_fid(small, monkeypatch, capsys):
    import fid
    from tests.helpers import RandomFeatures

    root, _ = small
    monkeypatch.setattr(fid, "load_inception", lambda device: RandomFeatures())  # no Inception weights here
    ddim = sample.main(sample.build_parser().parse_args(
        script_argv(root, "--n_samples", "3", "--steps", "2", "--fid", str(root / "images" / "test" / "cat"),
                    "--ref_cache", "", "--fid_workers", "0")))
    assert Path(ddim["out_dir"]).name == "EMAgenerated_ddpm-small_ddim_steps2_eta0.0"
    assert len(list(Path(ddim["out_dir"], "pngs").glob("*.png"))) == 3 and ddim["fid"] > 0
    ancestral = sample.main(sample.build_parser().parse_args(
        script_argv(root, "--n_samples", "2", "--mode", "DDPM", "--steps", "3")))
    assert Path(ancestral["out_dir"]).name == "EMAgenerated_ddpm-small_ddpm_steps3"
    assert len(list(Path(ancestral["out_dir"], "pngs").glob("*.png"))) == 2


def test_probes_knn_export_finetune_and_noisy_classifier(small, tmp_path):
    root, _ = small
    run = root / "run"
    linear.main(linear.build_parser().parse_args(script_argv(root)))
    one = json.loads(one_file(run / "linear", "ddpm-small_sha*_t11_out_6_ep1_lr0.001_bs8.json"))
    assert one["test_images"] == 8
    linear.main(linear.build_parser().parse_args(script_argv(root, "--grid")))
    grid = json.loads(one_file(run / "linear", "ddpm-small_sha*_grid_ep1_lr0.001_bs8.json"))
    assert set(grid["accuracy"]["21"]) == {f"out_{k}" for k in range(1, 13)}
    linear.main(linear.build_parser().parse_args(script_argv(root, "--grid", "--blocks", "in_3,mid,out_6")))
    chosen = json.loads(one_file(run / "linear", "ddpm-small_sha*_t1-11-21_in_3-mid-out_6_ep1_lr0.001_bs8.json"))
    assert set(chosen["accuracy"]["21"]) == {"in_3", "mid", "out_6"}

    knn.main(knn.build_parser().parse_args(script_argv(root, "--k", "3")))
    assert json.loads(one_file(run / "knn", "ddpm-small_sha*_t11_out_6_k3_T0.07.json"))["checkpoint"] == \
        str(root / "ddpm-small")

    export_features.main(export_features.build_parser().parse_args(
        script_argv(root, "--blocks", "out_6", "out_12", "--out", str(tmp_path / "features"))))
    assert np.load(tmp_path / "features" / "out_6.npy").shape == (8, 32)
    assert np.load(tmp_path / "features" / "out_12.npy").shape == (8, 16)

    finetune.main(finetune.build_parser().parse_args(
        script_argv(root, "--epochs", "1", "--batch_size", "8", "--layer_decay", "0.9")))
    tuned = json.loads(one_file(run / "finetune", "ddpm-small_sha*_t11_out_6.json"))
    assert tuned["test_images"] == 8

    noisy_classifier_DDAE.main(noisy_classifier_DDAE.parse_args(script_argv(root)))
    result = json.loads(one_file(run, "noisy_DDAE_ddpm-small_sha*/*.json"))
    assert result["n_test_images"] == 8


@pytest.mark.parametrize("head", ["attention", "fusion"])
def test_token_heads_on_a_folder_resume_to_the_straight_run(small, tmp_path, monkeypatch, head):
    root, _ = small
    argv = script_argv(root, "--grid", "--head", head, "--set", "linear.n_epoch=2", "--set", "linear.head_args.width=16",
                       "--set", f"save_dir={tmp_path}")
    linear.main(linear.build_parser().parse_args(argv + ["--tag", "straight"]))
    straight = json.loads((tmp_path / "linear" / "straight.json").read_text())
    assert straight["head"] == head and straight["test_images"] == 8
    if head == "fusion":  # one head over the 3 x 12 cells
        assert list(straight["accuracy"]) == ["fused"]
    else:
        assert sum(len(row) for row in straight["accuracy"].values()) == 3 * 12

    original = interrupt_on_call(monkeypatch, linear, "train_one_epoch")
    with pytest.raises(SystemExit):  # cli_entry's exit on Ctrl-C, after the first epoch's state was saved
        linear.main(linear.build_parser().parse_args(argv + ["--tag", "resumed"]))
    monkeypatch.setattr(linear, "train_one_epoch", original)
    linear.main(linear.build_parser().parse_args(argv + ["--tag", "resumed"]))
    resumed = json.loads((tmp_path / "linear" / "resumed.json").read_text())
    first, second = (torch.load(tmp_path / "linear" / f"{tag}.state.pth", weights_only=True)["heads"]
                     for tag in ("straight", "resumed"))
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert [e["test_accuracy"] for e in straight["epochs"]] == [e["test_accuracy"] for e in resumed["epochs"]]


def one_file(folder, pattern):
    """The text of the one file under ``folder`` matching ``pattern`` (results are named by the weights' hash)."""
    (path,) = folder.glob(pattern)
    return path.read_text()


def refusal(cfg, folder):
    with pytest.raises(UserError) as error:
        load_diffusion(cfg, str(folder))
    return str(error.value)


def test_missing_files_say_how_to_get_the_model(small, tmp_path, capsys):
    root, _ = small
    cfg = load_config(CONFIG, [])
    with pytest.raises(SystemExit) as stopped:  # through a script: one line, exit code 2
        knn.main(knn.build_parser().parse_args(["--config", str(CONFIG), "--ckpt", str(tmp_path / "absent"),
                                                "--device", "cpu"]))
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "absent: file not found" in err and "hf download google/ddpm-cifar10-32" in err

    folder = tmp_path / "copy"
    shutil.copytree(root / "ddpm-small", folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    message = refusal(cfg, folder)
    assert "unet has no diffusion_pytorch_model.safetensors" in message and "hf download" in message
    shutil.rmtree(folder / "scheduler")
    assert "no scheduler/scheduler_config.json" in refusal(cfg, folder)
    shutil.rmtree(folder / "unet")
    assert "model_index.json but no unet/config.json" in refusal(cfg, folder)
    (folder / "model_index.json").unlink()
    assert "without model_index.json or config.json" in refusal(cfg, folder)


def test_schedule_prediction_and_block_refusals(small, tmp_path):
    root, _ = small
    cfg = load_config(CONFIG, [])
    folder = tmp_path / "copy"
    shutil.copytree(root / "ddpm-small", folder)
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    original = json.loads(scheduler_file.read_text())

    scheduler_file.write_text(json.dumps({**original, "beta_schedule": "squaredcos_cap_v2"}))
    assert "beta_schedule 'squaredcos_cap_v2' is diffusion.schedule 'cosine', but the config gives 'linear'" in \
        refusal(cfg, folder)
    scheduler_file.write_text(json.dumps({**original, "beta_schedule": "scaled_linear"}))
    assert "beta_schedule 'scaled_linear' is diffusion.schedule 'scaled_linear', but the config gives 'linear'" \
        in refusal(cfg, folder)
    scheduler_file.write_text(json.dumps({**original, "beta_schedule": "sigmoid"}))
    assert "beta_schedule 'sigmoid' is not supported" in refusal(cfg, folder)
    scheduler_file.write_text(json.dumps({**original, "beta_end": 0.021}))
    message = refusal(cfg, folder)  # names both schedules
    assert "(linear betas 0.0001 .. 0.021 over 1000 steps) differs" in message and "alphabar at t = " in message
    assert "the config gives {'betas': [0.0001, 0.02], 'n_T': 1000, 'schedule': 'linear'}" in message
    # A config that gives that schedule loads it.
    assert load_diffusion(load_config(CONFIG, ["diffusion.betas=[1.0e-4,0.021]"]), str(folder)).betas == (1e-4, 0.021)
    scheduler_file.write_text(json.dumps(original))
    assert "has 1000 steps but diffusion.n_T is 100" in refusal(load_config(CONFIG, ["diffusion.n_T=100"]), folder)
    scheduler_file.write_text(json.dumps({**original, "prediction_type": "v_prediction"}))
    assert "the folder's prediction_type 'v_prediction' is diffusion.prediction 'v', but the config gives 'eps'; set " \
        "diffusion.prediction: v (or --set diffusion.prediction=v)" in refusal(cfg, folder)
    scheduler_file.write_text(json.dumps({**original, "prediction_type": "sample"}))
    assert "prediction_type 'sample' is diffusion.prediction 'x0', but the config gives 'v'" in \
        refusal(load_config(CONFIG, ["diffusion.prediction=v"]), folder)
    scheduler_file.write_text(json.dumps({**original, "prediction_type": "flow"}))
    assert "prediction_type 'flow' is not supported; DDAE's DDPM runs epsilon, sample, v_prediction" in \
        refusal(cfg, folder)
    # Zero terminal SNR is a setting of its own, not "alphabar at t = 666 differs".
    scheduler_file.write_text(json.dumps({**original, "rescale_betas_zero_snr": True}))
    message = refusal(cfg, folder)
    assert message.endswith("the folder's rescale_betas_zero_snr True is diffusion.zero_terminal_snr true, but the "
                            "config gives false; set diffusion.zero_terminal_snr: true (or --set "
                            "diffusion.zero_terminal_snr=true)") and "\n" not in message
    scheduler_file.write_text(json.dumps(original))
    assert "rescale_betas_zero_snr False is diffusion.zero_terminal_snr false, but the config gives true" in \
        refusal(load_config(CONFIG, ["diffusion.zero_terminal_snr=true"]), folder)
    scheduler_file.write_text(json.dumps(original))

    unet_file = folder / "unet" / "config.json"
    unet_config = json.loads(unet_file.read_text())
    unet_file.write_text(json.dumps({**unet_config, "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D",
                                                                       "SkipUpBlock2D"]}))
    assert "up_block_type 'SkipUpBlock2D' is not supported" in refusal(cfg, folder)
    unet_file.write_text(json.dumps(unet_config))
    assert "the UNet has blocks in_1..in_8, mid, out_1..out_12 but the config's network has in_1..in_6, mid, " \
        "out_1..out_9" in \
        refusal(load_config(CONFIG, ["network.n_blocks=2", "network.ch_mults=[1,2,2]",
                                     "network.is_attn=[False,True,False]"]), folder)
    assert "model_type: DDPM" in refusal(load_config(REPO / "config" / "EDM_ddpm.yaml", []), folder)


@pytest.mark.parametrize("beta_schedule, schedule, betas", [("squaredcos_cap_v2", "cosine", "[1.0e-4,0.02]"),
                                                            ("scaled_linear", "scaled_linear", "[0.00085,0.012]")])
def test_other_schedules_load_and_give_diffusers_loss(small, tmp_path, beta_schedule, schedule, betas):
    """A folder trained with diffusers' squaredcos_cap_v2 (scaled_linear) loads under diffusion.schedule: cosine
    (scaled_linear), and the loss at fixed (t, noise) is diffusers' own."""
    root, unet = small
    scheduler = ddpm_scheduler(beta_schedule=beta_schedule, beta_start=float(betas[1:-1].split(",")[0]),
                               beta_end=float(betas[1:-1].split(",")[1]))
    unet.save_pretrained(tmp_path / "bare")
    scheduler.save_pretrained(tmp_path / "bare")
    cfg = load_config(CONFIG, [f"diffusion.schedule={schedule}", f"diffusion.betas={betas}"])
    diffusion = load_diffusion(cfg, str(tmp_path / "bare"))
    x0, noise, t = torch.rand(3, 3, 32, 32), torch.randn(3, 3, 32, 32), torch.tensor([0, 400, 999])
    with torch.no_grad():
        theirs = F.mse_loss(unet(scheduler.add_noise(2 * x0 - 1, noise, t), t).sample, noise)
        ours = diffusion(x0, t=t + 1, noise=noise)
    assert abs(ours.item() - theirs.item()) <= 1e-5 * theirs.item()


PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}  # diffusers' prediction_type -> ours


def objective_sets(prediction_type, zero_snr):
    return [f"diffusion.prediction={PREDICTIONS[prediction_type]}"] + (["diffusion.zero_terminal_snr=true"] * zero_snr)


@pytest.mark.parametrize("prediction_type, zero_snr", [("v_prediction", False), ("sample", False),
                                                       ("v_prediction", True), ("epsilon", True)])
def test_v_sample_and_zero_snr_folders_give_diffusers_loss(small, tmp_path, prediction_type, zero_snr):
    """The loss of a folder whose scheduler predicts v or x0 (sample), with or without zero terminal SNR, at fixed
    (t, noise) is diffusers' own: add_noise, and the target get_velocity (v), the image (sample) or the noise."""
    root, unet = small
    scheduler = ddpm_scheduler(prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr)
    unet.save_pretrained(tmp_path / "bare")
    scheduler.save_pretrained(tmp_path / "bare")
    diffusion = load_diffusion(load_config(CONFIG, objective_sets(prediction_type, zero_snr)), str(tmp_path / "bare"))
    generator = torch.Generator().manual_seed(1)
    x0, noise = torch.rand(3, 3, 32, 32, generator=generator), torch.randn(3, 3, 32, 32, generator=generator)
    t = torch.tensor([0, 600, 999])  # 999: alphabar 0 under zero terminal SNR, x_t is the noise
    x = 2 * x0 - 1
    target = {"epsilon": noise, "sample": x, "v_prediction": scheduler.get_velocity(x, noise, t)}[prediction_type]
    with torch.no_grad():
        theirs = F.mse_loss(unet(scheduler.add_noise(x, noise, t), t).sample, target)
        ours = diffusion(x0, t=t + 1, noise=noise)
    assert abs(ours.item() - theirs.item()) <= 1e-5 * theirs.item()


def test_every_script_runs_a_zero_snr_v_prediction_folder(small, tmp_path, capsys):
    """A v_prediction folder with rescale_betas_zero_snr loads through linear, knn, export_features, finetune,
    noisy_classifier_DDAE, sample (both samplers) and train.py (a config naming it as its network) once the config
    says diffusion.prediction: v and zero_terminal_snr: true; without them every script stops with the one line."""
    root, unet = small
    folder = tmp_path / "ddpm-v"
    shutil.copytree(root / "ddpm-small", folder)
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler_file.write_text(json.dumps({**json.loads(scheduler_file.read_text()), "prediction_type": "v_prediction",
                                          "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}))
    sets = [a for o in overrides(tmp_path) + objective_sets("v_prediction", True) for a in ("--set", o)]
    argv = ["--config", str(CONFIG), *sets, "--ckpt", str(folder), "--device", "cpu", "--data_root",
            str(root / "images")]
    run = tmp_path / "run"
    linear.main(linear.build_parser().parse_args(argv))
    assert json.loads(one_file(run / "linear", "ddpm-v_sha*_t11_out_6_ep1_lr0.001_bs8.json"))["test_images"] == 8
    knn.main(knn.build_parser().parse_args(argv + ["--k", "3"]))
    assert json.loads(one_file(run / "knn", "ddpm-v_sha*_t11_out_6_k3_T0.07.json"))["test_images"] == 8
    export_features.main(export_features.build_parser().parse_args(argv + ["--blocks", "out_6", "--out",
                                                                           str(tmp_path / "features")]))
    assert np.load(tmp_path / "features" / "out_6.npy").shape == (8, 32)
    finetune.main(finetune.build_parser().parse_args(argv + ["--epochs", "1", "--batch_size", "8"]))
    assert json.loads(one_file(run / "finetune", "ddpm-v_sha*_t11_out_6.json"))["test_images"] == 8
    noisy_classifier_DDAE.main(noisy_classifier_DDAE.parse_args(argv))
    assert json.loads(one_file(run, "noisy_DDAE_ddpm-v_sha*/*.json"))["n_test_images"] == 8
    for flags in (["--steps", "2", "--eta", "0.5"], ["--mode", "DDPM", "--steps", "2"]):
        sampled = sample.main(sample.build_parser().parse_args(argv + ["--n_samples", "2", *flags]))
        assert len(list(Path(sampled["out_dir"], "pngs").glob("*.png"))) == 2
        recorded = json.loads(Path(sampled["out_dir"], "sampling.json").read_text())
        assert "timestep_spacing='trailing'" in recorded["sampler"] and recorded["diffusion"]["prediction"] == "v"

    config = tmp_path / "DDPM_v.yaml"
    settings = yaml.safe_load(CONFIG.read_text())
    config.write_text(yaml.safe_dump({**settings, "net_type": "UNet2DModel", "network": {"folder": str(folder)},
                                      "diffusion": {**settings["diffusion"], "prediction": "v",
                                                    "zero_terminal_snr": True}}))
    train.train(load_config(config, overrides(tmp_path) + ["n_epoch=1", "batch_size=8", "n_sample=1"]),
                train.parse_args(["--config", str(config), "--device", "cpu", "--data_root", str(root / "images")]))
    trained = load_diffusion(load_config(config, overrides(tmp_path)), str(run / "ckpts" / "model_0.pth"))
    assert trained.prediction == "v" and trained.ddpm_alphabar_t[-1] == 0

    default = ["--config", str(CONFIG), *[a for o in overrides(tmp_path) for a in ("--set", o)], "--ckpt",
               str(folder), "--device", "cpu", "--data_root", str(root / "images")]
    for extra, message in (([], "the folder's prediction_type 'v_prediction' is diffusion.prediction 'v', but the "
                                "config gives 'eps'; set diffusion.prediction: v"),
                           (["--set", "diffusion.prediction=v"], "the folder's rescale_betas_zero_snr True is "
                            "diffusion.zero_terminal_snr true, but the config gives false")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as stopped:
            knn.main(knn.build_parser().parse_args(default + extra))
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and err.count("\n") == 1 and message in err


def test_a_config_names_the_folder_as_its_network(small, tmp_path):
    """net_type UNet2DModel builds the folder's UNet (from_settings) under every script; train.py starts
    from its weights; a missing folder is the config's one-line error."""
    root, unet = small
    config = tmp_path / "DDPM_diffusers.yaml"
    settings = {**yaml.safe_load(CONFIG.read_text()), "net_type": "UNet2DModel",
                "network": {"folder": str(root / "ddpm-small")}}
    config.write_text(yaml.safe_dump(settings))
    cfg = load_config(config, overrides(root))
    diffusion = build_diffusion(cfg)
    assert torch.equal(diffusion.nn_model.unet.conv_in.weight, unet.conv_in.weight)
    assert diffusion.nn_model.block_names == load_diffusion(cfg, str(root / "ddpm-small")).nn_model.block_names

    args = train.parse_args(["--config", str(config), "--device", "cpu", "--data_root", str(root / "images"),
                             *[a for o in overrides(root) for a in ("--set", o)], "--set", "n_epoch=1",
                             "--set", "batch_size=8", "--set", f"save_dir={tmp_path / 'trained'}"])
    train.train(load_config(args.config, args.set), args)
    trained = tmp_path / "trained" / "ckpts" / "model_0.pth"
    knn.main(knn.build_parser().parse_args(["--config", str(config), "--ckpt", str(trained), "--device", "cpu",
                                            "--data_root", str(root / "images"), "--k", "3",
                                            *[a for o in overrides(root) for a in ("--set", o)]]))
    assert json.loads(one_file(root / "run" / "knn", "model_0_sha*_t11_out_6_k3_T0.07.json"))["test_images"] == 8

    with pytest.raises(UserError, match=r"key 'network.folder' must be a diffusers UNet2DModel folder, got "
                                        r"'absent' \(no such folder\); get a model with `hf download"):
        load_config(config, ["network.folder=absent"])
