"""Image files: PNGs written atomically, sample grids, and a dataset unpacked to one PNG per image.

    save_png(image, "out/0.png")                    # (C, H, W) float in [0, 1] or uint8
    save_grid(images, "out/grid_0.png", nrow=20)    # (B, C, H, W), 2-pixel black padding
    export_dataset_pngs(dataset, "data/cifar10-pngs")

Unpack the CIFAR-10 training images for FID (what extract_cifar10_pngs.ipynb runs)::

    python -m utils.images export-cifar10 --data_root ./data --out data/cifar10-pngs

Pixels are quantised as torchvision's ``save_image`` does (x * 255 + 0.5, clamped, truncated),
so a PNG written here has the same bytes as one written by the original code; ``to_uint8(x, "round")``
rounds x * 255 half to even as diffusers' pipelines do (``numpy_to_pil``), for a diffusers folder's samples.
"""
import argparse
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from utils.atomic import atomic_path
from utils.errors import UserError, cli_entry
from utils.progress import iterate

GRID_PADDING = 2  # torchvision's save_image default, used by the original's grids


def to_uint8(images, rule="truncate"):
    """Quantise float images of any shape in [0, 1] (clamped) to uint8 on their device; uint8 passes through.

    Args:
        rule: "truncate", torchvision's ``save_image`` (x * 255 + 0.5, truncated), the original's PNGs; or
            "round", diffusers' ``numpy_to_pil`` (x * 255 rounded half to even), a pipeline's PNGs.
    """
    if images.dtype == torch.uint8:
        return images
    if rule == "round":
        return images.clamp(0, 1).mul_(255).round_().to(torch.uint8)
    return images.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


def _as_pixel_array(image):
    """(H, W, C) uint8 numpy array of a (C, H, W) tensor, a PIL image or an (H, W, C) array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8 (H, W, C), got {image.dtype}")
        return image
    if image.dim() != 3:
        raise ValueError(f"expected one (C, H, W) image, got shape {tuple(image.shape)}")
    if image.shape[0] == 1:  # greyscale is stored as RGB, as save_image does
        image = image.expand(3, -1, -1)
    return to_uint8(image.detach()).cpu().permute(1, 2, 0).numpy()  # (H, W, C)


def save_png(image, path, fix="choose a writable folder"):
    """Write one image as a PNG so that ``path`` is either absent or complete, never truncated.

    Args:
        image: (C, H, W) float tensor in [0, 1], (C, H, W) uint8 tensor, (H, W, C) uint8 array or a
            PIL image; 1-channel tensors are written as RGB, as torchvision's ``save_image`` does.
        path: destination. The bytes go to a hidden temporary file in the same folder (ending in
            .tmp, so image globs skip it) that then replaces ``path`` (utils.atomic).
        fix: what the user can do when the write fails (a ``utils.errors.WriteFailed``, one line).
    """
    with atomic_path(path, what="image ", fix=fix) as temporary:
        Image.fromarray(_as_pixel_array(image)).save(temporary, format="PNG")


def save_grid(images, path, nrow, fix="choose a writable folder"):
    """Write a batch as one PNG grid, ``nrow`` images per row, as torchvision's ``save_image`` lays it out.

    Args:
        images: (B, C, H, W) float tensor in [0, 1] or uint8 tensor.
        path: destination PNG (written atomically, see ``save_png``).
        nrow: images per row.
        fix: as for ``save_png``.
    """
    save_png(make_grid(to_uint8(images).cpu(), nrow), path, fix)


def make_grid(images, nrow, padding=GRID_PADDING):
    """Tile (B, C, H, W) images into one (C, H', W') image with black padding, as torchvision's
    ``make_grid`` does (1-channel images become 3-channel, a single image is returned unpadded);
    importing torchvision would cost seconds."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[0] == 1:
        return images[0]
    count, channels, height, width = images.shape
    columns = min(nrow, count)
    rows = -(-count // columns)
    cell_height, cell_width = height + padding, width + padding
    grid = images.new_zeros((channels, rows * cell_height + padding, columns * cell_width + padding))
    for index, image in enumerate(images):
        top = index // columns * cell_height + padding
        left = index % columns * cell_width + padding
        grid[:, top:top + height, left:left + width] = image
    return grid


def remove_temporary_files(folder):
    """Delete the temporary files that a killed ``save_png`` may have left in ``folder``."""
    for name in os.listdir(folder):
        if name.startswith(".") and name.endswith(".tmp"):
            os.remove(os.path.join(folder, name))


def export_dataset_pngs(dataset, out_dir, progress=True, workers=4):
    """Write every image of ``dataset`` to ``out_dir/{index}.png``; files already there are kept.

    Args:
        dataset: a map-style dataset of images or of ``(image, label)`` pairs; an image is a PIL
            image, a (C, H, W) uint8 tensor or a float tensor in [0, 1].
        out_dir: created when missing.
        progress: show progress (utils.progress: a bar on a terminal, plain lines in a log file).
        workers: threads encoding PNGs (zlib releases the GIL, so threads run in parallel).

    Returns:
        the number of PNGs written (0 when the folder was already complete).
    """
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {out_dir} ({err.strerror}); pass --out with a writable folder") from None
    remove_temporary_files(out_dir)
    present = set(os.listdir(out_dir))
    missing = [i for i in range(len(dataset)) if f"{i}.png" not in present]

    def write(index):
        item = dataset[index]
        image = item[0] if isinstance(item, (tuple, list)) else item
        save_png(image, os.path.join(out_dir, f"{index}.png"))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in iterate(pool.map(write, missing), total=len(missing), unit="img", disable=not progress,
                         desc=f"PNGs to {out_dir}"):
            pass
    return len(missing)


def export_training_split(dataset="cifar10", data_root="./data", out_dir="data/cifar10-pngs", limit=None,
                          progress=True):
    """Unpack the training split of a utils.data dataset into ``out_dir/{index}.png``.

    Args:
        dataset: a ``utils.data`` dataset name; CIFAR-10 is downloaded into ``data_root`` when missing.
        limit: export only the first ``limit`` images.

    Returns:
        (number of PNGs written now, number of images in the split or its first ``limit``).
    """
    from torchvision.transforms import v2

    from utils.data import build_dataset

    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: pass a positive number of images")
    # uint8 pixels exactly as stored: no float round trip between the dataset and the PNG.
    images = build_dataset(dataset, data_root, train=True, transform=v2.Compose([v2.ToImage(), v2.ToPureTensor()]))
    if limit is not None:
        images = torch.utils.data.Subset(images, range(min(limit, len(images))))
    return export_dataset_pngs(images, out_dir, progress=progress), len(images)


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m utils.images", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export-cifar10", help="unpack a training split into one PNG per image")
    export.add_argument("--data_root", default="./data", help="folder with (or receiving) the dataset")
    export.add_argument("--out", default="data/cifar10-pngs", help="folder for the PNGs")
    export.add_argument("--dataset", default="cifar10",
                        help="utils.data dataset name; 'synthetic' makes a stand-in without downloads")
    export.add_argument("--limit", type=int, default=None, help="export only the first N images")
    return parser


@cli_entry
def main(args):
    written, total = export_training_split(args.dataset, args.data_root, args.out, args.limit)
    print(f"{written} PNGs written; {args.out} holds all {total} images")
    return written


if __name__ == "__main__":
    main(build_parser().parse_args())
