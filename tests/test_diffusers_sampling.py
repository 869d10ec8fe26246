"""A diffusers folder samples as diffusers does (model/diffusers_sampling.py): DDIM equals DDIMScheduler's loop and
the ancestral sampler DDPMScheduler.step's from the same x_T and per-step noise, over their scheduler options;
sample.py's PNGs equal DDIMPipeline's and DDPMPipeline's; unsupported options are refused in one line."""
import io
import json
import subprocess
import sys

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

import sample
from model.models import load_config, load_diffusion
from model.noise import PerImageNoise
from tests.launch import REPO
from utils.data import image_seed
from utils.errors import UserError
from utils.images import save_png, to_uint8

CONFIG = REPO / "config" / "DDPM_ddpm.yaml"
N_T = 20  # a short schedule, so the ancestral sampler's every-step run is quick
TINY_LAYOUT = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                   attention_head_dim=None, norm_num_groups=8, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1)
CONFIG_SETS = ["diffusion.n_T=20", "network.image_shape=[3,16,16]", "network.ch_mults=[1,2]",
               "network.is_attn=[False,True]", "network.n_blocks=1", "linear.blockname=out_2"]
SEEDS = (5, 6, 7)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A pipeline folder (random weights, 20 training steps) and its UNet."""
    root = tmp_path_factory.mktemp("diffusers_sampling") / "ddpm-tiny"
    torch.manual_seed(0)
    unet = UNet2DModel(**TINY_LAYOUT).eval()
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=N_T)).save_pretrained(root)
    return root, unet


def with_scheduler(folder, config_sets=(), **options):
    """Our DDPM on ``folder`` after writing its scheduler config anew with ``options`` (``config_sets``: more
    --set for the config); the DDPMScheduler read back."""
    root, _ = folder
    path = root / "scheduler" / "scheduler_config.json"
    config = {key: value for key, value in json.loads(path.read_text()).items() if key in ("_class_name",
              "_diffusers_version", "num_train_timesteps", "beta_start", "beta_end")}
    path.write_text(json.dumps({**config, **options}))
    diffusion = load_diffusion(load_config(CONFIG, CONFIG_SETS + list(config_sets)), str(root)).eval()
    return diffusion, DDPMScheduler.from_pretrained(root / "scheduler")


def same_start():
    """Our per-image noise and diffusers' list of generators, each having drawn the same x_T."""
    noise = PerImageNoise(SEEDS, "cpu")
    x_T = noise((3, 16, 16))
    generators = [torch.Generator().manual_seed(seed) for seed in SEEDS]
    assert torch.equal(randn_tensor(x_T.shape, generator=generators), x_T)
    return x_T, noise, generators


@pytest.mark.parametrize("steps, eta, options", [
    (5, 0.0, {}),                                                                  # diffusers' defaults
    (7, 0.5, {}),                                                                  # stochastic, 20 // 7 stride
    (4, 1.0, {"timestep_spacing": "trailing"}),
    (6, 0.0, {"timestep_spacing": "linspace", "set_alpha_to_one": False}),
    (4, 0.3, {"steps_offset": 1, "set_alpha_to_one": False}),
    (N_T, 0.0, {"clip_sample": False}),
    (5, 0.0, {"clip_sample_range": 0.5, "beta_schedule": "squaredcos_cap_v2"}),
])
def test_ddim_equals_ddim_scheduler_loop(folder, steps, eta, options):
    """DDIMScheduler built from the folder's config, stepped with its defaults (no eps from the clipped x0) and
    the same generators for the per-step noise, ends where our DDIM does."""
    cosine = options.get("beta_schedule") == "squaredcos_cap_v2"
    diffusion, scheduler = with_scheduler(folder, ["diffusion.schedule=cosine"] if cosine else [], **options)
    _, unet = folder
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    x_T, noise, generators = same_start()
    x = x_T
    with torch.no_grad():
        for t in ddim.timesteps:
            x = ddim.step(unet(x, t).sample, t, x, eta=eta, generator=generators).prev_sample
        ours = diffusion.sample(x_T=x_T, steps=steps, eta=eta, noise=noise)
    torch.testing.assert_close(ours, (x + 1) / 2, rtol=0, atol=0)
    assert diffusion.sampler_name({"mode": "DDIM", "steps": steps, "eta": eta}).startswith(
        f"diffusers DDIMScheduler(steps={steps}, eta={eta}, timestep_spacing=")


