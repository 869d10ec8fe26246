"""Write DDAE features of a dataset split or of any image folder to .npy files, for downstream use.

    python export_features.py --config config/DDPM_ddpm.yaml --epoch 1999 --split train --blocks out_6 out_9
    python export_features.py --config config/EDM_ddpm.yaml --ckpt model.pth --images my_photos/ --norm
    python export_features.py --config config/TinyImageNet_DDPM_ddpm.yaml --split test --blocks all --precision bf16
    python export_features.py --config config/DiT_XL_2_cifar.yaml --split test --blocks layer-13 layer-20

The EMA network sees every image once, noised to --timestep (default linear.timestep; image i gets
its own noise seed, seed + i, so the export does not depend on the batch size) and stops after the
deepest requested block. Each block's activation is averaged over H and W (and L2-normalised with
--norm). The output folder (--out, default save_dir/features/{checkpoint}_sha{hash}_t{T}_{split or folder},
the hash being the start of the weights' SHA-256) holds:

    {block}.npy   (N, C) float32, one per block, row i = image i
    labels.npy    (N,) int64: the dataset's labels; for --images, the index of the image's
                  top-level subfolder in sorted order, or -1 for an image directly in the folder
    files.txt     for --images: the image paths relative to the folder, one per line, in row order
    meta.json     checkpoint, timestep, blocks, norm, seed, image count, class names and the
                  provenance record (weights' SHA-256, config, command, code version); written
                  last, so a folder with meta.json is complete

A DiT config exports its cached VAE latents (encode_latents.py): the test split, or copy 0 of the
training split. It runs in one process on one device.
"""
import argparse
import os
import re

import numpy as np
import torch
import torchvision
from torch.utils.data import Dataset
from torchvision.transforms import v2

from evaluation.cells import probe_cells
from evaluation.features import extract_dataset_features, label_tag, read_features_with
from evaluation.frozen import prepare_frozen
from evaluation.report import settings_tag
from model.models import block_names, load_config, load_diffusion, on_latents
from utils.atomic import atomic_path, check_writable
from utils.cli import (add_amp_args, add_checkpoint_args, add_feature_label_arg, add_speed_args, checkpoint_from_args,
                       configure_backends, resolve_precision)
from utils.config import add_config_args
from utils.data import (add_data_args, add_max_images_arg, build_dataset, build_loader, limit_images,
                        resolve_num_workers, test_transform)
from utils.distributed import DEVICE_CHOICES, resolve_device
from utils.errors import UserError, cli_entry
from utils.latents import latent_datasets
from utils.logging import save_json
from utils.preemption import StopSignals
from utils.provenance import provenance, short_digest

IMAGE_SUFFIXES = tuple(torchvision.datasets.folder.IMG_EXTENSIONS)
SAMPLE_GRID = re.compile(r"^grid_\d+\.png$")  # sample.py's grids of 400 samples beside pngs/


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    add_amp_args(parser)
    add_checkpoint_args(parser)
    add_feature_label_arg(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--split", choices=("train", "test"), default="test",
                        help="which split of the config's dataset to export (default test)")
    source.add_argument("--images", default=None, metavar="DIR",
                        help="export every image under DIR (any layout, searched recursively) instead")
    parser.add_argument("--timestep", type=int, default=None,
                        help="noise level: DDPM timestep or EDM index of 18 (default: linear.timestep)")
    parser.add_argument("--blocks", nargs="+", default=None, metavar="BLOCK",
                        help="blocks to export, e.g. out_6 out_9 (a UNet also has in_k and mid), or 'all' "
                             "(default: linear.blockname)")
    parser.add_argument("--norm", action="store_true", help="L2-normalise every feature vector")
    parser.add_argument("--out", default=None, help="output folder (default: under save_dir/features)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="images per forward pass (default: linear.batch_size)")
    parser.add_argument("--seed", type=int, default=None,
                        help="image i is noised with seed + i (default: the config's seed)")
    add_data_args(parser)
    add_max_images_arg(parser)
    add_speed_args(parser)
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                        help="auto: CUDA when available, else CPU")
    return parser


