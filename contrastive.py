"""Alignment and uniformity of DDAE features across training checkpoints.

    python contrastive.py --config config/DDPM_ddpm.yaml --use_amp --epoch_interval 400

Reads save_dir/ckpts/model_{e}.pth for e = interval, 2 * interval, ... below n_epoch, and n_epoch - 1.
For every block, two L2-normalised features of each training image are drawn with independent
noise at linear.timestep: alignment is the mean squared distance between the two draws, uniformity
the log of the mean Gaussian potential exp(-2 d^2) over the pairs of a batch (Wang & Isola, 2020).
Writes save_dir/contrastive.json (with the provenance record: each checkpoint's SHA-256, in epoch order)
and one plot per block in save_dir/contrastive/.
"""
import argparse
import os

import torch

from evaluation.cells import probe_cells
from evaluation.features import extract_features
from evaluation.frozen import prepare_frozen, to_device
from model.models import block_names, load_config, load_diffusion
from utils.checkpoint import list_checkpoints
from utils.cli import add_amp_args, resolve_precision
from utils.config import add_config_args
from utils.data import add_data_args, build_dataset, build_loader, resolve_num_workers
from utils.data import test_transform as eval_transform
from utils.distributed import add_launcher_args, all_reduce_sum, cleanup, get_rank, init_distributed, is_main, print0
from utils.errors import UserError, cli_entry
from utils.logging import plot_lines, save_json
from utils.progress import batches
from utils.provenance import provenance


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    add_amp_args(parser)
    parser.add_argument("--epoch_interval", type=int, default=400,
                        help="evaluate the checkpoints of every this many epochs, and the last one")
    add_data_args(parser)
    add_launcher_args(parser)
    return parser


def alignment(x, y):
    """Mean squared distance between matching rows of two (N, C) feature batches."""
    return (x - y).pow(2).sum(dim=1).mean()


def uniformity(x, temperature=2.0):
    """log of the mean of exp(-temperature ||xi - xj||^2) over the pairs i < j of an (N, C) batch."""
    return torch.pdist(x, p=2).pow(2).mul(-temperature).exp().mean().log()


def checkpoint_epochs(n_epoch, interval):
    """The epochs to evaluate: interval, 2 * interval, ... below n_epoch, then n_epoch - 1."""
    epochs = list(range(interval, n_epoch, interval))
    if n_epoch - 1 not in epochs:
        epochs.append(n_epoch - 1)
    return epochs


def find_checkpoints(save_dir, epochs):
    """``{epoch: path}`` for ``epochs``, or a UserError listing the missing epochs and the saved ones."""
    saved = list_checkpoints(save_dir)
    missing = [epoch for epoch in epochs if epoch not in saved]
    if missing:
        folder = os.path.join(save_dir, "ckpts")
        have = ", ".join(str(epoch) for epoch in saved) or "none"
        raise UserError(f"no checkpoint for epoch(s) {', '.join(map(str, missing))} in {folder} "
                        f"(saved epochs: {have}); train further or pick --epoch_interval to match")
    return {epoch: saved[epoch] for epoch in epochs}


@torch.no_grad()
def measure(diffusion, loader, timestep, blocks, device, precision="fp32"):
    """Alignment and uniformity of every block over this process's shard, summed over processes.

    Each batch is doubled and goes through the network once, so each image gets its two draws of
    noise in the same forward pass. Batch values are weighted by batch size; a batch of one image
    has no pairs and does not count towards uniformity.

    Returns:
        ``{block: {"alignment": float, "uniformity": float}}``.
    """
    sums = torch.zeros(len(blocks), 2, device=device)  # per block: weighted alignment, uniformity
    weights = torch.zeros(2, device=device)
    for images, _ in batches(loader, "alignment and uniformity"):
        images, _ = to_device(images, torch.zeros(0), device)
        batch = images.shape[0]
        features = extract_features(diffusion, torch.cat([images, images]), timestep, blocks, norm=True,
                                    precision=precision)
        has_pairs = batch > 1
        for index, block in enumerate(blocks):
            first, second = features[block][:batch], features[block][batch:]  # (B, C) each
            sums[index, 0] += alignment(first, second) * batch
            if has_pairs:
                sums[index, 1] += (uniformity(first) + uniformity(second)) / 2 * batch
        weights[0] += batch
        weights[1] += batch if has_pairs else 0
    totals = all_reduce_sum(torch.cat([sums.flatten(), weights])).cpu()
    values = totals[:-2].view(len(blocks), 2) / totals[-2:]
    return {block: {"alignment": values[i, 0].item(), "uniformity": values[i, 1].item()}
            for i, block in enumerate(blocks)}


