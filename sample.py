"""Sample images with the EMA weights of a checkpoint, in the original's folders, on any number of processes.

    python sample.py --config config/DDPM_ddpm.yaml --use_amp --epoch 1999               # DDIM, 100 steps
    python sample.py --config config/DDPM_ddpm.yaml --use_amp --epoch 1999 --mode DDPM   # ancestral, n_T steps
    python sample.py --config config/DDPM_ddpm.yaml --epoch 1999 --mode DDPM --steps 100 # ancestral, respaced
    python sample.py --config config/DDPM_guide_ddpm.yaml --epoch 1999 --w 0.3          # guided; image i of class i % 10
    python sample.py --config config/DDPM_ddpm.yaml --epoch 1999 --class 3 --classifier_scale 2 \
        --classifier_head output_DDPM_ddpm/noisy_DDAE_ep1999_sha1a2b3c4d/head.pth        # guided by its DDAE head
    torchrun --standalone --nproc_per_node=8 sample.py --config config/EDM_ddpm.yaml --precision bf16 \\
        --batch_size 1000 --fid data/cifar10-pngs/                                       # Heun 18, then FID

The images go to save_dir/EMAgenerated_ep{E}_ddim_steps{S}_eta{H} (DDIM), ..._ep{E}_ddpm (ancestral;
..._ddpm_steps{S} respaced to S steps) or ..._ep{E}_edm_steps{S}_eta{H} (EDM), with ``_guided{sha}_class{K}_scale{S}`` after it when guided by a DDAE head
(``model/guidance.py``; sha: the start of the head file's hash): ``pngs/{i}.png`` for every
image and ``grid_{b}.png`` for every 400 of them (20 per row), so
``python -m pytorch_fid data/cifar10-pngs/ <folder>/pngs/`` works.

Image i depends only on (--seed, i): its starting noise and every later noise come from its own
generator (model.noise.PerImageNoise), and every process count cuts the same batches of --batch_size
(each process takes whole ones). So the files are the same on 1 or N processes at the same --batch_size
and, on a CPU, the same intra-op thread count: a plain python run takes torchrun's (OMP_NUM_THREADS,
else 1), since a CPU matmul's rounding depends on it. At another --batch_size they agree up to kernel
rounding. Work is split by index; a rerun into the same folder makes only the missing images, and
sampling.json in the folder stops a run with other settings from mixing its images in (the model is named by
one hash, checkpoint_sha256: sha256sum of the file, or a diffusers folder's documented command; its record stays
the first run's, a later run that adds images is listed under "continued"); its "sampler" says which ran ("DDAE DDIM", or a diffusers folder's own "diffusers DDIMScheduler(...)").
"""
import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.amp import autocast
from model.guide import image_classes
from model.guidance import load_head_guidance
from model.models import diffusion_class, load_config, load_diffusion
from model.noise import PerImageNoise
from model.speed import compile_module
from utils.atomic import atomic_path
from utils.checkpoint import CHECKPOINT_NAME, weights_digest
from utils.cli import (add_amp_args, add_checkpoint_args, add_speed_args, checkpoint_from_args, configure_backends,
                       resolve_precision)
from utils.config import REQUIRED, add_config_args, settings_of
from utils.data import DATASETS, FID_SAMPLES, dataset_spec, image_seed, split_batches
from utils.distributed import (add_launcher_args, barrier, cleanup, decide_on_main, get_rank, get_world_size,
                               init_distributed, is_main, print0, torchrun_cpu_threads)
from utils.errors import UserError, WriteFailed, cli_entry
from utils.images import remove_temporary_files, save_grid, save_png, to_uint8
from utils.preemption import StopSignals
from utils.progress import progress as progress_bar
from utils.provenance import provenance

IMAGES_PER_GRID = 400   # the original's sampling batch: one grid_{b}.png per 400 images
GRID_NROW = 20
SETTINGS_FILE = "sampling.json"
# Keys of sampling.json that decide the pixels; a folder holds images of one value of each.
IDENTITY_KEYS = ("checkpoint_sha256", "model_type", "diffusion", "image_shape", "sampler", "mode", "steps", "eta",
                 "seed", "precision", "noise_device", "pixels", "w",
                 "classifier_guidance")
