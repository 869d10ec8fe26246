"""sample.py: folders and files of the original, per-image seeds (any batch size, 1 or 2 processes), resume,
settings guard, the original's checkpoint, and fp32 vs bf16 autocast."""
import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from model.amp import autocast
from model.ema import make_ema
from model.models import build_diffusion, load_config, load_diffusion
from model.noise import PerImageNoise
from tests.helpers import make_checkpoint, tmpfs
from tests.launch import LAUNCHER_VARS, REPO, run_two_processes
from utils.checkpoint import save_checkpoint
from utils.errors import UserError
from utils.images import to_uint8

GOLDEN = Path(__file__).parent / "golden"

TINY_NETWORK = "{image_shape: [3, 8, 8], n_channels: 32, ch_mults: [1], is_attn: [True], dropout: 0.1, n_blocks: 1}"
TINY = """\
model_type: {model_type}
network: {network}
batch_size: 4
n_epoch: 3
lrate: 1.0e-4
warm_epoch: 1
ema: 0.9
save_dir: {save_dir}
linear: {{timestep: 4, blockname: out_1}}
"""


@pytest.fixture(autouse=True)
def plain_python(monkeypatch):
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)


def make_run(folder, model_type, extra=""):
    """A tiny config and a checkpoint laid out as train.py writes it (EMA different from the online weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"tiny_{model_type}.yaml"
    config.write_text(TINY.format(model_type=model_type, network=TINY_NETWORK, save_dir=folder / "run") + extra)
    cfg = load_config(config)
    torch.manual_seed(0)
    diffusion = build_diffusion(cfg)
    ema = make_ema(diffusion, cfg.ema)
    ema.update()  # the EMA copies the initial weights
    with torch.no_grad():
        for parameter in diffusion.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    ema.update()
    save_checkpoint({"MODEL": diffusion.state_dict(), "EMA": ema.state_dict(), "opt": {}, "epoch": 2,
                     "config": cfg.to_dict()}, folder / "run" / "ckpts" / "model_2.pth")
    return config


@pytest.fixture(scope="module")
def ddpm_config(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("ddpm"), "DDPM", "diffusion: {n_T: 20, betas: [1.0e-4, 0.02]}\n")


@pytest.fixture(scope="module")
def edm_config(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("edm"), "EDM")


def run_sample(config, *flags):
    args = sample.build_parser().parse_args(["--config", str(config), "--device", "cpu", *map(str, flags)])
    return sample.main(args)


def folder_bytes(folder):
    """{relative path: bytes} of the images under ``folder``."""
    folder = Path(folder)
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*.png"))}


def read_pixels(path):
    return torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1)  # (3, H, W) uint8


def test_folder_names_follow_the_original():
    assert sample.epoch_label("out/ckpts/model_400.pth") == "ep400"
    assert sample.epoch_label("weights/best.pth") == "best"
    assert sample.folder_name("ep400", {"mode": "DDIM", "steps": 100, "eta": 0.0}) == \
        "EMAgenerated_ep400_ddim_steps100_eta0.0"
    assert sample.folder_name("ep400", {"mode": "DDPM", "steps": None, "eta": None}) == "EMAgenerated_ep400_ddpm"
    assert sample.folder_name("ep400", {"mode": "DDPM", "steps": 50, "eta": None}) == \
        "EMAgenerated_ep400_ddpm_steps50"
    assert sample.folder_name("ep1999", {"mode": "EDM", "steps": 18, "eta": 1.0}) == \
        "EMAgenerated_ep1999_edm_steps18_eta1.0"


def test_defaults_are_the_original_run(ddpm_config, edm_config):
    args = sample.build_parser().parse_args(["--config", "c.yaml"])
    assert (args.batch_size, args.seed, args.mode, args.epoch) == (400, 0, "DDIM", -1)
    ddpm, edm = load_config(ddpm_config), load_config(edm_config)
    cifar = load_config(REPO / "config" / "DDPM_ddpm.yaml")
    assert sample.sample_count(args, cifar) == 50_000  # the original's 125 batches of 400
    assert sample.sample_count(args, load_config(REPO / "config" / "demo.yaml")) == 400  # not CIFAR: one batch
    assert sample.sample_count(sample.build_parser().parse_args(["--config", "c", "--batches", "3"]), cifar) == 1200
    assert sample.sampler_settings(cifar, "DDIM", None, None) == {"mode": "DDIM", "steps": 100, "eta": 0.0}
    assert sample.sampler_settings(edm, "DDIM", None, None) == {"mode": "EDM", "steps": 18, "eta": 0.0}
    assert sample.sampler_settings(ddpm, "DDPM", None, None) == {"mode": "DDPM", "steps": None, "eta": None}
    assert sample.sampler_settings(ddpm, "DDPM", 7, None) == {"mode": "DDPM", "steps": 7, "eta": None}
    with pytest.raises(UserError, match=r"--eta 0.7: the ancestral sampler \(--mode DDPM\) always draws full noise"):
        sample.sampler_settings(ddpm, "DDPM", 7, 0.7)
    with pytest.raises(UserError, match="--steps 1: respaced ancestral sampling takes 2 to n_T = 20 steps"):
        sample.sampler_settings(ddpm, "DDPM", 1, None)
    with pytest.raises(UserError, match="^--n_samples -5: pass a positive number of images$"):
        sample.sample_count(sample.build_parser().parse_args(["--config", "c", "--n_samples", "-5"]), cifar)
    with pytest.raises(UserError, match="--steps 21: DDIM takes 1 to n_T = 20 steps"):
        sample.sampler_settings(ddpm, "DDIM", 21, 0.0)
    with pytest.raises(UserError, match=r"^DDIM's default of 100 steps is more than diffusion.n_T = 20; pass --steps N "
                                         r"with N from 1 to 20$"):  # names no --steps the user did not type
        sample.sampler_settings(ddpm, "DDIM", None, 0.0)
    with pytest.raises(UserError, match="--mode DDPM is the ancestral sampler of DDPM configs"):
        sample.sampler_settings(edm, "DDPM", None, 0.0)
    with pytest.raises(UserError, match="--eta 1.5"):
        sample.sampler_settings(edm, "DDIM", None, 1.5)


def test_image_seeds_differ_in_the_bits_a_cpu_generator_uses():
    seeds = [sample.image_seed(seed, index) for seed in (0, 1) for index in range(5000)]
    assert len({value % 2 ** 32 for value in seeds}) == len(seeds)  # a CPU generator keeps only 32 bits
    first = PerImageNoise([sample.image_seed(0, 3), sample.image_seed(1, 3)], "cpu")((3, 2, 2))
    assert not torch.equal(first[0], first[1])


def test_layout_and_pixels_are_the_ema_sampler_with_per_image_noise(ddpm_config):
    result = run_sample(ddpm_config, "--n_samples", 403, "--steps", 2, "--batch_size", 101)
    out = Path(result["out_dir"])
    assert out == ddpm_config.parent / "run" / "EMAgenerated_ep2_ddim_steps2_eta0.0"
    assert result["generated"] == 403 and len(os.listdir(out / "pngs")) == 403
    assert sorted(name for name in os.listdir(out) if name != "pngs") == ["grid_0.png", "grid_1.png",
                                                                          "sampling.json"]
    grid = read_pixels(out / "grid_0.png")
    assert grid.shape == (3, 2 + 20 * 10, 2 + 20 * 10)  # 400 images of 8x8, 20 per row, 2-pixel padding
    for index in (0, 19, 20, 399):
        row, column = divmod(index, 20)
        tile = grid[:, 2 + 10 * row:10 + 10 * row, 2 + 10 * column:10 + 10 * column]
        assert torch.equal(tile, read_pixels(out / "pngs" / f"{index}.png"))
    assert read_pixels(out / "grid_1.png").shape == (3, 12, 32)  # the last 3 images
    settings = json.loads((out / "sampling.json").read_text())
    assert {k: settings[k] for k in ("mode", "steps", "eta", "seed", "precision", "n_samples")} == \
        {"mode": "DDIM", "steps": 2, "eta": 0.0, "seed": 0, "precision": "fp32", "n_samples": 403}
    assert settings["checkpoint"] == str(ddpm_config.parent / "run" / "ckpts" / "model_2.pth")
    # image i is the EMA model's DDIM sample from the noise of image_seed(0, i), whatever its batch
    cfg = load_config(ddpm_config)
    picked = [5, 250, 402]
    for weights in ("ema", "online"):
        diffusion = load_diffusion(cfg, settings["checkpoint"], weights=weights)
        noise = PerImageNoise([sample.image_seed(0, i) for i in picked], "cpu")
        expected = to_uint8(diffusion.sample(len(picked), (3, 8, 8), steps=2, noise=noise))
        found = torch.stack([read_pixels(out / "pngs" / f"{i}.png") for i in picked])
        assert torch.equal(found, expected) == (weights == "ema")


def test_ddim_steps_that_do_not_divide_n_T_run_end_to_end(ddpm_config, tmp_path):
    # n_T = 20, 3 steps: stride 6, timesteps 19, 13, 7, 1, then 0 (SPEC §3), so 4 network calls.
    result = run_sample(ddpm_config, "--n_samples", 3, "--steps", 3, "--batch_size", 3, "--out_dir", tmp_path / "out")
    settings = json.loads((tmp_path / "out" / "sampling.json").read_text())
    assert result["generated"] == 3 and settings["steps"] == 3
    diffusion = load_diffusion(load_config(ddpm_config), settings["checkpoint"])
    seen = []
    diffusion.nn_model.register_forward_hook(lambda module, inputs, out: seen.append(round(inputs[1][0].item() * 20)))
    expected = to_uint8(diffusion.sample(3, (3, 8, 8), steps=3, noise=PerImageNoise(
        [sample.image_seed(0, i) for i in range(3)], "cpu")))
    assert seen == [19, 13, 7, 1]
    found = torch.stack([read_pixels(tmp_path / "out" / "pngs" / f"{i}.png") for i in range(3)])
    assert torch.equal(found, expected)


def test_batch_size_does_not_change_the_files(ddpm_config, tmp_path):
    outputs = []
    for batch_size in (2, 3):
        out = tmp_path / f"batch{batch_size}"
        run_sample(ddpm_config, "--n_samples", 7, "--steps", 4, "--eta", 1.0, "--batch_size", batch_size,
                   "--out_dir", out)
        outputs.append(folder_bytes(out))
    assert len(outputs[0]) == 7 + 1 and outputs[0] == outputs[1]


def test_compiled_runs_pad_the_last_batch_and_keep_the_files(ddpm_config, tmp_path, monkeypatch):
    """With --compile every forward pass has the full batch (one compiled shape); the padding images
    are dropped and the kept files are those of an uncompiled run."""
    flags = ["--n_samples", 7, "--steps", 4, "--eta", 1.0, "--batch_size", 3]
    run_sample(ddpm_config, *flags, "--out_dir", tmp_path / "eager")
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: compiled.append(kwargs.get("mode")))
    sizes = []
    draw = sample.draw_images
    monkeypatch.setattr(sample, "draw_images", lambda *args: sizes.append(args[3]) or draw(*args))
    result = run_sample(ddpm_config, *flags, "--compile", "reduce-overhead", "--out_dir", tmp_path / "compiled")
    assert compiled == ["reduce-overhead"] and sizes == [3, 3, 3] and result["generated"] == 7
    assert folder_bytes(tmp_path / "compiled") == folder_bytes(tmp_path / "eager")
    assert sorted(os.listdir(tmp_path / "compiled" / "pngs")) == sorted(f"{i}.png" for i in range(7))
    sizes.clear()  # a run smaller than one batch is not padded up to it
    run_sample(ddpm_config, "--n_samples", 2, "--steps", 2, "--batch_size", 3, "--compile", "--out_dir",
               tmp_path / "small")
    assert sizes == [2]


def test_one_and_two_processes_write_the_same_files(ddpm_config, tmp_path):
    flags = ["--n_samples", "7", "--steps", "4", "--eta", "1.0", "--batch_size", "2", "--seed", "5"]
    run_sample(ddpm_config, *flags, "--out_dir", tmp_path / "one")
    result = run_two_processes(REPO / "sample.py", "--config", ddpm_config, "--device", "cpu", *flags,
                               "--out_dir", tmp_path / "two", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 x cpu" in result.stdout
    one, two = folder_bytes(tmp_path / "one"), folder_bytes(tmp_path / "two")
    assert len(one) == 7 + 1 and one == two
    settings = [json.loads((tmp_path / name / "sampling.json").read_text()) for name in ("one", "two")]
    records = [one_settings.pop("provenance") for one_settings in settings]  # what ran differs: the processes
    assert settings[0] == settings[1] and [record["processes"] for record in records] == [1, 2]


@pytest.mark.cpu_only
@pytest.mark.parametrize("batch_size", [3, 400])
def test_python_and_torchrun_write_the_same_bytes_in_every_run(tmp_path, batch_size):
    """The README's promise on the demo config (DDIM 5 steps, seed 3, 10 images): `python sample.py` with torch's
    default threads and torchrun's two processes write the same bytes, in each of three runs. 10 images split
    unevenly: batches of 3 (two a process, the last of 1) or one batch of 10 (all on one process)."""
    config = REPO / "config" / "demo.yaml"
    make_checkpoint(load_config(config, [f"save_dir={tmp_path / 'run'}"]), 14)
    flags = ["--config", config, "--set", f"save_dir={tmp_path / 'run'}", "--epoch", 14, "--n_samples", 10,
             "--steps", 5, "--seed", 3, "--batch_size", batch_size, "--device", "cpu"]
    plain = {key: value for key, value in os.environ.items() if key not in (*LAUNCHER_VARS, "OMP_NUM_THREADS")}
    for attempt in range(3):
        one, two = tmp_path / f"one_{attempt}", tmp_path / f"two_{attempt}"
        result = subprocess.run([sys.executable, "sample.py", *map(str, flags), "--out_dir", str(one)], cwd=REPO,
                                env=plain, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        result = run_two_processes(REPO / "sample.py", *flags, "--out_dir", two, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert len(folder_bytes(one)) == 10 + 1 and folder_bytes(one) == folder_bytes(two), f"run {attempt + 1}"


def test_rerun_makes_only_the_missing_images(ddpm_config, tmp_path):
    out = tmp_path / "run"
    flags = ["--n_samples", 9, "--steps", 3, "--batch_size", 4, "--out_dir", out]
    assert run_sample(ddpm_config, *flags)["generated"] == 9
    before = folder_bytes(out)
    times = {path: (out / path).stat().st_mtime_ns for path in before}
    for path in ("pngs/2.png", "pngs/7.png", "grid_0.png"):
        (out / path).unlink()
    (out / "pngs" / ".8.png.4242.tmp").write_bytes(b"truncated by a kill")
    assert run_sample(ddpm_config, *flags)["generated"] == 2
    assert folder_bytes(out) == before
    assert not any(name.endswith(".tmp") for name in os.listdir(out / "pngs"))
    untouched = [path for path in before if path not in ("pngs/2.png", "pngs/7.png", "grid_0.png")]
    assert all((out / path).stat().st_mtime_ns == times[path] for path in untouched)
    assert run_sample(ddpm_config, *flags)["generated"] == 0
    # asking for more images extends the same run: image i is the same whatever n_samples is
    assert run_sample(ddpm_config, *flags[2:], "--n_samples", 11)["generated"] == 2
    assert all(folder_bytes(out)[path] == before[path] for path in before if path.startswith("pngs/"))


def test_a_folder_from_before_the_sampler_record_resumes(ddpm_config, tmp_path):
    """A sampling.json without "sampler" (written before it was recorded) was made by DDAE's samplers: a rerun
    of a DDAE checkpoint continues it."""
    out = tmp_path / "old"
    flags = ["--n_samples", 3, "--steps", 2, "--out_dir", out]
    run_sample(ddpm_config, *flags)
    settings = json.loads((out / "sampling.json").read_text())
    assert settings.pop("sampler") == "DDAE DDIM"
    (out / "sampling.json").write_text(json.dumps(settings))
    (out / "pngs" / "1.png").unlink()
    assert run_sample(ddpm_config, *flags)["generated"] == 1


def test_a_folder_from_before_a_diffusion_key_resumes_at_its_default(ddpm_config, tmp_path, capsys):
    """A sampling.json whose diffusion section predates a key (``prediction``, ``zero_terminal_snr``) was made at
    the key's default: a rerun at the default continues it, one at another value is refused."""
    out = tmp_path / "old"
    flags = ["--n_samples", 3, "--steps", 2, "--out_dir", out]
    run_sample(ddpm_config, *flags)
    settings = json.loads((out / "sampling.json").read_text())
    assert settings["diffusion"].pop("prediction") == "eps"
    assert settings["diffusion"].pop("zero_terminal_snr") is False
    (out / "sampling.json").write_text(json.dumps(settings))
    (out / "pngs" / "1.png").unlink()
    assert run_sample(ddpm_config, *flags)["generated"] == 1
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:  # DDIM runs a zero-terminal-SNR schedule: other pixels, refused
        run_sample(ddpm_config, *flags, "--set", "diffusion.zero_terminal_snr=true")
    assert stop.value.code == 2 and "zero_terminal_snr" in capsys.readouterr().err


