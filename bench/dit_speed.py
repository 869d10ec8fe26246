"""Speed of the DiT evaluation (issue 15, part 7): DiT-XL/2's feature pass and the SD VAE's encode, as tables and JSON.

    python bench/dit_speed.py --out bench/results_dit.md        # DiT-XL/2 at batch 128 and 1024; the VAE at 256x256
    python bench/dit_speed.py --only vae --vae_batch 128
    python bench/dit_speed.py --quick                           # tiny networks: the plumbing in seconds on a CPU

Part ``dit``: DiT-XL/2 built from config/DiT_XL_2_cifar.yaml with random weights (speed does not depend
on them), frozen by evaluation.frozen's ``prepare_frozen`` as the probes do, and timed through the
probes' feature pass (evaluation.features via evaluation.throughput's ``feature_pass_throughput``) at the
config's cell (linear.timestep 121, linear.blockname layer-13, the null label) on random 4x32x32 latents.
Part ``vae``: diffusers' AutoencoderKL with stabilityai/sd-vae-ft-mse's architecture (built from the dict
below, random weights, nothing downloaded), timed through model/vae.py's ``encode_images``, the function
encode_latents.py calls, on random images of latents.image_size (256) pixels.

This is bench/benchmark.py's harness (variants, time budget, one row per variant, failures reported,
tables rewritten after every variant); only the two jobs are new.
"""
import argparse
import shlex
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))  # benchmark.py beside this file; it puts the project's root on the path

import torch  # noqa: E402

import benchmark  # noqa: E402
from benchmark import (EvalVariant, _split_names, count_flops, markdown_table, run_job,
                       timed_feature_pass)  # noqa: E402
from evaluation.features import extract_features  # noqa: E402
from evaluation.frozen import prepare_frozen, to_device  # noqa: E402
from evaluation.throughput import synchronize  # noqa: E402
from model.models import build_diffusion, count_parameters, load_config, on_latents  # noqa: E402
from model.vae import encode_images  # noqa: E402
from utils.cli import resolve_precision  # noqa: E402
from utils.config import config_name  # noqa: E402
from utils.distributed import DEVICE_CHOICES, resolve_device  # noqa: E402
from utils.epochs import peak_memory_gib  # noqa: E402
from utils.errors import UserError, cli_entry  # noqa: E402

PARTS = ("dit", "vae")
DEFAULT_CONFIG = "config/DiT_XL_2_cifar.yaml"

# huggingface.co/stabilityai/sd-vae-ft-mse/config.json, the keys that shape the network.
SD_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "act_fn": "silu", "layers_per_block": 2,
    "norm_num_groups": 32, "sample_size": 256, "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
}
QUICK_VAE_CONFIG = dict(SD_VAE_CONFIG, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                        sample_size=32)
QUICK_DIT = ["network.input_size=4", "network.hidden_size=32", "network.depth=2", "network.num_heads=2",
             "linear.blockname=layer-1", "latents.image_size=32"]

DIT_VARIANTS = {
    "bf16": EvalVariant("bf16 autocast at the probe's batch (linear.batch_size, 128); eager", "bf16",
                        large_batch=False),
    "bf16_large": EvalVariant("bf16 autocast at the large batch (1024); eager", "bf16"),
    "bf16_large_compile": EvalVariant("bf16_large with the feature pass compiled (linear.py --compile)", "bf16",
                                      compile_mode="default"),
}
VAE_VARIANTS = {
    "bf16": EvalVariant("encode_latents.py --precision bf16 (the default): bf16 autocast, NCHW", "bf16",
                        channels_last=False),
    "fp32": EvalVariant("fp32, NCHW", "fp32", channels_last=False),
    "bf16_channels_last": EvalVariant("bf16 with the VAE in channels_last (not what encode_latents.py does)",
                                      "bf16"),
}
VARIANTS = {"dit": DIT_VARIANTS, "vae": VAE_VARIANTS}

DIT_COLUMNS = (("variant", "variant", None), ("precision", "precision", None), ("batch", "batch", None),
               ("cell", "cell", None), ("feature", "feature_shape", None), ("img/s", "img_s", 0),
               ("peak GiB", "peak_gib", 2), ("GFLOP/img", "gflop_per_image", 1), ("MFU %", "mfu_pct", 1),
               ("compile s", "compile_s", 1), ("status", "status", None))