def run_contrastive(cfg, checkpoints, dataset, device, precision="fp32", out_dir=None, num_workers=0):
    """Measure every checkpoint, then print, save and plot the histories (on rank 0).

    Args:
        cfg: the config (``linear.timestep``, ``linear.batch_size``, ``seed``, ``save_dir``).
        checkpoints: ``{epoch: path}``, e.g. from ``find_checkpoints``.
        dataset: the images, without augmentation.
        out_dir: where contrastive.json and contrastive/ go; default cfg.save_dir.
        num_workers: data-loader processes.

    Returns:
        ``{"epochs": [...], "timestep": t, "blocks": {block: {"alignment": [...], "uniformity": [...]}}}``.
    """
    out_dir = cfg.save_dir if out_dir is None else out_dir
    (timestep,), _ = probe_cells(cfg)
    blocks = block_names(cfg, grid=True)
    loader = build_loader(dataset, cfg.linear.batch_size, train=False, num_workers=num_workers, device=device)
    epochs = sorted(checkpoints)
    history = {block: {"alignment": [], "uniformity": []} for block in blocks}
    for epoch in epochs:
        diffusion = prepare_frozen(load_diffusion(cfg, checkpoints[epoch]), device)
        torch.manual_seed(cfg.seed + get_rank())  # every checkpoint sees the same noise
        values = measure(diffusion, loader, timestep, blocks, device, precision)
        for block in blocks:
            for key in ("alignment", "uniformity"):
                history[block][key].append(values[block][key])
        print0(f"epoch {epoch}: " + "  ".join(f"{block} {values[block]['alignment']:.4f}/"
                                               f"{values[block]['uniformity']:.4f}" for block in blocks))
    result = {"epochs": epochs, "timestep": timestep, "blocks": history,
              "provenance": provenance([checkpoints[epoch] for epoch in epochs], cfg, device, cfg.seed)}
    if is_main():
        print0(format_history(result))
        save_json(result, os.path.join(out_dir, "contrastive.json"))
        for block in blocks:
            series = {key: (epochs, history[block][key]) for key in ("alignment", "uniformity")}
            plot_lines(series, os.path.join(out_dir, "contrastive", f"{block}.png"), xlabel="epoch",
                       ylabel="value", title=f"{block} at t={timestep}: alignment (lower is better), uniformity")
    return result


def format_history(result):
    """The histories as text: per block, alignment and uniformity at each checkpoint epoch."""
    lines = [f"alignment / uniformity at t={result['timestep']}, epochs {result['epochs']}"]
    for block, values in result["blocks"].items():
        lines.append(f"{block:>8} alignment  " + " ".join(f"{v:.4f}" for v in values["alignment"]))
        lines.append(f"{'':>8} uniformity " + " ".join(f"{v:.4f}" for v in values["uniformity"]))
    return "\n".join(lines)


@cli_entry
def main(args):
    cfg = load_config(args.config, args.set)
    if args.epoch_interval < 1:
        raise UserError(f"--epoch_interval {args.epoch_interval}: must be at least 1")
    checkpoints = find_checkpoints(cfg.save_dir, checkpoint_epochs(cfg.n_epoch, args.epoch_interval))
    device = init_distributed(args.device)
    try:
        precision = resolve_precision(args, device)
        image_size = cfg.image_shape[-1]
        dataset = build_dataset(cfg.dataset, args.data_root, train=True, transform=eval_transform(),
                                image_size=image_size)
        run_contrastive(cfg, checkpoints, dataset, device, precision, num_workers=resolve_num_workers(args, cfg))
    finally:
        cleanup()


if __name__ == "__main__":
    main(build_parser().parse_args())