PNG_WRITERS = 4         # threads encoding PNGs while the device samples the next batch
WRITE_FIX = ("free disk space or pass --out_dir with a writable folder; the same command writes only the "
             "missing images")  # a failed PNG write


def sampling_defaults(cfg):
    """The defaults of the diffusion kind's sampling keys: a folder recorded before a key existed (such as
    ``prediction``) was made at its default, so it continues under a config that leaves the key at it."""
    kind = diffusion_class(cfg.model_type)
    skip = getattr(kind, "TRAINING_ONLY_KEYS", ())
    return json.loads(json.dumps({name: default for name, (_, default) in settings_of(kind, skip=1).items()
                                  if default is not REQUIRED and name not in skip}))


def sampling_keys(cfg):
    """The diffusion section without its training-only keys (loss weighting, timestep distribution), which
    sampling ignores: a folder's settings do not change with them."""
    skip = getattr(diffusion_class(cfg.model_type), "TRAINING_ONLY_KEYS", ())
    return {key: value for key, value in cfg.diffusion_kwargs().items() if key not in skip}


def build_parser():
    parser = argparse.ArgumentParser(description="Sample images from a trained DDAE model (EMA weights).")
    add_config_args(parser)
    add_amp_args(parser)
    add_checkpoint_args(parser)
    add_launcher_args(parser)
    parser.add_argument("--mode", choices=("DDIM", "DDPM"), default="DDIM",
                        help="DDPM configs: DDIM sampler or ancestral DDPM sampler (n_T steps); EDM uses Heun")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps (default: DDIM 100, EDM 18, ancestral n_T; fewer ancestral steps are "
                             "respaced as in improved-diffusion)")
    parser.add_argument("--eta", type=float, default=None,
                        help="stochasticity: DDIM eta or EDM churn, 0 to 1 (default 0; not for --mode DDPM)")
    parser.add_argument("--w", type=float, default=None,
                        help="conditional models: classifier-free guidance scale, (1 + w) * conditional - w * "
                             "unconditional (default: the config's w, 0.3); image i is of class i %% classes")
    parser.add_argument("--batches", type=int, default=None,
                        help=f"number of {IMAGES_PER_GRID}-image batches (default: the dataset's FID count, "
                             f"{FID_SAMPLES:,} for {', '.join(n for n, s in DATASETS.items() if s.fid_samples > 400)}; "
                             f"else one batch)")
    parser.add_argument("--n_samples", type=int, default=None, help="exact number of images (overrides --batches)")
    parser.add_argument("--seed", type=int, default=0, help="image i is a function of (seed, i)")
    parser.add_argument("--batch_size", type=int, default=IMAGES_PER_GRID,
                        help="images per forward pass and process (larger is faster on big GPUs)")
    add_speed_args(parser, "torch.compile the network (the first batch compiles it, about a minute on a GPU)")
    parser.add_argument("--channels_last", action="store_true",
                        help="run the network in channels-last memory format (faster with AMP on recent GPUs)")
    parser.add_argument("--classifier_head", default=None, metavar="PATH",
                        help="guide a DDPM model's DDIM or ancestral sampler toward --class with the head.pth that "
                             "noisy_classifier_DDAE.py trained on this checkpoint (classifier guidance)")
    parser.add_argument("--classifier_scale", type=float, default=None, metavar="S",
                        help="guidance scale: S * grad log p(class | x_t) is added (default 1.0; needs --classifier_head)")
    parser.add_argument("--class", dest="class_index", type=int, default=None, metavar="K",
                        help="the class that --classifier_head steers toward (0 to classes - 1)")
    parser.add_argument("--out_dir", default=None,
                        help="output folder (default: save_dir/EMAgenerated_ep{E}_..., the original's name)")
    parser.add_argument("--fid", default=None, metavar="REF",
                        help="after sampling, print the FID against REF: a PNG folder, an .npz or dataset:NAME")
    from fid import add_fid_args  # fid.py imports pytorch-fid; keep it next to the flag it serves
    add_fid_args(parser)
    return parser


def sampler_settings(cfg, mode, steps, eta):
    """The sampler a run uses: {"mode": "DDIM" | "DDPM" | "EDM", "steps": int or None, "eta": float or None},
    as the diffusion kind decides from the flags."""
    return diffusion_class(cfg.model_type).sampler_settings(cfg.diffusion, mode, steps, eta)