VAE_COLUMNS = (("variant", "variant", None), ("precision", "precision", None), ("batch", "batch", None),
               ("image -> latent", "shapes", None), ("img/s", "img_s", 1), ("peak GiB", "peak_gib", 2),
               ("GFLOP/img", "gflop_per_image", 1), ("MFU %", "mfu_pct", 1), ("status", "status", None))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="variants:\n" + "\n".join(
                                         f"  {part} {name}: {variant.about}"
                                         for part, variants in VARIANTS.items() for name, variant in variants.items()))
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"a DiT config (default {DEFAULT_CONFIG})")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto: CUDA when available")
    parser.add_argument("--quick", action="store_true",
                        help="a 2-block DiT on 4x4 latents and a tiny VAE at 32x32: the plumbing in seconds on a CPU")
    parser.add_argument("--out", default="bench/results_dit.md",
                        help="markdown table written here (rewritten after every variant); JSON beside it")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts out of {','.join(PARTS)}")
    parser.add_argument("--dit_variants", default=",".join(DIT_VARIANTS))
    parser.add_argument("--vae_variants", default=",".join(VAE_VARIANTS))
    parser.add_argument("--time_budget_s", type=float, default=None,
                        help="start no further variant once this many seconds have passed")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile in the variants that use it; auto: on CUDA only")
    parser.add_argument("--dit_batch", type=int, default=None, help="default: linear.batch_size (128); quick 4")
    parser.add_argument("--dit_large_batch", type=int, default=None, help="default 1024; quick 8")
    parser.add_argument("--dit_batches", type=int, default=None, help="timed batches (default 10; quick 2)")
    parser.add_argument("--vae_batch", type=int, default=None, help="default: latents.batch_size (64); quick 2")
    parser.add_argument("--vae_batches", type=int, default=None, help="timed batches (default 5; quick 1)")
    return parser


def settings_from_args(args, device):
    def pick(value, normal, tiny):
        return value if value is not None else (tiny if args.quick else normal)

    overrides = (QUICK_DIT if args.quick else []) + list(args.set)
    cfg = load_config(args.config, overrides, allow_dit=True)
    if not on_latents(cfg):
        raise UserError(f"--config {args.config}: bench/dit_speed.py measures a DiT config "
                        f"(model_type: DiT, e.g. {DEFAULT_CONFIG}); bench/benchmark.py measures the others")
    settings = argparse.Namespace(
        parts=_split_names(args.only, PARTS, "--only"), cfg=cfg, quick=args.quick,
        variants={part: _split_names(getattr(args, f"{part}_variants"), VARIANTS[part], f"--{part}_variants")
                  for part in PARTS},
        compile=args.compile == "on" or (args.compile == "auto" and device.type == "cuda"),
        dit_batch=pick(args.dit_batch, cfg.linear.batch_size, 4),
        dit_large_batch=pick(args.dit_large_batch, 1024, 8),
        dit_batches=pick(args.dit_batches, 10, 2),
        vae_batch=pick(args.vae_batch, cfg.latents.batch_size, 2),
        vae_batches=pick(args.vae_batches, 5, 1),
        vae_config=QUICK_VAE_CONFIG if args.quick else SD_VAE_CONFIG,
    )
    for name in ("dit_batch", "dit_large_batch", "dit_batches", "vae_batch", "vae_batches"):
        if getattr(settings, name) < 1:
            raise UserError(f"--{name} {getattr(settings, name)}: must be at least 1")
    return settings


def bench_dit(context, name):
    """The probes' feature pass of the config's DiT at its default cell: img/s at one batch size."""
    settings, device, cfg = context.settings, context.device, context.settings.cfg
    variant = DIT_VARIANTS[name]
    compiled = variant.compiles and settings.compile
    precision = resolve_precision(argparse.Namespace(precision=variant.precision, use_amp=False), device)
    batch = settings.dit_large_batch if variant.large_batch else settings.dit_batch
    t, block = cfg.linear.timestep, cfg.linear.blockname
    image_shape = tuple(cfg.image_shape)
    with torch.device(device):  # DiT-XL/2's 675M parameters initialise in a second there, not on the host
        diffusion = prepare_frozen(build_diffusion(cfg), device)
    one, _ = to_device(torch.rand(1, *image_shape), torch.zeros(0), device)
    flops = count_flops(lambda: extract_features(diffusion, one, t, [block], precision=precision))
    if compiled:
        diffusion = prepare_frozen(diffusion, device, compile=variant.compile_mode)
    img_s, compile_s = timed_feature_pass(diffusion, [t], [block], image_shape, batch, precision,
                                          settings.dit_batches, compiled, settings.quick)
    latents, _ = to_device(torch.rand(batch, *image_shape), torch.zeros(0), device)
    feature = extract_features(diffusion, latents, t, [block], precision=precision)[block]
    images = batch * settings.dit_batches
    return {
        "precision": precision, "batch": batch, "cell": f"t={t}, {block}", "latent_shape": list(image_shape),
        "feature_shape": list(feature.shape), "images": images, "timed_s": images / img_s, "img_s": img_s,
        "peak_gib": peak_memory_gib(device), "gflop_per_image": flops / 1e9,
        "mfu_pct": benchmark._mfu(img_s, flops, context.peak),
        "compile_s": compile_s,
        "note": benchmark._compile_note(variant.compiles, compiled, device),
    }


