"""Speed of training, sampling and the probe's feature pass on this machine: a markdown table and JSON.

    python bench/benchmark.py --config config/DDPM_ddpm.yaml --out bench/results.md
    python bench/benchmark.py --config config/EDM_ddpm.yaml --only sample --sample_batch 1000
    python bench/benchmark.py --config config/DDPM_ddpm.yaml --only parity --loss_parity_steps 2000
    python bench/benchmark.py --config config/demo.yaml --quick     # every part in seconds on a CPU

Every number comes from the code users run: train.py's ``build_training`` and ``train_step`` on its
data path, sample.py's network preparation and ``draw_images`` with per-image noise, and
evaluation.features' grid feature pass. The weights are freshly initialised and the training images are
the built-in synthetic set (pass --real_data for the config's dataset): the time a 32x32 step takes
does not depend on what the pixels show. Each variant runs its warm-up (torch.compile and cuDNN
tuning happen there), then its timed steps, with a device synchronisation at the two ends only.
A variant that fails is reported with its error and the others still run.
"""
import argparse
import datetime
import gc
import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from any folder: the packages live one level up

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import sample  # noqa: E402
import train  # noqa: E402
from evaluation.cells import probe_cells  # noqa: E402
from evaluation.frozen import prepare_frozen  # noqa: E402
from evaluation.throughput import feature_pass_throughput, synchronize  # noqa: E402
from model.amp import autocast  # noqa: E402
from model.guidance import HeadGuidance  # noqa: E402
from model.heads import NoiseConditionalHead  # noqa: E402
from model.models import (build_diffusion, build_network, count_parameters, diffusion_class,  # noqa: E402
                          feature_dims, load_config)
from model.noise import PerImageNoise  # noqa: E402
from utils.atomic import atomic_path  # noqa: E402
from utils.cli import configure_backends, resolve_precision  # noqa: E402
from utils.config import add_config_args, config_name  # noqa: E402
from utils.data import resolve_num_workers  # noqa: E402
from utils.distributed import DEVICE_CHOICES, resolve_device  # noqa: E402
from utils.epochs import peak_memory_gib  # noqa: E402
from utils.errors import UserError, cli_entry  # noqa: E402
from utils.images import to_uint8  # noqa: E402
from utils.logging import plot_curves, save_json  # noqa: E402

PARTS = ("train", "sample", "probe", "parity", "profile")

# GFLOP per 32x32 image of the paper's two networks (counted for the reference): (forward, training step).
PAPER_GFLOP = {
    (128, (1, 2, 2, 2), (False, True, False, False), 2, False): (12.4, 37.3),  # 35.7M UNet
    (128, (2, 2, 2), (False, True, False), 4, True): (43.0, 129.0),            # 56M DDPM++
}
# Dense bf16/fp16 tensor-core peaks in TFLOP/s, matched in this order against the device name.
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0))

# The original code on one H200, measured with torch 2.11 and --use_amp, by (model_type, paper network index).
ORIGINAL_TRAIN_IMG_S = {("DDPM", 0): 1678.0, ("EDM", 0): 1682.0, ("DDPM", 1): 576.0}
ORIGINAL_SAMPLE_50K_S = {("DDPM", 0, 100): 643.0, ("EDM", 0, 18): 194.0}
ORIGINAL_PROBE_IMG_S = {("DDPM", 0): 2079.0}
N_SAMPLES_FID = 50_000
FULL_SAMPLER_STEPS = {"DDIM": 100, "EDM": 18}  # by the kind's SAMPLER: the FID setting, DDIM 100, Heun 18
QUICK_SAMPLER_STEPS = {"DDIM": 10, "EDM": 4}

QUICK_NETWORK = ["network.n_channels=32", "network.ch_mults=[1,2]", "network.is_attn=[False,True]",
                 "network.n_blocks=1", "network.image_shape=[3,8,8]", "linear.blockname=out_2"]


@dataclass(frozen=True)
class TrainVariant:
    about: str
    flags: tuple                    # train.py flags
    fused_adam: bool = True         # train.py's choice on CUDA; False: torch's default (foreach) Adam
    sync_free_ema: bool = True      # False: ema-pytorch's own update(), which syncs with the host twice a step

    @property
    def compiles(self):
        return any(flag.split("=")[0] == "--compile" for flag in self.flags)


@dataclass(frozen=True)
class EvalVariant:
    about: str
    precision: str
    large_batch: bool = True        # the part's large batch, else its original batch
    channels_last: bool = True      # sampling only: probe passes take prepare_frozen's layout
    compile_mode: str = None        # a utils.cli.COMPILE_MODES mode, None for eager
    cudnn_benchmark: bool = False
    guided: bool = False            # sampling only: classifier guidance by a DDAE head (sample.py --classifier_head)

    @property
    def compiles(self):
        return self.compile_mode is not None