def test_other_settings_never_mix_into_a_folder(ddpm_config, tmp_path, capsys):
    out = tmp_path / "run"
    run_sample(ddpm_config, "--n_samples", 2, "--steps", 2, "--out_dir", out)
    before = folder_bytes(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_sample(ddpm_config, "--n_samples", 4, "--steps", 2, "--seed", 1, "--out_dir", out)
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert f"error: {out} holds images sampled with seed=0, but this run has seed=1; pass --out_dir" in error
    with pytest.raises(UserError, match="steps=2, but this run has steps=4"):
        sample.run(sample.build_parser().parse_args(
            ["--config", str(ddpm_config), "--n_samples", "2", "--steps", "4", "--out_dir", str(out)]),
            torch.device("cpu"))
    assert folder_bytes(out) == before
    foreign = tmp_path / "foreign"
    (foreign / "pngs").mkdir(parents=True)
    shutil.copy(out / "pngs" / "0.png", foreign / "pngs" / "0.png")
    with pytest.raises(UserError, match="holds 1 images but no sampling.json says how they were made"):
        sample.run(sample.build_parser().parse_args(
            ["--config", str(ddpm_config), "--n_samples", "2", "--steps", "2", "--out_dir", str(foreign)]),
            torch.device("cpu"))


def test_ancestral_and_edm_samplers(ddpm_config, edm_config):
    out = Path(run_sample(ddpm_config, "--mode", "DDPM", "--n_samples", 2)["out_dir"])
    assert out.name == "EMAgenerated_ep2_ddpm"
    diffusion = load_diffusion(load_config(ddpm_config), ddpm_config.parent / "run" / "ckpts" / "model_2.pth")
    noise = PerImageNoise([sample.image_seed(0, i) for i in range(2)], "cpu")
    expected = to_uint8(diffusion.sample(2, (3, 8, 8), mode="DDPM", noise=noise))
    assert torch.equal(torch.stack([read_pixels(out / "pngs" / f"{i}.png") for i in range(2)]), expected)
    # --steps with --mode DDPM: respaced ancestral sampling, in a folder of its own
    result = run_sample(ddpm_config, "--mode", "DDPM", "--steps", 5, "--n_samples", 2)
    out = Path(result["out_dir"])
    assert out.name == "EMAgenerated_ep2_ddpm_steps5"
    assert json.loads((out / "sampling.json").read_text())["steps"] == 5
    noise = PerImageNoise([sample.image_seed(0, i) for i in range(2)], "cpu")
    respaced = to_uint8(diffusion.sample(2, (3, 8, 8), mode="DDPM", steps=5, noise=noise))
    assert torch.equal(torch.stack([read_pixels(out / "pngs" / f"{i}.png") for i in range(2)]), respaced)
    assert not torch.equal(respaced, expected)

    out = Path(run_sample(edm_config, "--steps", 3, "--eta", 1.0, "--n_samples", 3, "--channels_last")["out_dir"])
    assert out.name == "EMAgenerated_ep2_edm_steps3_eta1.0"
    diffusion = load_diffusion(load_config(edm_config), edm_config.parent / "run" / "ckpts" / "model_2.pth")
    noise = PerImageNoise([sample.image_seed(0, i) for i in range(3)], "cpu")
    expected = to_uint8(diffusion.sample(3, (3, 8, 8), steps=3, eta=1.0, noise=noise))
    found = torch.stack([read_pixels(out / "pngs" / f"{i}.png") for i in range(3)])
    assert (found.int() - expected.int()).abs().max() <= 1  # channels-last convolutions round differently


def test_checkpoint_of_the_original_code(tmp_path):
    expect = torch.load(GOLDEN / "original_ckpt_tiny_DDPM.expect.pt", weights_only=True)
    config = tmp_path / "original.yaml"  # JSON is YAML: the network section of the original's run
    config.write_text(TINY.format(model_type="DDPM", network=json.dumps(expect["config"]), save_dir=tmp_path / "run"))
    result = run_sample(config, "--ckpt", GOLDEN / "original_ckpt_tiny_DDPM.pth", "--n_samples", 2, "--steps", 5)
    out = Path(result["out_dir"])
    assert out.name == "EMAgenerated_original_ckpt_tiny_DDPM_ddim_steps5_eta0.0"
    # the EMA network of that file is the one that gave the golden ema_out
    diffusion = load_diffusion(load_config(config), GOLDEN / "original_ckpt_tiny_DDPM.pth")
    assert torch.allclose(diffusion.nn_model(expect["x"], expect["t"]), expect["ema_out"], atol=1e-5)
    noise = PerImageNoise([sample.image_seed(0, i) for i in range(2)], "cpu")
    expected = to_uint8(diffusion.sample(2, (3, 16, 16), steps=5, noise=noise))
    assert torch.equal(torch.stack([read_pixels(out / "pngs" / f"{i}.png") for i in range(2)]), expected)


@pytest.mark.parametrize("model_type", ["DDPM", "EDM"])
def test_bf16_autocast_stays_close_to_fp32(model_type, ddpm_config, edm_config):
    """bf16 keeps 8 significant bits (unit roundoff 2^-9 = 0.2%), so each network output is off by a
    few 0.1%. The samplers damp that error: DDIM and Heun end at low noise, where the output is
    mostly the input, and the prediction is clipped to [-1, 1]; measured over seeds the largest
    difference is 0.003 (DDIM) and 0.012 (EDM) in [0, 1]. The bound 0.04 (10 of 255 levels)
    leaves 3x margin yet fails on a real error, such as a missing clip or a float16 overflow."""
    config = ddpm_config if model_type == "DDPM" else edm_config
    cfg = load_config(config)
    diffusion = load_diffusion(cfg, config.parent / "run" / "ckpts" / "model_2.pth")
    sampler = sample.sampler_settings(cfg, "DDIM", 5, 0.0)
    images = {}
    for precision in ("fp32", "bf16"):
        noise = PerImageNoise([sample.image_seed(0, i) for i in range(16)], "cpu")
        with autocast(torch.device("cpu"), precision):
            images[precision] = sample.draw_images(diffusion, sampler, noise, 16, (3, 8, 8)).double()
    difference = (images["fp32"] - images["bf16"]).abs()
    assert 0 < difference.max() < 0.04  # not 0: bf16 really ran
    assert difference.mean() < 0.004


def test_fid_flag_scores_the_run(ddpm_config, tmp_path, monkeypatch, capsys):
    import fid
    from tests.helpers import RandomFeatures

    monkeypatch.setattr(fid, "load_inception", lambda device: RandomFeatures())  # no Inception weights here
    reference = Path(run_sample(ddpm_config, "--n_samples", 6, "--steps", 2, "--seed", 1,
                                "--out_dir", tmp_path / "reference")["out_dir"]) / "pngs"
    result = run_sample(ddpm_config, "--n_samples", 6, "--steps", 2, "--out_dir", tmp_path / "run",
                        "--fid", reference, "--ref_cache", tmp_path / "ref.npz", "--fid_workers", 0)
    expected = fid.compute_fid(str(reference), str(tmp_path / "run" / "pngs"), feature_extractor=RandomFeatures(),
                               ref_cache="", num_workers=0, progress=False)
    assert result["fid"] == expected > 0
    assert f"FID: {expected}" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "fid.json").read_text()) == \
        {"fid": expected, "reference": str(reference), "n_images": 6, "provenance": result["provenance"]}
    assert (tmp_path / "ref.npz").is_file()
    with pytest.raises(UserError, match="--fid nowhere: no such folder or .npz"):  # found before sampling
        sample.run(sample.build_parser().parse_args(
            ["--config", str(ddpm_config), "--steps", "2", "--fid", "nowhere"]), torch.device("cpu"))