@pytest.mark.parametrize("steps, options", [
    (None, {}),                                                       # DDPMPipeline's every step, fixed_small
    (None, {"variance_type": "fixed_large", "clip_sample": False}),
    (7, {"variance_type": "fixed_small_log"}),
    (5, {"timestep_spacing": "trailing", "clip_sample_range": 0.8}),
    (6, {"timestep_spacing": "leading", "steps_offset": 1}),
])
def test_ancestral_equals_ddpm_scheduler_step(folder, steps, options):
    diffusion, scheduler = with_scheduler(folder, **options)
    _, unet = folder
    scheduler.set_timesteps(steps or N_T)
    x_T, noise, generators = same_start()
    x = x_T
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, generator=generators).prev_sample
        ours = diffusion.sample(x_T=x_T, mode="DDPM", steps=steps, noise=noise)
    torch.testing.assert_close(ours, (x + 1) / 2, rtol=0, atol=0)


PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}  # diffusers' prediction_type -> ours


def objective_sets(options):
    """The --set that make the config describe a scheduler's prediction_type and rescale_betas_zero_snr."""
    sets = [f"diffusion.prediction={PREDICTIONS[options.get('prediction_type', 'epsilon')]}"]
    return sets + (["diffusion.zero_terminal_snr=true"] if options.get("rescale_betas_zero_snr") else [])


@pytest.mark.parametrize("mode, steps, eta, options", [
    ("DDIM", 5, 0.5, {"prediction_type": "v_prediction"}),
    ("DDIM", 4, 0.0, {"prediction_type": "sample", "clip_sample": False}),
    # trailing spacing starts at the last index, where a zero-SNR schedule has alphabar = 0
    ("DDIM", 4, 1.0, {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                      "timestep_spacing": "trailing"}),
    ("DDIM", 5, 0.0, {"prediction_type": "sample", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                      "set_alpha_to_one": False}),
    ("DDIM", 4, 0.0, {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}),  # epsilon: x0 = inf, clipped
    ("DDPM", None, None, {"prediction_type": "v_prediction"}),
    ("DDPM", 6, None, {"prediction_type": "sample", "variance_type": "fixed_large"}),
    ("DDPM", None, None, {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}),
    ("DDPM", 5, None, {"prediction_type": "sample", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                       "variance_type": "fixed_small_log", "clip_sample_range": 0.7}),
])
def test_sample_and_v_prediction_folders_sample_as_diffusers(folder, mode, steps, eta, options):
    """A folder whose UNet predicts x0 (sample) or v, zero terminal SNR or not, samples as DDIMScheduler /
    DDPMScheduler step it from the same x_T and noise, to the last bit (the output turned into eps and x0 by
    DDPM.denoise with the folder's own alphabar)."""
    diffusion, scheduler = with_scheduler(folder, objective_sets(options), **options)
    _, unet = folder
    assert diffusion.prediction == PREDICTIONS[options.get("prediction_type", "epsilon")]
    if options.get("rescale_betas_zero_snr"):
        assert scheduler.alphas_cumprod[-1] == 0 and diffusion.ddpm_alphabar_t[-1] == 0
    theirs = DDIMScheduler.from_config(scheduler.config) if mode == "DDIM" else scheduler
    theirs.set_timesteps(steps or N_T)
    x_T, noise, generators = same_start()
    x = x_T
    step = {"eta": eta} if mode == "DDIM" else {}
    with torch.no_grad():
        for t in theirs.timesteps:
            x = theirs.step(unet(x, t).sample, t, x, generator=generators, **step).prev_sample
        ours = diffusion.sample(x_T=x_T, mode=mode, steps=steps, eta=eta, noise=noise)
    assert torch.isfinite(ours).all() and torch.equal(ours, (x + 1) / 2)


