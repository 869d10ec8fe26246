"""Encode a dataset with the SD VAE into the latent cache a DiT is evaluated on: 10 augmented training copies + the test split.

    python encode_latents.py --config config/DiT_XL_2_cifar.yaml
    torchrun --standalone --nproc_per_node=4 encode_latents.py --config config/DiT_XL_2_tinyimagenet.yaml --precision bf16

Each image is resized to latents.image_size (bilinear) and encoded as
``latents.scale * vae.encode(2x - 1).latent_dist.sample()``; training copies first get a random
horizontal flip and RandomCrop(source_size, padding latents.crop_padding). Image i of copy c draws
its flip, crop and posterior noise from its own generator (``utils.latents.latent_seed``), so the
cache is the same on 1 or N processes. The work is split by index as in sample.py: each process
encodes whole batches of every copy, each image exactly once. A killed run resumes at the first
unfinished copy. See utils/latents.py for the files.
"""
import argparse
import os
import time

import numpy as np
from torch.utils.data import DataLoader

from model.vae import check_vae_folder, encode_images, load_vae
from model.models import load_config
from utils.checkpoint import weights_digest
from utils.cli import add_amp_args, resolve_precision
from utils.config import add_config_args
from utils.data import (add_data_args, add_max_images_arg, build_dataset, limit_images, resolve_num_workers,
                        split_batches, test_transform)
from utils.distributed import (add_launcher_args, barrier, cleanup, decide_on_main, get_rank, get_world_size,
                               init_distributed, is_main, print0)
from utils.errors import UserError, cli_entry
from utils.latents import (COPY_STRIDE, TEST_COPY, VAE_DOWNSAMPLING, create_partial, finish_partial, latent_seed,
                           partial_path, prepare_cache, split_name)
from utils.preemption import StopSignals
from utils.progress import iterate


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    add_amp_args(parser)
    parser.add_argument("--batch_size", type=int, default=None,
                        help="images per VAE call and process (default: latents.batch_size)")
    add_data_args(parser)
    add_max_images_arg(parser)
    add_launcher_args(parser)
    return parser


def check_args(args):
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: must be at least 1")


def encode_copy(vae, dataset, path, copy, cfg, batch_size, precision, num_workers=0, rank=0, world_size=1):
    """Encode this process's batches of one copy into the memory-mapped array file at ``path``.

    Args:
        vae: the VAE on this process's device.
        dataset: the split, yielding (image in [0, 1], label) without augmentation.
        path: the (N, C, H, W) .npy array every process writes its own rows of.
        copy: the training copy (augmented), or ``TEST_COPY``.
        cfg: the DiT config (``seed`` and ``latents`` are read).

    Returns:
        the number of images this process encoded.
    """
    latents = cfg.latents
    batches = split_batches(list(range(len(dataset))), batch_size, rank, world_size)
    if not batches:
        return 0
    array = np.load(path, mmap_mode="r+")
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers)
    padding = None if copy == TEST_COPY else latents.crop_padding
    # A bar on a terminal, a line every 10% in a log file (utils/progress.py), as the other long passes.
    shown = iterate(loader, total=len(batches), desc=f"encoding {split_name(copy)}", unit="batch",
                    disable=not is_main())
    for (images, _), indices in zip(shown, batches):  # the bar first: its end prints the last line
        seeds = [latent_seed(cfg.seed, copy, index) for index in indices]
        encoded = encode_images(vae, images, seeds, latents.scale, latents.image_size, padding, precision)
        array[indices[0]:indices[-1] + 1] = encoded.numpy().astype(array.dtype)  # batches are index runs
    array.flush()
    del array
    return sum(len(batch) for batch in batches)