class ImageFiles(Dataset):
    """Every image file under ``root`` (recursively, sorted by path), as a float (C, H, W) tensor.

    Images are converted to RGB, resized so the shorter side is ``image_size`` and centre-cropped
    to a square. sample.py's grid_{b}.png files (grids of many samples, not samples) are skipped. The
    label of an image is the index of its top-level subfolder among the sorted subfolders that hold
    images (``classes``), or -1 for an image directly in ``root``.
    ``max_images`` > 0 keeps only the first that many files.
    """

    def __init__(self, root, image_size, max_images=0):
        if not os.path.isdir(root):
            raise UserError(f"--images {root}: folder not found; pass a folder of images")
        self.root = root
        self.files = sorted(os.path.relpath(os.path.join(folder, name), root)
                            for folder, _, names in os.walk(root) for name in names
                            if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")
                            and not SAMPLE_GRID.match(name))
        if not self.files:
            raise UserError(f"--images {root}: no image files ({', '.join(IMAGE_SUFFIXES)}) under it")
        if max_images:
            self.files = self.files[:max_images]
        top_level = [path.split(os.sep)[0] if os.sep in path else None for path in self.files]
        self.classes = sorted({name for name in top_level if name is not None})
        class_index = {name: i for i, name in enumerate(self.classes)}
        self.targets = [class_index[name] if name is not None else -1 for name in top_level]
        self.transform = v2.Compose([v2.ToImage(), v2.Resize(image_size), v2.CenterCrop(image_size),
                                     v2.ToDtype(torch.float32, scale=True), v2.ToPureTensor()])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path = os.path.join(self.root, self.files[index])
        try:
            image = torchvision.datasets.folder.default_loader(path)  # RGB, also for greyscale files
        except OSError as err:
            raise UserError(f"{path}: not a readable image ({err}); remove it or fix it") from None
        return self.transform(image), self.targets[index]


def export_features(diffusion, dataset, timestep, blocks, device, out_dir, precision="fp32", norm=False,
                    batch_size=128, num_workers=0, seed=0, meta=None):
    """Extract the features of every image of ``dataset`` and write them to ``out_dir``.

    Args:
        diffusion: the frozen model (see ``evaluation.frozen.prepare_frozen``).
        dataset: yields (image in [0, 1], label); with a ``files`` attribute, files.txt is written.
        timestep: the noise level (DDPM timestep or EDM index).
        blocks: block names; one (N, C) array each.
        device: where the network runs.
        out_dir: created when missing; existing files of the same names are replaced.
        precision, norm, batch_size, num_workers: of the feature pass.
        seed: image i is noised with seed ``seed + i``.
        meta: extra entries for meta.json.

    Returns:
        the meta.json record.
    """
    loader = build_loader(dataset, batch_size, train=False, num_workers=num_workers, rank=0, world_size=1,
                          device=device)
    features, labels = extract_dataset_features(diffusion, loader, [timestep], blocks, device, norm=norm,
                                                precision=precision, seed=seed, desc="features")
    for block in blocks:
        save_array(features[(timestep, block)].cpu().numpy(), os.path.join(out_dir, f"{block}.npy"))
    save_array(labels.cpu().numpy().astype(np.int64), os.path.join(out_dir, "labels.npy"))
    files = getattr(dataset, "files", None)
    if files is not None:
        write_text_atomically(os.path.join(out_dir, "files.txt"), "".join(f"{name}\n" for name in files))
    record = {**(meta or {}), "timestep": timestep, "blocks": list(blocks),
              "dims": {block: features[(timestep, block)].shape[1] for block in blocks}, "norm": norm,
              "seed": seed, "precision": precision, "n_images": int(labels.shape[0]),
              "classes": list(getattr(dataset, "classes", []))}
    save_json(record, os.path.join(out_dir, "meta.json"))
    return record


def save_array(array, path):
    """``np.save`` through a temporary file, so ``path`` is either absent, old or complete."""
    with atomic_path(path, fix="pass --out with a writable folder") as temporary:
        with open(temporary, "wb") as file:
            np.save(file, array)


def write_text_atomically(path, text):
    with atomic_path(path, fix="pass --out with a writable folder") as temporary:
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(text)