def test_a_folder_without_scheduler_config_samples_the_configs_zero_snr_v_schedule(folder, tmp_path):
    """A bare UNet folder (no scheduler_config.json: diffusers' 1000 steps) samples the config's schedule, zero
    terminal SNR and v prediction included, as DDIMScheduler does with those settings."""
    _, unet = folder
    unet.save_pretrained(tmp_path / "bare")
    sets = [s for s in CONFIG_SETS if not s.startswith("diffusion.n_T")] + ["diffusion.prediction=v",
                                                                             "diffusion.zero_terminal_snr=true"]
    diffusion = load_diffusion(load_config(CONFIG, sets), str(tmp_path / "bare")).eval()
    ddim = DDIMScheduler(beta_schedule="linear", prediction_type="v_prediction", rescale_betas_zero_snr=True)
    ddim.set_timesteps(4)
    x_T, noise, generators = same_start()
    x = x_T
    with torch.no_grad():
        for t in ddim.timesteps:
            x = ddim.step(unet(x, t).sample, t, x, eta=0.5, generator=generators).prev_sample
        ours = diffusion.sample(x_T=x_T, steps=4, eta=0.5, noise=noise)
    assert torch.equal(ours, (x + 1) / 2)


def pipeline_images(folder, pipeline_class, indices, seed, **call):
    """The pipeline's PIL images of ``indices`` (image i's generator seeded as sample.py seeds it): its default
    output, through ``numpy_to_pil``."""
    root, unet = folder
    pipeline = pipeline_class(unet=unet, scheduler=DDPMScheduler.from_pretrained(root / "scheduler"))
    pipeline.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(image_seed(seed, i)) for i in indices]
    return pipeline(batch_size=len(indices), generator=generators, **call).images