def cache_settings(cfg, vae, train_set, test_set, precision):
    """What cache.json records: the identity of the latents and, for the probes, the class names."""
    latents = cfg.latents
    downsampling = 2 ** (len(vae.config.block_out_channels) - 1)
    if downsampling != VAE_DOWNSAMPLING:
        raise UserError(f"VAE folder {latents.vae}: its latents are 1/{downsampling} of the image side, not "
                        f"1/{VAE_DOWNSAMPLING} as the DiT configs assume; use {latents.vae} of stabilityai/sd-vae-ft-mse")
    side = latents.image_size // VAE_DOWNSAMPLING
    return {"dataset": cfg.dataset, "n_train": len(train_set), "n_test": len(test_set), "seed": cfg.seed,
            "source_size": latents.source_size, "crop_padding": latents.crop_padding,
            "image_size": latents.image_size, "scale": latents.scale, "dtype": latents.dtype,
            "latent_shape": [vae.config.latent_channels, side, side], "vae_sha256": weights_digest(vae),
            "precision": precision, "vae": os.path.abspath(latents.vae), "copies": latents.copies,
            "classes": list(getattr(_whole(train_set), "classes", [])), "num_classes": cfg.classes}


def _whole(dataset):
    """The dataset behind a Subset of --max_images."""
    return getattr(dataset, "dataset", dataset)


def split_labels(dataset):
    targets = _whole(dataset).targets
    return [targets[i] for i in dataset.indices] if dataset is not _whole(dataset) else list(targets)


def run(cfg, args, device):
    """Encode every missing copy; returns {"cache_dir", "encoded": copies done now, "seconds"}."""
    latents = cfg.latents
    precision = resolve_precision(args, device)
    batch_size = args.batch_size or latents.batch_size
    train_set, test_set = (limit_images(build_dataset(cfg.dataset, args.data_root, train=train,
                                                      transform=test_transform(), image_size=latents.source_size),
                                        args.max_images) for train in (True, False))
    if max(len(train_set), len(test_set)) > COPY_STRIDE:
        raise UserError(f"dataset {cfg.dataset}: more than {COPY_STRIDE} images per split; the latent seeds "
                        f"of utils/latents.py cover fewer")
    vae = load_vae(latents.vae, device)
    settings = cache_settings(cfg, vae, train_set, test_set, precision)
    # Rank 0 prepares the folder; every rank then knows what is missing.
    missing = decide_on_main(lambda: prepare_cache(latents.cache_dir, settings, latents.copies,
                                                   split_labels(train_set), split_labels(test_set)))
    print0(f"encoding {len(missing)} of {latents.copies + 1} latent files ({len(train_set)} training and "
           f"{len(test_set)} test images, {precision}, {get_world_size()} x {device.type}) into {latents.cache_dir}")
    num_workers = resolve_num_workers(args, cfg)
    started = time.perf_counter()
    for copy in missing:
        dataset = test_set if copy == TEST_COPY else train_set
        copy_started = time.perf_counter()
        if is_main():
            create_partial(latents.cache_dir, copy, len(dataset), settings["latent_shape"], latents.dtype)
        barrier()
        encode_copy(vae, dataset, partial_path(latents.cache_dir, copy), copy, cfg, batch_size, precision,
                    num_workers, get_rank(), get_world_size())
        barrier()
        if is_main():
            finish_partial(latents.cache_dir, copy)
        barrier()
        seconds = time.perf_counter() - copy_started
        print0(f"{split_name(copy)}: {len(dataset)} images in {seconds:.1f} s "
               f"({len(dataset) / max(seconds, 1e-9):.1f} img/s)")
    return {"cache_dir": latents.cache_dir, "encoded": missing, "seconds": time.perf_counter() - started}


@cli_entry
def main(args):
    check_args(args)
    cfg = load_config(args.config, args.set, allow_dit=True)
    if not hasattr(cfg, "latents"):
        raise UserError(f"{args.config}: model_type {cfg.model_type}; encode_latents.py makes the latents of a "
                        f"DiT config (model_type: DiT), e.g. config/DiT_XL_2_cifar.yaml")
    check_vae_folder(cfg.latents.vae)  # before any process group or data
    device = init_distributed(args.device)
    try:
        return run(cfg, args, device)
    finally:
        cleanup()


if __name__ == "__main__":
    # SIGTERM / SIGUSR1: stop at once with exit code 75, saying what the same command redoes
    with StopSignals(at_once="the finished copies are kept; the same command encodes the unfinished copy again"):
        main(build_parser().parse_args())
