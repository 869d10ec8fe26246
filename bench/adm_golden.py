"""Record tests/golden/adm_*.pt with OpenAI's own code: tiny random-weight ADM networks in the layouts of
improved-diffusion's CIFAR-10 model and guided-diffusion's 256x256 model (plus one with the new attention order
and no learned variance), their training loss (the simple MSE term) at fixed (t, noise), network output,
per-block pooled activations and learned-variance p_mean_variance. Never run in CI: it needs checkouts.

    git clone https://github.com/openai/improved-diffusion /tmp/openai/improved   # recorded at 1bc7bbb
    git clone https://github.com/openai/guided-diffusion /tmp/openai/guided       # recorded at 22e0df8
    python bench/adm_golden.py --improved /tmp/openai/improved --guided /tmp/openai/guided

Their unet.py, gaussian_diffusion.py and script_util.py need only torch and numpy. The weights are not stored:
``tests.helpers.seeded_weights(shapes, seed)`` rebuilds them from the recorded seed; tests/test_adm.py
loads them into our ADM under OpenAI's parameter names and compares.
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tests.helpers import ADM_GOLDEN, seeded_weights  # noqa: E402

# Each layout: OpenAI's flags (the ones that differ from their defaults), and which package reads them.
LAYOUTS = {
    "improved": ("improved_diffusion", 1, dict(  # cifar10_uncond_50M_500K.pt's flags, narrower and shallower
        image_size=32, num_channels=32, num_res_blocks=1, learn_sigma=True, dropout=0.3,
        diffusion_steps=4000, noise_schedule="cosine")),
    "guided": ("guided_diffusion", 2, dict(  # 256x256_diffusion_uncond.pt's flags, at 32x32 and 3 levels
        attention_resolutions="32,16,8", class_cond=False, diffusion_steps=1000, image_size=32, learn_sigma=True,
        noise_schedule="linear", num_channels=32, num_head_channels=32, num_res_blocks=2, resblock_updown=True,
        use_scale_shift_norm=True, channel_mult="1,1,2")),
    "new_order": ("guided_diffusion", 3, dict(  # the options the two published layouts leave out
        image_size=16, channel_mult="1,2", num_channels=32, num_res_blocks=1, attention_resolutions="16,8",
        num_heads=2, num_heads_upsample=4, use_new_attention_order=True, use_scale_shift_norm=False,
        learn_sigma=False, diffusion_steps=100, noise_schedule="linear", rescale_timesteps=True)),
}
# The published files' flags: their parameter names and shapes are recorded too (built on the meta device).
PUBLISHED = {
    "improved": dict(image_size=32, num_channels=128, num_res_blocks=3, learn_sigma=True, dropout=0.3,
                     diffusion_steps=4000, noise_schedule="cosine"),  # cifar10_uncond_50M_500K.pt
    "guided": dict(attention_resolutions="32,16,8", class_cond=False, diffusion_steps=1000, image_size=256,
                   learn_sigma=True, noise_schedule="linear", num_channels=256, num_head_channels=64, num_res_blocks=2,
                   resblock_updown=True, use_fp16=True, use_scale_shift_norm=True),  # 256x256_diffusion_uncond.pt
}
# Our network keys that are not OpenAI model flags but diffusion ones, with OpenAI's defaults per package.
RESCALE_DEFAULT = {"improved_diffusion": True, "guided_diffusion": False}
BATCH = 3


def our_settings(package, flags):
    """The ``network`` and ``diffusion`` sections of our config for OpenAI's ``flags``."""
    from model.adm import ADM
    from utils.config import settings_of

    keys = settings_of(ADM)
    network = {key: value for key, value in flags.items() if key in keys}
    network.setdefault("rescale_timesteps", RESCALE_DEFAULT[package])
    steps, schedule = flags["diffusion_steps"], flags["noise_schedule"]
    scale = 1000 / steps  # OpenAI's linear betas are scaled to the step count
    diffusion = {"n_T": steps, "schedule": schedule, "betas": [scale * 1e-4, scale * 0.02]}
    return network, diffusion


def build(package, flags):
    """OpenAI's (model, diffusion) for ``flags``, through their create_model_and_diffusion."""
    script_util = __import__(f"{package}.script_util", fromlist=["script_util"])
    settings = script_util.model_and_diffusion_defaults()
    settings.update(flags)
    return script_util.create_model_and_diffusion(**settings)


def record(package, seed, flags):
    model, diffusion = build(package, flags)
    shapes = {name: list(value.shape) for name, value in model.state_dict().items()}
    model.load_state_dict(seeded_weights(shapes, seed))
    model.eval()

    generator = torch.Generator().manual_seed(seed + 1000)
    size = flags["image_size"]
    x0 = torch.rand(BATCH, 3, size, size, generator=generator)  # our images in [0, 1]
    noise = torch.randn(BATCH, 3, size, size, generator=generator)
    index = torch.tensor([0, diffusion.num_timesteps // 2, diffusion.num_timesteps - 1])  # their timestep index
    pooled, hooks = {}, []
    names = [(f"input_{k}", m) for k, m in enumerate(model.input_blocks)] + [("middle", model.middle_block)]
    names += [(f"output_{k}", m) for k, m in enumerate(model.output_blocks)]
    for name, module in names:
        hooks.append(module.register_forward_hook(
            lambda module, args, out, name=name: pooled.__setitem__(name, out.float().mean(dim=(2, 3)))))
    with torch.no_grad():
        mse = diffusion.training_losses(model, 2 * x0 - 1, index, noise=noise)["mse"]  # (B,)
        x_t = diffusion.q_sample(2 * x0 - 1, index, noise=noise)
        out = diffusion._wrap_model(model)(x_t, index)  # their rescaling of the timesteps included
        golden = {"flags": flags, "seed": seed, "x0": x0, "noise": noise, "index": index, "mse": mse, "x_t": x_t,
                  "out": out, "pooled": dict(pooled), "shapes": shapes}
        if flags.get("learn_sigma"):
            posterior = diffusion.p_mean_variance(model, x_t, index, clip_denoised=True)
            golden.update(p_mean=posterior["mean"], p_log_variance=posterior["log_variance"])
    for hook in hooks:
        hook.remove()
    golden["network"], golden["diffusion"] = our_settings(package, flags)
    return golden


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--improved", required=True, help="a checkout of github.com/openai/improved-diffusion")
    parser.add_argument("--guided", required=True, help="a checkout of github.com/openai/guided-diffusion")
    args = parser.parse_args()
    sys.path[:0] = [args.improved, args.guided]
    for layout, (package, seed, flags) in LAYOUTS.items():
        golden = record(package, seed, flags)
        if layout in PUBLISHED:
            with torch.device("meta"):
                published = build(package, PUBLISHED[layout])[0]
            golden["published"] = {"flags": PUBLISHED[layout], "shapes": {
                name: list(value.shape) for name, value in published.state_dict().items()}}
        torch.save(golden, ADM_GOLDEN[layout])
        print(f"{ADM_GOLDEN[layout].relative_to(ROOT)}: {package} {flags}; mse {golden['mse'].tolist()}")


if __name__ == "__main__":
    main()