def classifier_free_guidance(args, cfg, n_samples):
    """The guidance scale of a conditional model ({"w": --w or the config's w}, to add to the sampler), {} for
    an unconditional one; a UserError for --w on an unconditional model or a count that is not class-balanced."""
    if not getattr(diffusion_class(cfg.model_type), "conditional", False):
        if args.w is not None:
            raise UserError(f"--w {args.w}: {cfg.model_type} is not a conditional model; drop --w (guidance needs a "
                            f"config with network.n_classes, e.g. config/cifar_conditional.yaml)")
        return {}
    classes = cfg.network.n_classes
    if n_samples % classes:
        raise UserError(f"--n_samples {n_samples}: a conditional model samples every class equally (image i is of "
                        f"class i % {classes}); pass a multiple of {classes}")
    return {"w": float(cfg.w if args.w is None else args.w)}


def sample_count(args, cfg):
    """The number of images to make: --n_samples, else --batches x 400, else the FID protocol's 50,000
    for the real datasets and one batch of 400 for the others (the synthetic demo, image folders)."""
    if args.n_samples is not None:
        if args.n_samples < 1:
            raise UserError(f"--n_samples {args.n_samples}: pass a positive number of images")
        return args.n_samples
    if args.batches is not None:
        if args.batches < 1:
            raise UserError(f"--batches {args.batches}: pass a positive number of {IMAGES_PER_GRID}-image batches")
        return args.batches * IMAGES_PER_GRID
    return dataset_spec(cfg.dataset).fid_samples


def describe_sampler(sampler, n_T=None):
    """The sampler in words for the log, e.g. "DDIM, 100 steps, eta 0.0" or "DDPM ancestral, 1000 steps"
    (", guidance w 0.3" for a conditional model)."""
    guided = f", guidance w {sampler['w']}" if "w" in sampler else ""
    if sampler["mode"] == "DDPM":
        return f"DDPM ancestral, {sampler['steps'] or n_T} steps" + (" respaced" if sampler["steps"] else "") + guided
    return f"{sampler['mode']}, {sampler['steps']} steps, eta {sampler['eta']}{guided}"


def epoch_label(checkpoint_path):
    """``ep{E}`` for a ``model_{E}.pth`` file, else the file's stem."""
    name = os.path.basename(checkpoint_path)
    match = CHECKPOINT_NAME.match(name)
    return f"ep{match.group(1)}" if match else os.path.splitext(name)[0]


def folder_name(label, sampler, guidance=None):
    """The original's folder name, e.g. EMAgenerated_ep400_ddim_steps100_eta0.0 (eta as Python prints it); a
    guided sampler's names its scale as the sister codebase does: EMAgenerated_ep400_w0.3_ddim_steps100_eta0.0;
    then ``_guided{head sha}_class{K}_scale{S}`` for classifier guidance (``guidance``: its sampling.json record)."""
    if "w" in sampler:
        label = f"{label}_w{sampler['w']}"
    if sampler["mode"] == "DDPM":
        name = f"EMAgenerated_{label}_ddpm" + (f"_steps{sampler['steps']}" if sampler["steps"] else "")
    else:
        name = f"EMAgenerated_{label}_{sampler['mode'].lower()}_steps{sampler['steps']}_eta{sampler['eta']}"
    if guidance:
        name += f"_guided{guidance['head_sha256'][:8]}_class{guidance['class']}_scale{guidance['scale']}"
    return name


def check_guidance_flags(args, cfg):
    """The classifier-guidance flags, before the model loads: --classifier_head with --class, for a kind that
    guides (DDPM); returns whether guidance is asked for."""
    if args.classifier_head is None:
        if args.classifier_scale is not None or args.class_index is not None:
            flag = "--classifier_scale" if args.classifier_scale is not None else "--class"
            raise UserError(f"{flag} needs --classifier_head PATH (a head.pth of noisy_classifier_DDAE.py); add it, "
                            f"or drop {flag}")
        return False
    if args.class_index is None:
        raise UserError(f"--classifier_head needs --class K, the class to steer toward (0 to {cfg.classes - 1})")
    if not hasattr(diffusion_class(cfg.model_type), "guidance_refusal"):
        raise UserError(f"--classifier_head: model_type {cfg.model_type} has no classifier-guided sampler (DDPM's "
                        f"DDIM and ancestral samplers have one); pass a DDPM model, or drop --classifier_head")
    return True