def png_bytes(image):
    """What ``image.save("x.png")`` writes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_sample_py_writes_the_pipelines_images(folder, tmp_path):
    """`python sample.py --ckpt FOLDER` at --batch_size 2 writes, byte for byte, the PNGs of what DDIMPipeline
    (eta 0.5) and DDPMPipeline make (their default PIL images) in one batch from generators seeded as sample.py
    seeds image i; sampling.json says which scheduler ran."""
    root, _ = folder
    sets = [arg for setting in CONFIG_SETS for arg in ("--set", setting)]
    runs = {"ddim": (["--steps", "4", "--eta", "0.5"], {"steps_offset": 1}, DDIMPipeline,
                     {"num_inference_steps": 4, "eta": 0.5}),
            "ddpm": (["--mode", "DDPM"], {"variance_type": "fixed_large"}, DDPMPipeline, {"num_inference_steps": N_T})}
    for name, (flags, options, pipeline_class, call) in runs.items():
        with_scheduler(folder, **options)
        out = tmp_path / name
        command = [sys.executable, "sample.py", "--config", str(CONFIG), *sets, "--ckpt", str(root), "--device",
                   "cpu", "--n_samples", "5", "--batch_size", "2", "--seed", "3", *flags, "--out_dir", str(out)]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        images = pipeline_images(folder, pipeline_class, range(5), 3, **call)
        assert [(out / "pngs" / f"{i}.png").read_bytes() for i in range(5)] == list(map(png_bytes, images)), name
        recorded = json.loads((out / "sampling.json").read_text())["sampler"]
        option, value = next(iter(options.items()))
        assert recorded.startswith(f"diffusers {pipeline_class.__name__[:4]}Scheduler(") and \
            f"{option}={value!r}" in recorded


def refusal(folder, tmp_path, *flags, **options):
    with_scheduler(folder, **options)
    root, _ = folder
    sets = [arg for setting in CONFIG_SETS for arg in ("--set", setting)]
    args = sample.build_parser().parse_args(["--config", str(CONFIG), *sets, "--ckpt", str(root), "--device", "cpu",
                                             "--n_samples", "2", "--out_dir", str(tmp_path / "out"), *flags])
    with pytest.raises(UserError) as caught:
        sample.run(args, torch.device("cpu"))
    assert not (tmp_path / "out").exists()  # refused before the folder is made
    return str(caught.value)


def test_unsupported_scheduler_options_are_refused_before_sampling(folder, tmp_path):
    assert "thresholding True is not supported" in refusal(folder, tmp_path, "--steps", "4", thresholding=True)
    assert "variance_type 'learned_range'" in refusal(folder, tmp_path, "--mode", "DDPM",
                                                      variance_type="learned_range")
    assert "timestep_spacing 'karras'" in refusal(folder, tmp_path, "--steps", "4", timestep_spacing="karras")
    message = refusal(folder, tmp_path, "--steps", str(N_T), steps_offset=1)
    assert f"the timesteps reach {N_T}, past the last index {N_T - 1}; pass fewer --steps" in message
    assert "\n" not in message


def test_images_of_ddae_ddim_on_a_folder_never_mix_with_its_own_sampler(folder, tmp_path):
    """A folder sampled before this sampler existed (DDAE's DDIM; its sampling.json has no "sampler") is refused,
    naming both samplers, instead of being filled up with other images; so is one of this sampler from before
    its PNGs were rounded as the pipeline's (no "pixels": truncated)."""
    with_scheduler(folder)
    root, _ = folder
    sets = [arg for setting in CONFIG_SETS for arg in ("--set", setting)]
    argv = ["--config", str(CONFIG), *sets, "--ckpt", str(root), "--device", "cpu", "--n_samples", "2", "--steps",
            "2", "--out_dir", str(tmp_path / "old")]
    sample.main(sample.build_parser().parse_args(argv))
    settings_file = tmp_path / "old" / "sampling.json"
    settings = json.loads(settings_file.read_text())
    assert settings["pixels"] == "round"
    (tmp_path / "old" / "pngs" / "1.png").unlink()
    for removed, message in (("sampler", "sampled with sampler=DDAE DDIM, but this run has sampler=diffusers "
                                         "DDIMScheduler"),
                             ("pixels", "sampled with pixels=truncate, but this run has pixels=round;")):
        settings_file.write_text(json.dumps({key: value for key, value in settings.items() if key != removed}))
        with pytest.raises(UserError, match=message):
            sample.run(sample.build_parser().parse_args(argv), torch.device("cpu"))


def boundary_values():
    """768 float32 values in [0, 1]: every level, every half between two levels and the float just below it."""
    levels = torch.arange(256, dtype=torch.float32)
    halves = levels[:-1] + 0.5
    return torch.cat([levels, halves, torch.nextafter(halves, levels[:-1]), torch.tensor([0.0, 255.0])]) / 255


def test_round_pixels_are_numpy_to_pils(tmp_path):
    """At the boundaries and at random values, the "round" rule's PNG is the one diffusers' numpy_to_pil makes;
    the original's rule ("truncate", x * 255 + 0.5) differs."""
    values = torch.cat([boundary_values(), torch.rand(2000)])
    values = torch.cat([values, values[:(-len(values)) % 48]])  # whole 4x4 RGB images
    images = values.clamp(0, 1).view(-1, 4, 4, 3)  # (N, H, W, C), as the pipeline hands them to numpy_to_pil
    theirs = DDIMPipeline.numpy_to_pil(images.numpy())
    ours = to_uint8(images.permute(0, 3, 1, 2), "round")
    for index, (image, pixels) in enumerate(zip(theirs, ours)):
        save_png(pixels, tmp_path / f"{index}.png")
        assert (tmp_path / f"{index}.png").read_bytes() == png_bytes(image)
    assert not torch.equal(to_uint8(images.permute(0, 3, 1, 2)), ours)


def test_sample_py_writes_a_folders_pixels_by_the_pipelines_rule(folder, tmp_path, monkeypatch):
    """Samples at the rounding boundaries (the sampler replaced): sample.py on a diffusers folder writes the PNG
    that numpy_to_pil's image of them saves to."""
    image = boundary_values().view(16, 16, 3)  # (H, W, C)
    monkeypatch.setattr(sample, "draw_images", lambda diffusion, sampler, noise, n, *shape_and_more:
                        image.permute(2, 0, 1).expand(n, -1, -1, -1))
    with_scheduler(folder)
    root, _ = folder
    sets = [arg for setting in CONFIG_SETS for arg in ("--set", setting)]
    out = tmp_path / "out"
    sample.main(sample.build_parser().parse_args(["--config", str(CONFIG), *sets, "--ckpt", str(root), "--device",
                                                  "cpu", "--n_samples", "1", "--steps", "2", "--out_dir", str(out)]))
    (expected,) = DDIMPipeline.numpy_to_pil(image.numpy())
    assert (out / "pngs" / "0.png").read_bytes() == png_bytes(expected)