FAST_FLAGS = ("--precision", "bf16", "--channels_last", "--gpu_data")
TRAIN_VARIANTS = {
    "faithful": TrainVariant("the original's recipe: fp16 autocast + GradScaler, fp32 weights, NCHW, DataLoader, "
                             "foreach Adam, ema-pytorch's update (host syncs)", ("--use_amp",),
                             fused_adam=False, sync_free_ema=False),
    "use_amp": TrainVariant("train.py --use_amp: faithful + fused Adam + sync-free EMA", ("--use_amp",)),
    "use_amp_accum4": TrainVariant("the README's 4-GPU recipe on one GPU: train.py --use_amp --accum 4 (4 micro-batches "
                                   "per optimizer step; the batch column counts all four)", ("--use_amp", "--accum", "4")),
    "fp32": TrainVariant("train.py in fp32 (no autocast): the loss-parity reference, whose rate sizes a parity run",
                         ("--precision", "fp32")),
    "bf16": TrainVariant("bf16 autocast, channels_last, data on the device, fused Adam, sync-free EMA; eager",
                         FAST_FLAGS),
    "fast": TrainVariant("bf16 + channels_last + data on the device + fused Adam + sync-free EMA + torch.compile",
                         FAST_FLAGS + ("--compile",)),
    "graphs": TrainVariant("fast + CUDA graphs (--compile reduce-overhead) + --cudnn_benchmark",
                           FAST_FLAGS + ("--compile=reduce-overhead", "--cudnn_benchmark")),
}
SAMPLE_VARIANTS = {
    "faithful": EvalVariant("sample.py --use_amp at the original's batch of 400: fp16, NCHW", "fp16",
                            large_batch=False, channels_last=False),
    "fp16": EvalVariant("fp16, channels_last, large batch", "fp16"),
    "bf16": EvalVariant("bf16, channels_last, large batch", "bf16"),
    "bf16_guided": EvalVariant("bf16 + classifier guidance by a DDAE head on linear.blockname (sample.py "
                               "--classifier_head: a forward and backward to that block per step), eager", "bf16",
                               guided=True),
    "bf16_compile": EvalVariant("bf16, channels_last, large batch, torch.compile", "bf16", compile_mode="default"),
    "bf16_graphs": EvalVariant("bf16_compile + CUDA graphs (--compile reduce-overhead) + --cudnn_benchmark", "bf16",
                               compile_mode="reduce-overhead", cudnn_benchmark=True),
}
PROBE_VARIANTS = {
    "use_amp": EvalVariant("linear.py --grid --use_amp: fp16 at the probe's batch", "fp16", large_batch=False),
    "bf16": EvalVariant("bf16 at the probe's batch", "bf16", large_batch=False),
    "bf16_large": EvalVariant("bf16, large batch", "bf16"),
    "bf16_large_compile": EvalVariant("bf16, large batch, torch.compile", "bf16", compile_mode="default"),
    "bf16_large_graphs": EvalVariant("bf16_large_compile + CUDA graphs (reduce-overhead) + --cudnn_benchmark",
                                     "bf16", compile_mode="reduce-overhead", cudnn_benchmark=True),
}
VARIANTS = {"train": TRAIN_VARIANTS, "sample": SAMPLE_VARIANTS, "probe": PROBE_VARIANTS}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="variants:\n" + "\n".join(
                                         f"  {part} {name}: {variant.about}"
                                         for part, variants in VARIANTS.items() for name, variant in variants.items()))
    add_config_args(parser)
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto: CUDA when available")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny network, tiny batches and a few steps: every part in seconds on a CPU")
    parser.add_argument("--out", default="bench/results.md",
                        help="markdown table written here (rewritten after every variant); JSON beside it")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts out of {','.join(PARTS)}")
    parser.add_argument("--time_budget_s", type=float, default=None,
                        help="start no further variant once this many seconds have passed; the table is "
                             "still written, with the rest marked skipped")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile in the variants that use it; auto: on CUDA only (compiling "
                             "takes minutes on a small CPU)")
    train_group = parser.add_argument_group("training")
    train_group.add_argument("--train_variants", default=",".join(TRAIN_VARIANTS))
    train_group.add_argument("--batch_size", type=int, default=None, help="per-GPU batch (default: the config's)")
    train_group.add_argument("--warmup_steps", type=int, default=None, help="untimed steps (default 10; quick 1)")
    train_group.add_argument("--steps", type=int, default=None, help="timed steps (default 50; quick 2)")
    train_group.add_argument("--num_workers", type=int, default=None,
                             help="DataLoader workers (default: the config's; quick 0)")
    train_group.add_argument("--real_data", action="store_true",
                             help="train on the config's dataset from --data_root instead of the synthetic set")
    train_group.add_argument("--data_root", default="./data")
    sample_group = parser.add_argument_group("sampling")
    sample_group.add_argument("--sample_variants", default=",".join(SAMPLE_VARIANTS))
    sample_group.add_argument("--sample_batch", type=int, default=None, help="large batch (default 1000; quick 4)")
    sample_group.add_argument("--sample_batches", type=int, default=None,
                              help="timed batches per variant (default 2; quick 1)")
    sample_group.add_argument("--sample_steps", type=int, default=None,
                              help="DDIM / Heun steps (default 100 / 18, the FID setting; quick 10 / 4)")
    probe_group = parser.add_argument_group("probe feature pass")
    probe_group.add_argument("--probe_variants", default=",".join(PROBE_VARIANTS))
    probe_group.add_argument("--probe_batch", type=int, default=None,
                             help="the probe's batch (default: the config's linear.batch_size; quick 8)")
    probe_group.add_argument("--probe_large_batch", type=int, default=None, help="default 1024; quick 16")
    probe_group.add_argument("--probe_batches", type=int, default=None, help="timed batches (default 20; quick 2)")
    parity_group = parser.add_argument_group("loss parity")
    parity_group.add_argument("--loss_parity_steps", type=int, default=None,
                              help="steps of the fp32 reference and of the fast variant, same seed (default: "
                                   "0, off; quick 4). 2,000 steps of the 35.7M UNet take minutes on a GPU")
    parity_group.add_argument("--parity_variant", default="fast",
                              help="the training variant compared with the fp32 reference (default fast)")
    parity_group.add_argument("--parity_window", type=int, default=None,
                              help="last steps whose losses are compared (default: a quarter of the steps, at least 2)")
    profile_group = parser.add_argument_group("profile (where a training step's time goes)")
    profile_group.add_argument("--profile_variants", default="faithful,graphs",
                               help="training variants to profile with torch.profiler (default faithful,graphs)")
    profile_group.add_argument("--profile_steps", type=int, default=None,
                               help="profiled steps after the warm-up (default 5; quick 1)")
    profile_group.add_argument("--profile_top", type=int, default=12, help="rows of each profile's op table")
    return parser