def test_sigterm_to_the_launcher_stops_two_sampling_processes_with_75(ddpm_config, tmp_path):
    """The README's multi-GPU sampling under ``python -m utils.launch``: a SIGTERM to the launcher (what
    srun or a scheduler sends) ends every worker at once and the launcher with 75 and the stop line."""
    import signal
    import subprocess
    import time

    from tests.launch import two_process_command
    out_dir = tmp_path / "samples"
    command, env = two_process_command(REPO / "sample.py", "--config", ddpm_config, "--device", "cpu",
                                       "--n_samples", 100000, "--steps", 20, "--batch_size", 2, "--out_dir", out_dir,
                                       launcher="utils.launch")
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 120
    while not (out_dir.is_dir() and any(out_dir.rglob("*.png"))):  # sampling is under way
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 75, out[-3000:] + err[-3000:]
    assert out.strip().splitlines()[-1] == ("stopped on SIGTERM: the images written so far are kept, and the same "
                                            "command writes only the missing ones (exit code 75)")
    assert "Traceback" not in err


def count_draws(monkeypatch):
    draws = []
    draw = sample.draw_images
    monkeypatch.setattr(sample, "draw_images", lambda *args: draws.append(1) or draw(*args))
    return draws


def test_a_failed_png_write_stops_sampling_at_once_in_one_line(ddpm_config, tmp_path, monkeypatch, capsys):
    """The write of image 4 (the third batch of 2) fails: the run stops before drawing a fifth batch, one line
    naming the file, the free space and the fix, exit code 1, the images written before kept."""
    save = Image.Image.save

    def failing_save(image, fp, *args, **kwargs):
        if ".4.png." in str(fp):
            time.sleep(0.3)  # a slow disk: the run waits for the write rather than drawing on
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(image, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    draws = count_draws(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        run_sample(ddpm_config, "--n_samples", 20, "--steps", 2, "--batch_size", 2, "--out_dir", out)
    err = capsys.readouterr().err
    assert stopped.value.code == 1 and len(draws) <= 4, (len(draws), err)
    assert err.startswith(f"error: cannot write image {out}/pngs/4.png (No space left on device; ") and \
        err.endswith(" free on its disk); free disk space or pass --out_dir with a writable folder; the same command "
                     "writes only the missing images; the files written before are unchanged\n"), err
    names = os.listdir(out / "pngs")
    assert {"0.png", "1.png", "2.png", "3.png"} <= set(names) and "4.png" not in names
    assert not [name for name in names if name.endswith(".tmp")]
    assert all(read_pixels(out / "pngs" / name).shape == (3, 8, 8) for name in names)


@pytest.mark.cpu_only  # a real full disk
def test_sampling_onto_a_full_disk_stops_at_once(ddpm_config, tmp_path, monkeypatch, capsys):
    draws = count_draws(monkeypatch)
    with tmpfs(tmp_path / "disk", "64k") as disk:  # 16 pages: about a dozen PNG files
        with pytest.raises(SystemExit) as stopped:
            run_sample(ddpm_config, "--n_samples", 60, "--steps", 2, "--batch_size", 3, "--out_dir", disk / "out")
        names = os.listdir(disk / "out" / "pngs")
        assert all(read_pixels(disk / "out" / "pngs" / name).shape == (3, 8, 8) for name in names)
    err = capsys.readouterr().err
    assert stopped.value.code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"error: cannot write image {disk}/out/") and "(No space left on device; " in err, err
    assert len(names) < 20 and len(draws) <= len(names) // 3 + 3, (len(names), len(draws))