def bench_vae(context, name):
    """model/vae.py's ``encode_images`` (posterior sample per image seed) with an SD-VAE-shaped AutoencoderKL."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise UserError("the vae part needs diffusers: pip install diffusers (on the device: the wheel in .whl/)") from None
    settings, device, cfg = context.settings, context.device, context.settings.cfg
    variant = VAE_VARIANTS[name]
    precision = resolve_precision(argparse.Namespace(precision=variant.precision, use_amp=False), device)
    batch, size = settings.vae_batch, cfg.latents.image_size
    with torch.device(device):
        vae = AutoencoderKL(**settings.vae_config).eval().requires_grad_(False)
    if variant.channels_last:
        vae = vae.to(memory_format=torch.channels_last)
    images = torch.rand(batch, 3, size, size)  # on the host, as encode_latents.py hands them over
    seeds = list(range(batch))

    def encode(n):
        return encode_images(vae, images[:n], seeds[:n], cfg.latents.scale, size, precision=precision)

    flops = count_flops(lambda: encode(1))
    warmup = 1 if settings.quick else 2
    for _ in range(warmup):
        encode(batch)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(settings.vae_batches):
        latents = encode(batch)  # back on the host: the copy waits for the device
    synchronize(device)
    seconds = time.perf_counter() - start
    images_done = batch * settings.vae_batches
    img_s = images_done / seconds
    return {
        "precision": precision, "batch": batch, "channels_last": variant.channels_last,
        "image_shape": [3, size, size], "latent_shape": list(latents.shape[1:]),
        "shapes": f"3x{size}x{size} -> {'x'.join(map(str, latents.shape[1:]))}",
        "images": images_done, "timed_s": seconds, "img_s": img_s,
        "peak_gib": peak_memory_gib(device), "gflop_per_image": flops / 1e9,
        "mfu_pct": benchmark._mfu(img_s, flops, context.peak),
        "parameters_m": count_parameters(vae) / 1e6,
    }


class DitReport(benchmark.Report):
    """benchmark.py's report with this script's two parts."""

    def __init__(self, context, out_path):
        super().__init__(context, out_path)
        self.rows = {part: [] for part in PARTS}

    def markdown(self):
        header = self.context.header
        lines = [f"# DiT evaluation speed: {header['config']} on {header['device']}", ""]
        lines += [f"- {key}: {value}" for key, value in header.items() if key not in ("config", "device")]
        for part, title, columns in (("dit", "DiT feature pass (the probes' extract_features)", DIT_COLUMNS),
                                     ("vae", "VAE encode (model/vae.py encode_images)", VAE_COLUMNS)):
            if self.rows[part]:
                lines += ["", f"## {title}", ""] + markdown_table(self.rows[part], columns)
        return "\n".join(lines) + "\n"


def make_header(args, settings, device, peak):
    cfg, net = settings.cfg, settings.cfg.network
    return {
        "config": config_name(args.config) + (" (--quick: tiny networks)" if settings.quick else ""),
        "device": benchmark.device_name(device),
        "torch": torch.__version__ + (f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""),
        "command": "python " + shlex.join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "dit": f"DiT depth {net.depth}, width {net.hidden_size}, patch {net.patch_size} on "
               f"{'x'.join(map(str, cfg.image_shape))} latents, random weights; blocks up to "
               f"{cfg.linear.blockname} run, null label",
        "vae": f"AutoencoderKL, block_out_channels {list(settings.vae_config['block_out_channels'])} "
               f"({'tiny' if settings.quick else 'sd-vae-ft-mse'}), random weights, at "
               f"{cfg.latents.image_size}x{cfg.latents.image_size}",
        "peak used for MFU": f"{peak / 1e12:.0f} TFLOP/s dense bf16" if peak else "unknown device: no MFU",
        "timing": f"DiT {settings.dit_batches} timed batches after 3 warm-up ones (1 eager in --quick); VAE "
                  f"{settings.vae_batches} timed batches of {settings.vae_batch}; compile "
                  f"{'on' if settings.compile else 'off'}",
    }


@cli_entry
def main(args):
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif args.quick:
        torch.set_num_threads(1)  # tiny tensors gain nothing from threads
    settings = settings_from_args(args, device)
    peak = benchmark.peak_flops(benchmark.device_name(device)) if device.type == "cuda" else None
    context = benchmark.Context(settings, device, 0.0, "FlopCounterMode, per row", 0.0, peak)
    context.header = make_header(args, settings, device, peak)
    report = DitReport(context, args.out)
    report.write()
    deadline = None if args.time_budget_s is None else time.perf_counter() + args.time_budget_s
    print(f"DiT speed of {context.header['config']} on {context.header['device']}; results go to "
          f"{report.md_path} and {report.json_path}", flush=True)
    jobs = {"dit": bench_dit, "vae": bench_vae}
    queue = [(part, name) for part in PARTS if part in settings.parts for name in settings.variants[part]]
    queue.sort(key=lambda job: VARIANTS[job[0]][job[1]].compiles)  # compiled last: a short budget drops it first
    for part, name in queue:
        run_job(report, part, name, lambda p=part, n=name: jobs[p](context, n), deadline)
    print("\n" + report.markdown(), flush=True)
    return report.to_dict()


if __name__ == "__main__":
    main(build_parser().parse_args())