def settings_from_args(args, device):
    """Resolve the defaults that depend on --quick, the device and the config; check the ranges."""
    quick = args.quick

    def pick(value, normal, tiny):
        return value if value is not None else (tiny if quick else normal)

    parts = _split_names(args.only, PARTS, "--only")
    overrides = list(args.set)
    if quick:
        overrides = QUICK_NETWORK + overrides
    if args.batch_size is not None:
        overrides.append(f"batch_size={args.batch_size}")
    elif quick:
        overrides.append("batch_size=8")
    if not args.real_data:
        overrides.append("dataset=synthetic")
    cfg = load_config(args.config, overrides)
    kind = diffusion_class(cfg.model_type)
    settings = argparse.Namespace(
        parts=parts,
        cfg=cfg,
        config_path=args.config,
        overrides=overrides,
        data_root=args.data_root,
        quick=quick,
        variants={part: _split_names(getattr(args, f"{part}_variants"), VARIANTS[part], f"--{part}_variants")
                  for part in VARIANTS},
        profile_variants=_split_names(args.profile_variants, TRAIN_VARIANTS, "--profile_variants"),
        profile_steps=pick(args.profile_steps, 5, 1),
        profile_top=args.profile_top,
        compile=args.compile == "on" or (args.compile == "auto" and device.type == "cuda"),
        warmup_steps=pick(args.warmup_steps, 10, 1),
        steps=pick(args.steps, 50, 2),
        # train.py's rule (the config's -1 is "choose from the CPUs"); --quick reads in the main process.
        num_workers=0 if quick and args.num_workers is None else resolve_num_workers(args, cfg),
        sample_batch=pick(args.sample_batch, 1000, 4),
        sample_batches=pick(args.sample_batches, 2, 1),
        sample_steps=pick(args.sample_steps, FULL_SAMPLER_STEPS[kind.SAMPLER], QUICK_SAMPLER_STEPS[kind.SAMPLER]),
        probe_batch=pick(args.probe_batch, cfg.linear.batch_size, 8),
        probe_large_batch=pick(args.probe_large_batch, 1024, 16),
        probe_batches=pick(args.probe_batches, 20, 2),
        parity_steps=pick(args.loss_parity_steps, 0, 4),
        parity_variant=_split_names(args.parity_variant, TRAIN_VARIANTS, "--parity_variant")[0],
    )
    settings.parity_window = args.parity_window or min(settings.parity_steps, max(2, settings.parity_steps // 4))
    if settings.warmup_steps < 0:
        raise UserError(f"--warmup_steps {settings.warmup_steps}: must be 0 or positive")
    for name in ("steps", "sample_batch", "sample_batches", "sample_steps", "probe_batch", "probe_large_batch",
                 "probe_batches", "profile_steps", "profile_top"):
        if getattr(settings, name) < 1:
            raise UserError(f"--{name} {getattr(settings, name)}: must be at least 1")
    if settings.parity_steps < 0:
        raise UserError(f"--loss_parity_steps {settings.parity_steps}: must be 0 (off) or positive")
    if settings.parity_steps and not 2 <= settings.parity_window <= settings.parity_steps:
        raise UserError(f"--parity_window {settings.parity_window} with --loss_parity_steps {settings.parity_steps}: "
                        f"need 2 <= window <= steps (a standard deviation needs two steps)")
    low, high = kind.sample_steps_range(cfg.diffusion)
    if settings.sample_steps < low or (high is not None and settings.sample_steps > high):
        raise UserError(f"--sample_steps {settings.sample_steps}: the {cfg.model_type} sampler takes "
                        f"{low} to {high or 'any number of'} steps")
    return settings


def _split_names(text, known, flag):
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise UserError(f"{flag} {text!r}: use a comma-separated list out of {', '.join(known)}")
    return names


def paper_network(cfg):
    """Index into PAPER_GFLOP of the paper network that ``cfg`` describes, or None."""
    net = cfg.network
    if not all(name in net for name in ("n_channels", "ch_mults", "is_attn", "n_blocks", "use_res_for_updown")):
        return None  # not a UNet of the paper's kind (a U-ViT, a DiT): counted by FlopCounterMode
    key = (net.n_channels, tuple(net.ch_mults), tuple(net.is_attn), net.n_blocks, net.use_res_for_updown)
    keys = list(PAPER_GFLOP)
    return keys.index(key) if key in PAPER_GFLOP and tuple(net.image_shape) == (3, 32, 32) else None


def forward_flops(cfg):
    """(FLOPs of one image's forward pass, where the number comes from).

    The paper's networks use the reference figures; any other network is counted with
    torch's FlopCounterMode on one image (matrix multiplications and convolutions only).
    """
    index = paper_network(cfg)
    if index is not None:
        return list(PAPER_GFLOP.values())[index][0] * 1e9, "reference table"
    net = build_network(cfg).eval()
    x = torch.zeros(1, *cfg.image_shape)
    return count_flops(lambda: net(x, torch.zeros(1))), "FlopCounterMode"


def count_flops(function):
    """FLOPs (matrix products and convolutions) of one call of ``function``."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        function()
    return float(counter.get_total_flops())


def training_flops(cfg):
    """FLOPs of one training image: the reference table for the paper networks, else three forward passes."""
    index = paper_network(cfg)
    if index is not None:
        return list(PAPER_GFLOP.values())[index][1] * 1e9
    return 3 * forward_flops(cfg)[0]


def peak_flops(device_name):
    """Dense bf16 peak FLOP/s of a known GPU, else None (no MFU is reported)."""
    for marker, tflops in PEAK_TFLOPS:
        if marker in device_name:
            return tflops * 1e12
    return None


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU {platform.processor() or platform.machine()}, {threads} thread{'s' if threads > 1 else ''}"


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _mfu(img_s, flops_per_image, peak):
    if img_s is None or peak is None:
        return None
    return 100 * img_s * flops_per_image / peak


def _steady_excess(warmup_seconds, n_warmup, seconds_per_unit):
    """Seconds the warm-up took beyond as many steady steps: compilation, autotuning, first allocations."""
    return max(0.0, warmup_seconds - n_warmup * seconds_per_unit)


def endless_batches(data):
    """train.py's batches, epoch after epoch."""
    epoch = 0
    while True:
        yield from data.batches(epoch)
        epoch += 1


def train_args(settings, variant_flags, compile_allowed):
    flags = [flag for flag in variant_flags if compile_allowed or flag.split("=")[0] != "--compile"]
    # Every timed step has the full batch (img/s = steps x batch, one compiled shape), so an epoch's
    # last, smaller batch is dropped.
    return train.parse_args(["--config", settings.config_path, "--data_root", settings.data_root,
                             "--num_workers", str(settings.num_workers), "--drop_last", *flags])


def build_state(settings, device, variant, compile_allowed):
    """train.py's TrainState for ``variant``: its flags, plus the faithful switches."""
    overrides = [] if variant.fused_adam else ["optim_args.fused=False"]
    cfg = load_config(settings.config_path, settings.overrides + overrides)
    state = train.build_training(cfg, train_args(settings, variant.flags, compile_allowed), device)
    if not variant.sync_free_ema:
        state.ema_updater = state.ema  # ema-pytorch's update(): reads its counters with .item() every step
    return state


def run_training_steps(state, n_warmup, n_timed):
    """Warm up, then time ``n_timed`` steps of train.py's ``train_step``.

    Returns:
        (warm-up seconds, timed seconds, (n_timed,) float32 CPU tensor of the timed steps' losses).
    """
    batches = endless_batches(state.data)
    start = time.perf_counter()
    for _ in range(n_warmup):
        train.train_step(state, next(batches))
    synchronize(state.device)
    warmup_seconds = time.perf_counter() - start
    start = time.perf_counter()
    losses = [train.train_step(state, next(batches)) for _ in range(n_timed)]
    synchronize(state.device)
    seconds = time.perf_counter() - start
    return warmup_seconds, seconds, torch.stack(losses).float().cpu()


def bench_training(context, name):
    settings, device = context.settings, context.device
    variant = TRAIN_VARIANTS[name]
    compiled = variant.compiles and settings.compile
    state = build_state(settings, device, variant, settings.compile)
    batch = state.data.batch_size
    warmup_seconds, seconds, losses = run_training_steps(state, settings.warmup_steps, settings.steps)
    if not torch.isfinite(losses).all():
        raise RuntimeError(f"non-finite training loss {losses.tolist()}")
    img_s = settings.steps * batch / seconds
    return {
        "precision": state.precision, "batch": batch, "img_s": img_s,
        "peak_gib": peak_memory_gib(device),
        "mfu_pct": _mfu(img_s, context.train_flops, context.peak),
        "compile_s": _steady_excess(warmup_seconds, settings.warmup_steps, seconds / settings.steps),
        "mean_loss": float(losses.mean()),
        "note": _compile_note(variant.compiles, compiled, device),
    }


def _compile_note(wanted, compiled, device):
    if wanted and not compiled:
        return f"compile off ({device.type}; --compile on forces it)"
    return ""


def random_head_guidance(diffusion, cfg, device):
    """Guidance toward class 0 by a randomly initialised head on linear.blockname: the cost of a trained one."""
    if not hasattr(diffusion, "guidance_refusal"):
        raise UserError(f"--sample_variants bf16_guided: model_type {cfg.model_type} has no classifier-guided "
                        f"sampler; pass a DDPM config")
    blockname = cfg.linear.blockname
    head = NoiseConditionalHead(feature_dims(diffusion, cfg.image_shape)[blockname], cfg.classes).to(device)
    return HeadGuidance(diffusion.nn_model, head.eval().requires_grad_(False), blockname, 0, 1.0, diffusion.n_T)


def bench_sampling(context, name):
    settings, device, cfg = context.settings, context.device, context.settings.cfg
    variant = SAMPLE_VARIANTS[name]
    compiled = variant.compiles and settings.compile
    precision = resolve_precision(argparse.Namespace(precision=variant.precision, use_amp=False), device)
    batch = settings.sample_batch if variant.large_batch else min(sample.IMAGES_PER_GRID, settings.sample_batch)
    sampler = sample.sampler_settings(cfg, "DDIM", settings.sample_steps, 0.0)
    diffusion = build_diffusion(cfg).to(device).eval().requires_grad_(False)
    configure_backends(argparse.Namespace(cudnn_benchmark=variant.cudnn_benchmark), device)
    sample.prepare_network(diffusion, variant.compile_mode if compiled else None, variant.channels_last)
    image_shape = tuple(cfg.image_shape)
    guidance = random_head_guidance(diffusion, cfg, device) if variant.guided else None

    def one_batch(index, steps):
        seeds = [sample.image_seed(0, i) for i in range(index * batch, (index + 1) * batch)]
        with autocast(device, precision):
            images = sample.draw_images(diffusion, dict(sampler, steps=steps), PerImageNoise(seeds, device),
                                        batch, image_shape, guidance)
        return to_uint8(images).cpu()  # sample.py's one copy of a batch to the host

    warmup_steps = 2  # the shapes of a full run: enough for compilation and autotuning
    start = time.perf_counter()
    one_batch(0, warmup_steps)
    synchronize(device)
    warmup_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for index in range(settings.sample_batches):
        one_batch(index, sampler["steps"])
    synchronize(device)
    seconds = time.perf_counter() - start
    img_s = settings.sample_batches * batch / seconds
    evaluations = context.network_evaluations(sampler["steps"])
    return {
        "precision": precision, "batch": batch,
        "sampler": sampler_label(cfg, sampler["steps"]) + (" + classifier guidance" if variant.guided else ""),
        "img_s": img_s, "s_50k": N_SAMPLES_FID / img_s,
        "peak_gib": peak_memory_gib(device),
        "mfu_pct": _mfu(img_s, context.forward_flops * evaluations, context.peak),
        "compile_s": _steady_excess(warmup_seconds, warmup_steps / sampler["steps"],
                                    seconds / settings.sample_batches),
        "note": _compile_note(variant.compiles, compiled, device) or
                ("MFU counts the sampler's forward passes only" if variant.guided else ""),
    }


def bench_probe(context, name):
    settings, device, cfg = context.settings, context.device, context.settings.cfg
    variant = PROBE_VARIANTS[name]
    compiled = variant.compiles and settings.compile
    precision = resolve_precision(argparse.Namespace(precision=variant.precision, use_amp=False), device)
    batch = settings.probe_large_batch if variant.large_batch else settings.probe_batch
    timesteps, blocks = probe_cells(cfg, grid=True)
    configure_backends(argparse.Namespace(cudnn_benchmark=variant.cudnn_benchmark), device)
    diffusion = prepare_frozen(build_diffusion(cfg), device, compile=variant.compile_mode if compiled else None)
    img_s, compile_s = timed_feature_pass(diffusion, timesteps, blocks, tuple(cfg.image_shape), batch,
                                          precision, settings.probe_batches, compiled, settings.quick)
    return {
        "precision": precision, "batch": batch, "cells": f"{len(timesteps)} t x {len(blocks)} blocks",
        "img_s": img_s, "peak_gib": peak_memory_gib(device),
        "mfu_pct": _mfu(img_s, context.forward_flops * len(timesteps), context.peak),
        "compile_s": compile_s,
        "note": _compile_note(variant.compiles, compiled, device),
    }


def timed_feature_pass(diffusion, timesteps, blocks, image_shape, batch, precision, n_batches, compiled, quick):
    """``feature_pass_throughput`` timed as a whole: (img/s of the timed batches, seconds the warm-up took
    beyond as many steady batches, i.e. compilation and autotuning)."""
    warmup = 3 if compiled or not quick else 1
    start = time.perf_counter()
    img_s = feature_pass_throughput(diffusion, timesteps, blocks, image_shape, batch_size=batch, precision=precision,
                                    n_batches=n_batches, warmup=warmup)
    total_seconds = time.perf_counter() - start
    return img_s, _steady_excess(total_seconds - n_batches * batch / img_s, warmup, batch / img_s)


def loss_parity(context):
    """Same seed, same steps: train.py in fp32 on the DataLoader path, and --parity_variant (fast).

    Returns:
        the mean loss of both over the last ``window`` steps, their difference, the reference's
        step-to-step standard deviation there, and the difference in units of the standard error
        of a difference of two window means (|z| < 3: within noise).
    """
    settings, device = context.settings, context.device
    n, window = settings.parity_steps, settings.parity_window
    curves = {}
    for label, variant in (("fp32", TRAIN_VARIANTS["fp32"]), ("fast", TRAIN_VARIANTS[settings.parity_variant])):
        state = build_state(settings, device, variant, settings.compile)
        _, _, curves[label] = run_training_steps(state, 0, n)
        del state
        free_memory(device)
        if settings.compile:
            torch.compiler.reset()
    ref, fast = curves["fp32"][-window:].double(), curves["fast"][-window:].double()
    std = float(ref.std())
    spread = math.sqrt((float(ref.var()) + float(fast.var())) / window)  # standard error of the difference
    difference = float(fast.mean() - ref.mean())
    z = difference / spread if spread > 0 else float("nan")
    return {
        "variant": settings.parity_variant, "steps": n, "window": window, "loss_fp32": float(ref.mean()), "loss_fast": float(fast.mean()),
        "difference": difference, "step_std": std, "difference_over_std": difference / std if std > 0 else None,
        "z": z, "within_noise": bool(abs(z) < 3) if math.isfinite(z) else None,
        "note": _compile_note(True, settings.compile, device),
        "curves": {label: curve.tolist() for label, curve in curves.items()},
    }


def profile_training(context, name):
    """Where the time of ``name``'s training step goes: after the warm-up, ``profile_steps`` timed steps
    give the wall time per step, then as many steps under torch.profiler give the op table.

    On CUDA the op table ranks kernels by device time; ``device_busy_ms`` against ``wall_ms`` tells
    whether the step waits on the GPU (busy close to wall) or on the host launching kernels (busy far
    below wall, the case CUDA graphs fix). On a CPU it ranks operators by their own CPU time.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    settings, device = context.settings, context.device
    state = build_state(settings, device, TRAIN_VARIANTS[name], settings.compile)
    n = settings.profile_steps
    on_cuda = device.type == "cuda"
    batches = endless_batches(state.data)
    for _ in range(settings.warmup_steps):
        train.train_step(state, next(batches))
    synchronize(device)
    # The wall time comes from unprofiled steps: the profiler's own per-op cost would inflate it.
    start = time.perf_counter()
    for _ in range(n):
        train.train_step(state, next(batches))
    synchronize(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / n
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as profiler:
        for _ in range(n):
            train.train_step(state, next(batches))
        synchronize(device)

    def own_time(event):  # microseconds
        if on_cuda:
            return getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0))
        return event.self_cpu_time_total

    # On CUDA: kernels, copies and memsets only; the GPU-side spans of user annotations (an optimizer
    # step, a compiled region) enclose kernels and would count their time twice.
    events = [event for event in profiler.key_averages()
              if own_time(event) > 0 and (not on_cuda or (event.device_type == DeviceType.CUDA
                                                          and not getattr(event, "is_user_annotation", False)))]
    total_us = sum(own_time(event) for event in events)
    events.sort(key=own_time, reverse=True)
    top = [{"op": event.key[:90], "calls_per_step": event.count / n, "ms_per_step": own_time(event) / 1e3 / n,
            "share_pct": 100 * own_time(event) / total_us if total_us else None}
           for event in events[:settings.profile_top]]
    return {
        "precision": state.precision, "batch": state.data.batch_size, "steps": n, "wall_ms": wall_ms,
        "device_busy_ms": total_us / 1e3 / n if on_cuda else None,
        "busy_pct": 100 * total_us / 1e3 / n / wall_ms if on_cuda else None,
        "kernels_per_step": sum(event.count for event in events) / n if on_cuda else None,
        "ops_per_step": sum(event.count for event in profiler.key_averages()
                            if event.device_type == DeviceType.CPU) / n,
        "top": top,
        "note": _compile_note(TRAIN_VARIANTS[name].compiles, TRAIN_VARIANTS[name].compiles and settings.compile,
                              device),
    }


def plot_parity(row, path):
    """The two loss curves of a parity run, each smoothed by a running mean over a tenth of the window."""
    span = max(1, row["window"] // 10)
    records = [{"step": step} for step in range(1, row["steps"] + 1)]
    for label, curve in (("fp32", row["curves"]["fp32"]), (row.get("variant", "fast"), row["curves"]["fast"])):
        values = torch.tensor(curve, dtype=torch.float64)
        cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), values.cumsum(0)])
        for index, record in enumerate(records):
            low = max(0, index + 1 - span)
            record[label] = float((cumulative[index + 1] - cumulative[low]) / (index + 1 - low))
    plot_curves(records, "step", [key for key in records[0] if key != "step"], path, logy=True,
                title=f"training loss, running mean of {span} steps (z = {row['z']:.2f} over the last {row['window']})")


@dataclass
class Context:
    """What every part needs: settings, device, FLOP figures and the peak FLOP/s."""

    settings: argparse.Namespace
    device: torch.device
    forward_flops: float
    flops_source: str
    train_flops: float
    peak: float | None
    header: dict = field(default_factory=dict)      # shown above the tables
    original: dict = field(default_factory=dict)    # {part: (value, text)} from original_figures

    def network_evaluations(self, steps):
        """Network calls per image of the config's sampler: DDIM one per step, Heun 2 * steps - 1."""
        return diffusion_class(self.settings.cfg.model_type).network_calls(steps)


class Report:
    """Rows of every part, written as markdown and JSON after each one."""

    def __init__(self, context, out_path):
        self.context = context
        self.md_path = Path(out_path)
        self.json_path = self.md_path.with_suffix(".json")
        self.rows = {part: [] for part in PARTS}

    def add(self, part, row):
        self.rows[part].append(row)
        if part == "parity" and row.get("curves"):
            try:
                plot_parity(row, self.parity_plot_path)
                row["plot"] = self.parity_plot_path.name  # beside the table
            except Exception as err:  # a figure must not cost the numbers of a long run
                row["note"] = f"{row.get('note') or ''} plot failed: {one_line(err)}".strip()
        self.write()

    @property
    def parity_plot_path(self):
        return self.md_path.with_name(self.md_path.stem + "_curves.png")

    def to_dict(self):
        return {"header": self.context.header, "original_h200": self.context.original, **self.rows}

    def write(self):
        text = self.markdown()
        with atomic_path(self.md_path, fix="pass --out with a writable path") as temporary:
            with open(temporary, "w") as file:
                file.write(text)
        save_json(self.to_dict(), self.json_path)

    def markdown(self):
        header = self.context.header
        lines = [f"# Benchmark: {header['config']} on {header['device']}", ""]
        lines += [f"- {key}: {value}" for key, value in header.items() if key not in ("config", "device")]
        for part, title, columns in (
                ("train", "Training", TRAIN_COLUMNS), ("sample", "Sampling", SAMPLE_COLUMNS),
                ("probe", "Probe feature pass (--grid)", PROBE_COLUMNS), ("parity", "Loss parity", PARITY_COLUMNS),
                ("profile", "Profile of a training step", PROFILE_COLUMNS)):
            if not self.rows[part]:
                continue
            lines += ["", f"## {title}", ""]
            caption = self.caption(part)
            if caption:
                lines += [caption, ""]
            lines += markdown_table(self.rows[part], columns)
            lines += [f"\nLoss curves: [{row['plot']}]({row['plot']})" for row in self.rows[part] if row.get("plot")]
        for row in self.rows["profile"]:
            if row.get("top"):
                unit = "device" if row.get("device_busy_ms") is not None else "own CPU"
                lines += ["", f"### Profile of {row['variant']}: top ops by {unit} time", ""]
                lines += markdown_table(row["top"], PROFILE_TOP_COLUMNS)
        return "\n".join(lines) + "\n"

    def caption(self, part):
        if part not in self.context.original:
            return ""
        return f"The original code on one H200 (torch 2.11, --use_amp): {self.context.original[part][1]}."


def _fmt(value, digits=1):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


TRAIN_COLUMNS = (("variant", "variant", None), ("precision", "precision", None), ("batch", "batch", None),
                 ("img/s", "img_s", 0), ("speedup vs faithful", "speedup", 2), ("x original (H200)", "x_original", 2),
                 ("peak GiB", "peak_gib", 2), ("MFU %", "mfu_pct", 1), ("compile s", "compile_s", 1),
                 ("status", "status", None))
SAMPLE_COLUMNS = (("variant", "variant", None), ("precision", "precision", None), ("batch", "batch", None),
                  ("sampler", "sampler", None), ("img/s", "img_s", 1), ("50k s", "s_50k", 0),
                  ("x original (H200)", "x_original", 2), ("peak GiB", "peak_gib", 2), ("MFU %", "mfu_pct", 1),
                  ("compile s", "compile_s", 1), ("status", "status", None))
PROBE_COLUMNS = (("variant", "variant", None), ("precision", "precision", None), ("batch", "batch", None),
                 ("cells", "cells", None), ("img/s", "img_s", 0), ("x original (H200)", "x_original", 2),
                 ("peak GiB", "peak_gib", 2), ("MFU %", "mfu_pct", 1), ("compile s", "compile_s", 1),
                 ("status", "status", None))
PARITY_COLUMNS = (("variant", "variant", None), ("steps", "steps", None), ("window", "window", None), ("fp32 loss", "loss_fp32", 5),
                  ("variant loss", "loss_fast", 5), ("difference", "difference", 5), ("step std", "step_std", 5),
                  ("difference / std", "difference_over_std", 3), ("z", "z", 2), ("within noise", "within_noise", None),
                  ("status", "status", None))

PROFILE_COLUMNS = (("variant", "variant", None), ("precision", "precision", None), ("batch", "batch", None),
                   ("wall ms/step", "wall_ms", 1), ("GPU busy ms/step", "device_busy_ms", 1),
                   ("GPU busy %", "busy_pct", 0), ("kernels/step", "kernels_per_step", 0),
                   ("CPU ops/step", "ops_per_step", 0), ("status", "status", None))
PROFILE_TOP_COLUMNS = (("op", "op", None), ("calls/step", "calls_per_step", 1), ("ms/step", "ms_per_step", 2),
                       ("share %", "share_pct", 1))


def markdown_table(rows, columns):
    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = []
        for _, key, digits in columns:
            value = row.get(key)
            if key == "status" and row.get("note"):
                value = f"{value}; {row['note']}"
            cells.append(_fmt(value, digits) if digits is not None else _fmt(value))
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return lines


def one_line(err):
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:200]


def run_job(report, part, name, job, deadline):
    """Run one variant and add its row: measured, failed (with its one-line error) or skipped."""
    context = report.context
    row = {"variant": name}
    if deadline is not None and time.perf_counter() >= deadline:
        row["status"] = "skipped: --time_budget_s spent"
        report.add(part, row)
        print(f"[{part}] {name}: skipped (time budget spent)", flush=True)
        return row
    free_memory(context.device)
    start = time.perf_counter()
    try:
        row.update(job())
        row["status"] = "ok"
    except Exception as err:  # one broken variant (compile missing, out of memory) must not end the run
        row["status"] = f"failed: {one_line(err)}"
    finally:
        if context.settings.compile:
            torch.compiler.reset()  # each compiled variant pays, and reports, its own compilation
        free_memory(context.device)
    row["wall_s"] = time.perf_counter() - start
    add_comparisons(context, part, row, report.rows[part])
    report.add(part, row)
    shown = {key: value for key, value in row.items() if key != "curves"}
    print(f"[{part}] {name}: {shown}", flush=True)
    return row


def add_comparisons(context, part, row, earlier_rows):
    """Speed-up over the faithful training variant, and over the original code when this device is an H200."""
    if row.get("img_s") is None:
        return
    if part == "train":
        faithful = row if row.get("variant") == "faithful" else next(
            (r for r in earlier_rows if r.get("variant") == "faithful" and r.get("img_s")), None)
        row["speedup"] = row["img_s"] / faithful["img_s"] if faithful else None
    if part not in context.original or "H200" not in context.header["device"]:
        return
    value = context.original[part][0]
    if part == "sample":
        cfg = context.settings.cfg
        full = sampler_label(cfg, FULL_SAMPLER_STEPS[diffusion_class(cfg.model_type).SAMPLER])
        row["x_original"] = value / row["s_50k"] if row["sampler"] == full else None
    else:
        row["x_original"] = row["img_s"] / value


def make_header(args, settings, device, forward, source, train_flops, peak):
    """The table's header lines: what ran, where, with which command and which reference figures."""
    cfg = settings.cfg
    return {
        "config": config_name(args.config),
        "device": device_name(device),
        "torch": torch.__version__ + (f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""),
        "command": "python " + shlex.join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "network": f"{count_parameters(build_network(cfg)) / 1e6:.2f}M parameters, "
                   f"forward {forward / 1e9:.2f} GFLOP/image ({source}), training {train_flops / 1e9:.2f} "
                   f"GFLOP/image",
        "peak used for MFU": f"{peak / 1e12:.0f} TFLOP/s dense bf16" if peak else "unknown device: no MFU",
        "data": f"{cfg.dataset} from {args.data_root}" if args.real_data
                else "the built-in synthetic images (a step's time does not depend on the pixels)",
        "timing": f"training {settings.warmup_steps} warm-up + {settings.steps} timed steps; sampling "
                  f"{settings.sample_batches} timed batch(es) after a 2-step warm-up batch; probe "
                  f"{settings.probe_batches} timed batches; compile {'on' if settings.compile else 'off'}",
    }


def original_figures(cfg):
    """The original code's figures on one H200 (torch 2.11, --use_amp) that apply to ``cfg``: {part: (value, text)}."""
    index = paper_network(cfg)
    if index is None:
        return {}
    model_type = cfg.model_type
    figures = {}
    if (model_type, index) in ORIGINAL_TRAIN_IMG_S:
        value = ORIGINAL_TRAIN_IMG_S[(model_type, index)]
        figures["train"] = (value, f"{value:,.0f} img/s at batch {128 if index == 0 else 64}")
    steps = FULL_SAMPLER_STEPS[diffusion_class(model_type).SAMPLER]
    if (model_type, index, steps) in ORIGINAL_SAMPLE_50K_S:
        value = ORIGINAL_SAMPLE_50K_S[(model_type, index, steps)]
        figures["sample"] = (value, f"{value:,.0f} s for 50k samples, {sampler_label(cfg, steps)}")
    if (model_type, index) in ORIGINAL_PROBE_IMG_S:
        value = ORIGINAL_PROBE_IMG_S[(model_type, index)]
        figures["probe"] = (value, f"{value:,.0f} img/s at batch 128 (3 timesteps, all blocks)")
    return figures


def sampler_label(cfg, steps):
    return f"{diffusion_class(cfg.model_type).SAMPLER} {steps}"


@cli_entry
def main(args):
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif args.quick:
        torch.set_num_threads(1)  # tiny tensors gain nothing from threads, and spinning ones stall a shared CPU
    settings = settings_from_args(args, device)
    forward, source = forward_flops(settings.cfg)
    train_flops = training_flops(settings.cfg)
    peak = peak_flops(device_name(device)) if device.type == "cuda" else None
    context = Context(settings, device, forward, source, train_flops, peak)
    context.header = make_header(args, settings, device, forward, source, train_flops, peak)
    context.original = original_figures(settings.cfg)
    report = Report(context, args.out)
    report.write()
    deadline = None if args.time_budget_s is None else time.perf_counter() + args.time_budget_s
    print(f"benchmark of {context.header['config']} on {context.header['device']} ({context.header['torch']}); "
          f"results go to {report.md_path} and {report.json_path}", flush=True)

    jobs = []
    benches = {"train": bench_training, "sample": bench_sampling, "probe": bench_probe}
    for part in ("train", "sample", "probe"):
        if part in settings.parts:
            for name in settings.variants[part]:
                jobs.append((part, name, lambda p=part, n=name: benches[p](context, n)))
    # Compiled evaluation variants go last: a spent time budget then costs the cheap rows least.
    jobs.sort(key=lambda job: job[0] != "train" and VARIANTS[job[0]][job[1]].compiles)
    if "parity" in settings.parts:
        if settings.parity_steps > 0:
            jobs.append(("parity", settings.parity_variant, lambda: loss_parity(context)))
        else:
            report.add("parity", {"status": "skipped: pass --loss_parity_steps N to run it"})
    if "profile" in settings.parts:
        for name in settings.profile_variants:
            jobs.append(("profile", name, lambda n=name: profile_training(context, n)))
    for part, name, job in jobs:
        run_job(report, part, name, job, deadline)
    print("\n" + report.markdown(), flush=True)
    return report.to_dict()


if __name__ == "__main__":
    main(build_parser().parse_args())