def resolve_blocks(cfg, requested):
    """The blocks of ``--blocks``: the config's linear.blockname by default, every block for 'all'."""
    available = block_names(cfg)
    if requested is None:
        return [cfg.linear.blockname]
    if requested == ["all"]:
        return list(available)
    for name in requested:
        if name not in available:
            raise UserError(f"--blocks {name}: this network has blocks {', '.join(available)} "
                            f"(or pass 'all')")
    return list(dict.fromkeys(requested))


def default_out_dir(cfg, checkpoint, timestep, args, precision="fp32"):
    """save_dir/features/{checkpoint}_{hash}_t{T}_{split or folder}[_norm][settings]: another model of the same
    file name gets its own folder, and so do --max_images, the precision and --seed when not their defaults
    (``evaluation.report.settings_tag``: ``_max500_bf16_seed3``)."""
    stem = f"{os.path.splitext(os.path.basename(checkpoint))[0]}_{short_digest(checkpoint)}"
    source = os.path.basename(os.path.normpath(args.images)) if args.images else args.split
    settings = settings_tag(args.max_images, precision, args.seed, cfg.seed)
    return os.path.join(cfg.save_dir, "features",
                        f"{stem}_t{timestep}_{source}{'_norm' if args.norm else ''}{settings}"
                        f"{label_tag(args.feature_label)}")


def check_args(args):
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: must be at least 1")
    if args.max_images < 0:
        raise UserError(f"--max_images {args.max_images}: must be 0 (all images) or a positive count")


@cli_entry
def main(args):
    check_args(args)
    # --timestep is linear.timestep for this run, so the config's own checks cover it.
    cfg = load_config(args.config, args.set, flags={"linear.timestep": ("--timestep", args.timestep)},
                      allow_dit=True)
    (timestep,), _ = probe_cells(cfg)
    blocks = resolve_blocks(cfg, args.blocks)
    if args.images and on_latents(cfg):
        raise UserError(f"--images with a DiT config: the DiT reads cached VAE latents; export a cached split "
                        f"(--split train or test) of {cfg.latents.cache_dir}")
    image_size = cfg.image_shape[-1]
    if args.images:
        dataset = ImageFiles(args.images, image_size, args.max_images)
    elif on_latents(cfg):
        train_set, test_set = latent_datasets(cfg, train_copy=0)
        dataset = limit_images(train_set if args.split == "train" else test_set, args.max_images)
    else:
        dataset = limit_images(build_dataset(cfg.dataset, args.data_root, train=args.split == "train",
                                             transform=test_transform(), image_size=image_size), args.max_images)
    checkpoint = checkpoint_from_args(cfg, args)
    device = resolve_device(args.device)
    precision = resolve_precision(args, device)
    # loaded before the name: its hash is the loaded bytes'
    diffusion = read_features_with(load_diffusion(cfg, checkpoint, weights="ema"), args.feature_label)
    out_dir = args.out or default_out_dir(cfg, checkpoint, timestep, args, precision)
    check_writable(out_dir, "--out" if args.out else "save_dir",
                   "pass --out with a writable folder" + ("" if args.out else ", or --set save_dir=DIR"))

    configure_backends(args, device)
    diffusion = prepare_frozen(diffusion, device, compile=args.compile)
    print(f"features of {len(dataset)} images at t={timestep}, blocks {', '.join(blocks)}, from {checkpoint}")
    record = export_features(
        diffusion, dataset, timestep, blocks, device, out_dir, precision=precision, norm=args.norm,
        batch_size=args.batch_size or cfg.linear.batch_size,
        num_workers=resolve_num_workers(args, cfg),
        seed=cfg.seed if args.seed is None else args.seed,
        meta={"checkpoint": checkpoint, "model_type": cfg.model_type,
              "source": os.path.abspath(args.images) if args.images else f"{cfg.dataset}/{args.split}",
              "provenance": provenance(checkpoint, cfg, device, cfg.seed if args.seed is None else args.seed)})
    print(f"wrote {record['n_images']} x ({', '.join(f'{b}: {d}' for b, d in record['dims'].items())}) "
          f"to {out_dir}")


if __name__ == "__main__":
    # SIGTERM / SIGUSR1: stop at once with exit code 75, saying what the same command redoes
    with StopSignals(at_once="nothing is saved mid-way; the same command extracts the features again"):
        main(build_parser().parse_args())