def grid_range(grid, n_samples):
    return range(grid * IMAGES_PER_GRID, min((grid + 1) * IMAGES_PER_GRID, n_samples))


def grid_count(n_samples):
    return -(-n_samples // IMAGES_PER_GRID)


def _identity(settings):
    return {key: settings.get(key) for key in IDENTITY_KEYS}  # w: None for an unconditional model


def _describe(values):
    return ", ".join(f"{key}={values[key]}" for key in values)


def _legacy(recorded, settings, settings_path, tensor_digest):
    """A sampling.json from before ``checkpoint_sha256`` named the model by the SHA-256 of its file, when it
    named the loaded tensors (``weights_sha256``): the same tensors of a checkpoint file are the same model
    (the record is upgraded); a diffusers folder's configs were not recorded, so its images are refused."""
    if "checkpoint_sha256" in recorded or "weights_sha256" not in recorded:
        return
    if os.path.isdir(settings["checkpoint"]):
        raise UserError(f"{settings_path} was written before sampling.json named a diffusers folder's UNet and "
                        f"scheduler configs, so its images may be of another configuration of these weights; pass "
                        f"--out_dir with a new folder, or delete that one to start over")
    if tensor_digest() == recorded["weights_sha256"]:
        recorded["checkpoint_sha256"] = settings["checkpoint_sha256"]
        del recorded["weights_sha256"]
    else:
        recorded["checkpoint_sha256"] = f"unknown (other weights: weights_sha256 {recorded['weights_sha256'][:12]}...)"


def prepare_folder(out_dir, settings, n_samples, tensor_digest=None, diffusion_defaults=None):
    """Check ``out_dir`` against ``settings``, record them, and list the images still to make. A folder's
    record stays the first run's; a later run that adds images is listed under ``"continued"`` (images and
    provenance), and one that adds none leaves the file as it was.

    Args:
        tensor_digest: gives ``utils.checkpoint.weights_digest`` of the loaded model, for folders recorded
            before ``checkpoint_sha256`` (``_legacy``).
        diffusion_defaults: the diffusion section's defaults (``sampling_defaults``), for folders recorded
            before a key of it existed.

    Returns:
        the sorted indices below ``n_samples`` whose ``pngs/{i}.png`` is missing.
    """
    pngs = os.path.join(out_dir, "pngs")
    settings_path = os.path.join(out_dir, SETTINGS_FILE)
    try:
        os.makedirs(pngs, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {pngs} ({err.strerror}); pass --out_dir with a writable folder") from None
    present = {name for name in os.listdir(pngs) if name.endswith(".png")}
    recorded = None
    if os.path.isfile(settings_path):
        try:
            with open(settings_path) as file:
                recorded = json.load(file)
        except (OSError, ValueError) as err:
            raise UserError(f"{settings_path} is unreadable ({err}); pass --out_dir with a new folder, or "
                            f"delete that one") from None
        wanted = json.loads(json.dumps(_identity(settings)))  # tuples -> lists, as the file holds them
        recorded.setdefault("sampler", f"DDAE {recorded.get('mode')}")  # folders from before the key: DDAE's
        _legacy(recorded, settings, settings_path, tensor_digest)
        recorded.setdefault("pixels", "truncate")  # folders from before the key: torchvision's rule
        if isinstance(recorded.get("diffusion"), dict) and isinstance(wanted.get("diffusion"), dict):
            recorded["diffusion"] = {**{key: value for key, value in (diffusion_defaults or {}).items()
                                        if key in wanted["diffusion"]}, **recorded["diffusion"]}
        differing = [key for key in IDENTITY_KEYS if recorded.get(key) != wanted[key]]
        if differing:
            before = _describe({key: recorded.get(key) for key in differing})
            now = _describe({key: wanted[key] for key in differing})
            raise UserError(f"{out_dir} holds images sampled with {before}, but this run has {now}; pass "
                            f"--out_dir with another folder, or delete that one to start over")
    elif present:
        raise UserError(f"{pngs} holds {len(present)} images but no {SETTINGS_FILE} says how they were made; "
                        f"pass --out_dir with a new folder, or delete that one")
    remove_temporary_files(pngs)
    remove_temporary_files(out_dir)
    missing = [i for i in range(n_samples) if f"{i}.png" not in present]
    if recorded is None:
        record = dict(settings, n_samples=n_samples)
    elif missing:  # the images of this run are listed apart: the record's provenance made the first ones
        record = dict(recorded, n_samples=max(recorded.get("n_samples", 0), n_samples),
                      continued=recorded.get("continued", []) + [{"images": len(missing),
                                                                   "provenance": settings["provenance"]}])
    else:
        return missing  # nothing to draw: the record stays the one of the runs that drew the images
    with atomic_path(settings_path, fix="pass --out_dir with a writable folder") as temporary:
        with open(temporary, "w") as file:
            json.dump(record, file, indent=1)
    return missing


class GridCollector:
    """Keeps the images of the grids that this process makes entirely, and returns each grid once complete.

    Grids with images made elsewhere (another process, an earlier run) are assembled from the PNG
    files at the end instead (``write_missing_grids``).
    """

    def __init__(self, batches, n_samples):
        here = {i for batch in batches for i in batch}
        self.sizes = {grid: len(grid_range(grid, n_samples)) for grid in range(grid_count(n_samples))
                      if all(i in here for i in grid_range(grid, n_samples))}
        self.parts = {grid: {} for grid in self.sizes}

    def add(self, indices, pixels):
        """Take a batch (indices, (B, C, H, W) uint8); return [(grid, (N, C, H, W) uint8)] now complete."""
        complete = []
        for index, image in zip(indices, pixels):
            grid = index // IMAGES_PER_GRID
            if grid in self.parts:
                self.parts[grid][index] = image
                if len(self.parts[grid]) == self.sizes[grid]:
                    images = self.parts.pop(grid)
                    complete.append((grid, torch.stack([images[i] for i in sorted(images)])))
        return complete


def _write_pngs(folder, indices, pixels):
    for index, image in zip(indices, pixels):
        save_png(image, os.path.join(folder, f"{index}.png"), WRITE_FIX)


def _raise_failed_write(written, wait_for):
    """Raise the first failed write (a WriteFailed) of ``written``, the write jobs of each batch drawn: wait
    for those of the first ``wait_for`` batches, look at the others' only when they are done."""
    for number, jobs in enumerate(written):
        for job in jobs:
            if number < wait_for or job.done():
                job.result()


def draw_images(diffusion, sampler, noise, n, image_shape, indices=None, guidance=None):
    """One batch from the sampler of ``sampler`` with the noise source ``noise``; (B, C, H, W) in [0, 1]. A
    conditional model makes image ``indices[k]`` (default k) of class indices[k] % classes (the sister codebase's
    layout). ``guidance``: classifier guidance (``model.guidance.load_head_guidance``)."""
    if getattr(diffusion, "conditional", False):
        indices = range(n) if indices is None else indices
        sampler = dict(sampler, labels=image_classes(indices, diffusion.nn_model.num_classes))
    guided = {} if guidance is None else {"guidance": guidance}
    return diffusion.sample(n, image_shape, noise=noise, **sampler, **guided)


def generate(diffusion, batches, out_dir, sampler, seed, image_shape, device, precision, n_samples,
             total=None, progress=True, pad_to=None, pixel_rule="truncate", guidance=None):
    """Sample ``batches`` (lists of image indices) into ``out_dir/pngs`` and the grids they complete.

    Args:
        diffusion: a DDPM or EDM in eval mode on ``device``.
        batches: this process's batches of image indices.
        sampler: from ``sampler_settings``.
        seed: the run's seed; image i uses ``image_seed(seed, i)``.
        image_shape: (C, H, W).
        precision: "fp32", "fp16" or "bf16" (autocast).
        n_samples: images in the whole run (decides the grids).
        total: images made by all processes, for the progress bar (default: this process's).
        progress: show images/s and the time left (a bar on a terminal, plain lines in a log file).
        pad_to: sample a shorter batch (the run's last) at this size and drop the extra images, so a
            compiled network sees one shape only: no second compilation or CUDA graph at the end.
            The extra images have seeds of their own, so the kept ones are unchanged.
        pixel_rule: how samples become pixels, a ``utils.images.to_uint8`` rule (the diffusion's ``pixel_rule()``).
        guidance: classifier guidance for DDPM's samplers (``model.guidance.load_head_guidance``), or None.

    Returns:
        the number of images this process wrote.
    """
    pngs = os.path.join(out_dir, "pngs")
    grids = GridCollector(batches, n_samples)
    mine = sum(len(batch) for batch in batches)
    total = mine if total is None else total
    share = total / max(mine, 1)  # this process's batches stand for the others' in the bar
    written = []  # the write jobs of each batch drawn, until they are done
    with ThreadPoolExecutor(max_workers=PNG_WRITERS) as writer, \
            progress_bar(total=total, unit="img", disable=not progress, desc="sampling", smoothing=0.1) as bar:
        try:
            for batch in batches:
                # The previous batch's files are written while this one is drawn; those of every batch before
                # it are done: a failed write (a full disk) stops the run here, not thousands of images later.
                _raise_failed_write(written, len(written) - 1)
                del written[:-1]
                padded = list(batch) + list(range(n_samples, n_samples + max(0, (pad_to or 0) - len(batch))))
                noise = PerImageNoise([image_seed(seed, i) for i in padded], device)
                with autocast(device, precision):
                    images = draw_images(diffusion, sampler, noise, len(padded), image_shape, padded, guidance)
                pixels = to_uint8(images[:len(batch)], pixel_rule).cpu()  # (B, C, H, W) uint8: one copy to the host
                jobs = [writer.submit(_write_pngs, pngs, batch[part::PNG_WRITERS], pixels[part::PNG_WRITERS])
                        for part in range(min(PNG_WRITERS, len(batch)))]
                jobs += [writer.submit(save_grid, grid_images, os.path.join(out_dir, f"grid_{grid}.png"), GRID_NROW,
                                       WRITE_FIX) for grid, grid_images in grids.add(batch, pixels)]
                written.append(jobs)
                bar.update(min(round(len(batch) * share), total - bar.n))
            _raise_failed_write(written, len(written))
        except WriteFailed:
            writer.shutdown(cancel_futures=True)  # nothing queued after the failure is written
            raise
    return mine


def _read_png(path):
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)  # (3, H, W) uint8


def write_missing_grids(out_dir, n_samples, rank=0, world_size=1):
    """Assemble from the PNG files every grid_{b}.png that is missing (grids b = rank mod world_size)."""
    for grid in range(rank, grid_count(n_samples), world_size):
        path = os.path.join(out_dir, f"grid_{grid}.png")
        if not os.path.isfile(path):
            images = [_read_png(os.path.join(out_dir, "pngs", f"{i}.png")) for i in grid_range(grid, n_samples)]
            save_grid(torch.stack(images), path, GRID_NROW)


def prepare_network(diffusion, compile_mode, channels_last):
    """Put the network in the layout and (``compile_mode``: a utils.cli.COMPILE_MODES mode, or None) compiled form
    that sampling runs it in."""
    if channels_last:
        diffusion.nn_model.to(memory_format=torch.channels_last)
    if compile_mode:
        compile_module(diffusion.nn_model, compile_mode)
    return diffusion


@cli_entry
def main(args):
    """Sample into the output folder; returns {"out_dir", "generated", "seconds", "fid"}."""
    device = init_distributed(args.device)
    try:
        with torchrun_cpu_threads(device):  # plain python runs the kernels torchrun's workers run
            result = run(args, device)
    finally:
        cleanup()
    if args.fid and is_main():
        result["fid"] = report_fid(args, result, device)
    return result


def run(args, device):
    cfg = load_config(args.config, args.set)
    sampler = sampler_settings(cfg, args.mode, args.steps, args.eta)
    n_samples = sample_count(args, cfg)
    sampler.update(classifier_free_guidance(args, cfg, n_samples))
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: pass a positive number of images per forward pass")
    if args.seed < 0:
        raise UserError(f"--seed {args.seed}: pass a non-negative integer")
    if args.fid and not (args.fid.startswith("dataset:") or os.path.exists(args.fid)):
        raise UserError(f"--fid {args.fid}: no such folder or .npz; pass the reference PNG folder (see "
                        f"extract_cifar10_pngs.ipynb), its statistics .npz, or dataset:cifar10")
    guided = check_guidance_flags(args, cfg)
    precision = resolve_precision(args, device)
    configure_backends(args, device)
    checkpoint = checkpoint_from_args(cfg, args)
    diffusion = load_diffusion(cfg, checkpoint, weights="ema", device=device)
    sampler_name = diffusion.sampler_name(sampler)  # e.g. "DDAE DDIM" or a diffusers folder's own scheduler
    pixel_rule = getattr(diffusion, "pixel_rule", lambda: "truncate")()  # "round" for a diffusers folder
    guidance, guidance_record = None, None
    if guided:
        refusal = diffusion.guidance_refusal(sampler["mode"])
        if refusal:
            raise UserError(f"--classifier_head: {refusal}")
        scale = 1.0 if args.classifier_scale is None else args.classifier_scale
        guidance, guidance_record = load_head_guidance(args.classifier_head, checkpoint, diffusion, args.class_index,
                                                       scale)
    out_dir = args.out_dir or os.path.join(cfg.save_dir, folder_name(epoch_label(checkpoint), sampler,
                                                                      guidance_record))
    image_shape = tuple(cfg.image_shape)

    record = provenance(checkpoint, cfg, device, args.seed)

    def prepare():
        # One hash names the model: the loaded bytes' (``sha256sum FILE``, or a folder's ``check`` command).
        settings = dict(provenance=record,
            checkpoint_sha256=record["weights"]["sha256"], model_type=cfg.model_type, diffusion=sampling_keys(cfg),
            image_shape=list(image_shape), sampler=sampler_name, **sampler, seed=args.seed, precision=precision,
            noise_device=device.type, checkpoint=os.path.abspath(checkpoint),
            config=os.path.abspath(args.config), images_per_grid=IMAGES_PER_GRID, grid_nrow=GRID_NROW,
            pixels=pixel_rule, classifier_guidance=guidance_record)
        return prepare_folder(out_dir, settings, n_samples, lambda: weights_digest(diffusion), sampling_defaults(cfg))

    missing = decide_on_main(prepare)  # rank 0 prepares the folder; every rank learns what is missing
    rank, world_size = get_rank(), get_world_size()
    batches = split_batches(missing, args.batch_size, rank, world_size)
    described = describe_sampler(sampler, getattr(cfg.diffusion, "n_T", None))
    if guidance is not None:
        described += f", {guidance.describe()}"
    print0(f"sampling {len(missing)} of {n_samples} images ({described}, {precision}; {sampler_name}) on "
           f"{world_size} x {device.type} into {out_dir}")

    prepare_network(diffusion, args.compile, args.channels_last)
    start = time.perf_counter()
    generated = generate(diffusion, batches, out_dir, sampler, args.seed, image_shape, device, precision,
                         n_samples, total=len(missing), progress=is_main(),
                         pad_to=min(args.batch_size, len(missing)) if args.compile else None, pixel_rule=pixel_rule,
                         guidance=guidance)
    seconds = time.perf_counter() - start
    barrier()
    write_missing_grids(out_dir, n_samples, rank, world_size)
    barrier()
    print0(f"{len(missing)} images in {seconds:.1f} s ({len(missing) / max(seconds, 1e-9):.1f} images/s); "
           f"{n_samples} in {os.path.join(out_dir, 'pngs')}")
    return {"out_dir": out_dir, "n_samples": n_samples, "generated": generated, "seconds": seconds,
            "provenance": record}


def report_fid(args, result, device):
    """FID of the run's images against --fid, printed and written to fid.json in the folder."""
    from fid import compute_fid

    folder = Path(result["out_dir"], "pngs")
    files = sorted(folder / f"{i}.png" for i in range(result["n_samples"]))  # pytorch-fid's order
    value = compute_fid(args.fid, files, device=device, batch_size=args.fid_batch_size, num_workers=args.fid_workers,
                        ref_cache=args.ref_cache, data_root=args.data_root)
    print(f"FID: {value}  ({result['n_samples']} images vs {args.fid})", flush=True)
    with atomic_path(os.path.join(result["out_dir"], "fid.json"), fix="pass --out_dir with a writable folder") \
            as temporary, open(temporary, "w") as file:
        json.dump({"fid": value, "reference": args.fid, "n_images": result["n_samples"],
                   "provenance": result["provenance"]}, file)
    return value


if __name__ == "__main__":
    # SIGTERM / SIGUSR1: stop at once with exit code 75, saying what the same command redoes
    with StopSignals(at_once="the images written so far are kept, and the same command writes only the missing"
                             " ones"):
        main(build_parser().parse_args())
