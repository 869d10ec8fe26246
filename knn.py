"""Weighted k-NN classification on frozen DDAE features, for every (timestep, block) cell at once.

    python knn.py --config config/DDPM_ddpm.yaml --use_amp --epoch 1999 --grid
    python knn.py --config config/DiT_XL_2_cifar.yaml --precision bf16   # on encode_latents.py's cache
    torchrun --nproc_per_node=4 knn.py --config config/CIFAR100_DDPM_ddpm.yaml --precision bf16 --grid

The protocol of DINO's k-NN evaluation: the features of every training and test image are
extracted once (no augmentation; image i is noised with its own seed, so the result does not
depend on batch size or process count), average-pooled and L2-normalised; a test image takes the
k = 20 training images of highest cosine similarity s, each votes for its class with weight
exp(s / 0.07), and the class with the largest sum wins. Nothing is trained, so the whole grid
takes one feature pass over both splits where the linear probe takes 15 epochs.

With --grid the cells are linear.py's grid (DDPM timesteps 1, 11, 21 or their noise levels on another
schedule, EDM indices 3, 4, 5 of 18, every block); without it, linear.timestep / linear.blockname. Each process extracts its shard
of both splits; the training features are all-gathered and each process classifies its own test
images. Results go to save_dir/knn/{tag}.json (and {tag}.png, the heatmap, with --grid); the tag names
the checkpoint, the start of its weights' SHA-256, the cells and k (model_1999_sha1a2b3c4d_grid_k20_T0.07). A DiT
config reads cached VAE latents: copy 0 of the (augmented) training latents and the test latents.
"""
import argparse
import os
import time

import torch
import torch.distributed as dist

from evaluation.accuracy import AccuracyCounter
from evaluation.cells import format_timesteps, probe_cells
from evaluation.features import extract_dataset_features, label_tag, read_features_with
from evaluation.frozen import prepare_frozen
from evaluation.report import (accuracy_table, best_line, format_accuracy_table, plot_accuracy_heatmap, probe_tag,
                               settings_tag)
from evaluation.throughput import synchronize
from model.models import load_config, load_diffusion, on_latents
from utils.atomic import check_writable
from utils.cli import (add_amp_args, add_checkpoint_args, add_feature_label_arg, add_speed_args, checkpoint_from_args,
                       configure_backends, resolve_precision)
from utils.config import add_config_args
from utils.data import (add_data_args, add_max_images_arg, build_loader, config_splits, limit_images,
                        resolve_num_workers, test_transform)
from utils.distributed import add_launcher_args, cleanup, get_world_size, init_distributed, is_main, print0
from utils.errors import UserError, cli_entry
from utils.latents import latent_datasets
from utils.logging import save_json
from utils.preemption import StopSignals
from utils.provenance import provenance

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07
QUERY_CHUNK = 1024  # test images compared with the whole training set at once: (chunk, N) similarities


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    add_amp_args(parser)
    add_checkpoint_args(parser)
    add_feature_label_arg(parser)
    parser.add_argument("--grid", action="store_true",
                        help="every block at three timesteps (DDPM 1/11/21 or their noise levels, EDM 3/4/5 of 18), as linear.py --grid")
    parser.add_argument("--blocks", nargs="+", default=None, metavar="BLOCK",
                        help="blocks to probe instead of the grid's (or linear.blockname), e.g. in_3,mid,out_6")
    parser.add_argument("--k", type=int, default=DEFAULT_K, help="neighbours that vote")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                        help="a neighbour of cosine similarity s votes with weight exp(s / temperature)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="images per feature pass and process (default: linear.batch_size)")
    parser.add_argument("--seed", type=int, default=None,
                        help="noise seed: image i of a split is noised with seed + i (default: the config's seed)")
    add_data_args(parser)
    add_max_images_arg(parser)
    add_speed_args(parser)
    add_launcher_args(parser)
    return parser


def check_args(args):
    if args.k < 1:
        raise UserError(f"--k {args.k}: must be at least 1")
    if args.temperature <= 0:
        raise UserError(f"--temperature {args.temperature}: must be positive")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: must be at least 1")


def knn_votes(bank, bank_labels, queries, num_classes, k=DEFAULT_K, temperature=DEFAULT_TEMPERATURE):
    """Summed neighbour weights per class: the weighted k-NN's class scores.

    Args:
        bank: (N, C) L2-normalised training features.
        bank_labels: (N,) their classes.
        queries: (Q, C) L2-normalised test features.
        num_classes: number of classes.
        k: neighbours per query (all N when N < k).
        temperature: a neighbour of cosine similarity s has weight exp(s / temperature).

    Returns:
        (Q, num_classes) float32 scores; the prediction is their argmax.
    """
    votes = torch.zeros(queries.shape[0], num_classes, device=queries.device)
    k = min(k, bank.shape[0])
    for start in range(0, queries.shape[0], QUERY_CHUNK):
        similarity = queries[start:start + QUERY_CHUNK] @ bank.T  # (chunk, N)
        top_similarity, top_index = similarity.topk(k, dim=1)  # (chunk, k)
        weights = (top_similarity / temperature).exp()
        votes[start:start + QUERY_CHUNK].scatter_add_(1, bank_labels[top_index], weights)
    return votes


def all_gather_rows(tensor):
    """Concatenate every process's (n_rank, ...) tensor in rank order; shards may differ in length.

    The shards of ``EvalShardSampler`` are contiguous and in rank order, so gathering per-shard
    features gives the features of the whole dataset in dataset order.
    """
    if get_world_size() == 1:
        return tensor
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(get_world_size())]
    dist.all_gather(sizes, torch.tensor([tensor.shape[0]], device=tensor.device))
    sizes = [int(size) for size in sizes]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([rows[:size] for rows, size in zip(gathered, sizes)])


def gather_bank(features, labels, cells):
    """All processes' training features and labels, one collective for every cell together."""
    widths = [features[cell].shape[1] for cell in cells]
    stacked = torch.cat([labels[:, None].to(features[cells[0]].dtype)] + [features[cell] for cell in cells], dim=1)
    stacked = all_gather_rows(stacked)  # (N, 1 + sum of widths)
    columns = stacked[:, 1:].split(widths, dim=1)
    return dict(zip(cells, columns)), stacked[:, 0].round().long()


def knn_accuracy(bank, bank_labels, test_features, test_labels, cells, num_classes, k, temperature):
    """Accuracy (%) of every cell over all processes, each test image counted once.

    Args:
        bank: ``{cell: (N, C)}`` training features of the whole training set (every process).
        test_features: ``{cell: (n, C)}`` this process's test features; ``test_labels`` (n,).

    Returns:
        (accuracy list in the order of ``cells``, number of test images over all processes).
    """
    counter = AccuracyCounter(len(cells), test_labels.device)
    for start in range(0, test_labels.shape[0], QUERY_CHUNK):
        chunk = slice(start, start + QUERY_CHUNK)
        votes = torch.stack([knn_votes(bank[cell], bank_labels, test_features[cell][chunk], num_classes, k,
                                       temperature) for cell in cells])  # (n_cells, chunk, classes)
        counter.update(votes, test_labels[chunk])
    return counter.reduce()


def run_knn(cfg, diffusion, train_set, test_set, timesteps, blocks, device, out_dir, tag, precision="fp32",
            batch_size=128, num_workers=0, k=DEFAULT_K, temperature=DEFAULT_TEMPERATURE, seed=0,
            heatmap=False, source=None):
    """Extract the features of both splits once and classify the test set with k-NN in every cell.

    Args:
        cfg: the config (``model_type`` and ``classes`` are read).
        diffusion: the frozen model (see ``evaluation.frozen.prepare_frozen``).
        train_set, test_set: datasets without augmentation.
        timesteps, blocks: the cells are every pair (see ``evaluation.cells.probe_cells``).
        device: this process's device.
        out_dir, tag: the results go to ``out_dir/{tag}.json`` (and ``{tag}.png``).
        precision: autocast precision of the feature pass.
        batch_size, num_workers: of the feature pass, per process.
        k, temperature: the k-NN's neighbours and vote temperature.
        seed: training image i is noised with seed ``seed + i``, test image i with
            ``seed + len(train_set) + i``.
        heatmap: also draw the accuracy table as a heatmap.
        source: the checkpoint the features come from, recorded in the JSON with its weights' hash.

    Returns:
        the result dict written to ``{tag}.json``.
    """
    cells = [(t, block) for t in timesteps for block in blocks]
    started = time.perf_counter()
    splits = {}
    for name, dataset, split_seed in (("train", train_set, seed), ("test", test_set, seed + len(train_set))):
        loader = build_loader(dataset, batch_size, train=False, num_workers=num_workers, device=device)
        splits[name] = extract_dataset_features(diffusion, loader, timesteps, blocks, device, norm=True,
                                                precision=precision, seed=split_seed, desc=f"{name} features")
    bank, bank_labels = gather_bank(*splits["train"], cells)
    synchronize(device)
    extracted = time.perf_counter()
    accuracy, test_images = knn_accuracy(bank, bank_labels, *splits["test"], cells, cfg.classes, k, temperature)
    finished = time.perf_counter()

    table, best = accuracy_table(cells, accuracy)
    result = {"checkpoint": source, "model_type": cfg.model_type, "dataset": cfg.dataset, "k": k,
              "temperature": temperature, "seed": seed, "timesteps": list(timesteps), "blocks": list(blocks),
              "world_size": get_world_size(), "train_images": len(bank_labels), "test_images": test_images,
              "seconds": {"features": round(extracted - started, 2), "knn": round(finished - extracted, 2)},
              "accuracy": table, "best": best, "provenance": provenance(source, cfg, device, seed)}
    if is_main():
        save_json(result, os.path.join(out_dir, f"{tag}.json"))
        print0(format_accuracy_table(table, timesteps, blocks))
        print0(best_line(best, test_images, f"{len(bank_labels)} training images; features "
                                            f"{extracted - started:.1f} s, k-NN {finished - extracted:.1f} s"))
        if heatmap:
            plot_accuracy_heatmap(table, timesteps, blocks, os.path.join(out_dir, f"{tag}.png"),
                                  title=f"{k}-NN test accuracy (%), {tag}")
    return result


def knn_tag(checkpoint, timesteps, blocks, grid, k, temperature, settings=""):
    """Name of the outputs: checkpoint stem, weights' hash, cells, k-NN settings and ``settings``
    (``evaluation.report.settings_tag``: --max_images, precision, --seed when not their defaults), e.g.
    ``model_1999_sha1a2b3c4d_grid_k20_T0.07`` or ``..._k20_T0.07_max500_bf16``."""
    return f"{probe_tag(checkpoint, timesteps, blocks, grid)}_k{k}_T{temperature:g}{settings}"


@cli_entry
def main(args):
    check_args(args)
    cfg = load_config(args.config, args.set, allow_dit=True)
    timesteps, blocks = probe_cells(cfg, args.grid, blocks=args.blocks)
    if on_latents(cfg):  # checked before the weights load
        train_set, test_set = (limit_images(split, args.max_images) for split in latent_datasets(cfg, train_copy=0))
    checkpoint = checkpoint_from_args(cfg, args)
    diffusion = read_features_with(load_diffusion(cfg, checkpoint, weights="ema"), args.feature_label)
    out_dir = os.path.join(cfg.save_dir, "knn")
    check_writable(out_dir, "save_dir", "choose a writable save_dir with --set save_dir=DIR")
    if not on_latents(cfg):
        train_set, test_set = config_splits(cfg, args.data_root, test_transform(), args.max_images)
    if args.k > len(train_set):
        raise UserError(f"--k {args.k}: larger than the {len(train_set)} training images; pass --k "
                        f"{len(train_set)} or less")
    if args.k == len(train_set):
        print0(f"note: --k {args.k} is the whole training set: every test image is voted on by all of it, "
               f"weighted by similarity only")

    device = init_distributed(args.device)
    try:
        precision = resolve_precision(args, device)
        configure_backends(args, device)
        diffusion = prepare_frozen(diffusion, device, compile=args.compile)
        print0(f"{args.k}-NN on {checkpoint}: timestep(s) {format_timesteps(timesteps)} x {len(blocks)} block(s), "
               f"{len(train_set)} training and {len(test_set)} test images, {get_world_size()} process(es), "
               f"{precision}")
        seed = cfg.seed if args.seed is None else args.seed
        tag = knn_tag(checkpoint, timesteps, blocks, args.grid and not args.blocks, args.k, args.temperature,
                      settings_tag(args.max_images, precision, seed, cfg.seed)) + label_tag(args.feature_label)
        run_knn(cfg, diffusion, train_set, test_set, timesteps, blocks, device, out_dir=out_dir, tag=tag,
                precision=precision, batch_size=args.batch_size or cfg.linear.batch_size,
                num_workers=resolve_num_workers(args, cfg), k=args.k, temperature=args.temperature, seed=seed,
                heatmap=args.grid, source=checkpoint)
    finally:
        cleanup()


if __name__ == "__main__":
    # SIGTERM / SIGUSR1: stop at once with exit code 75, saying what the same command redoes
    with StopSignals(at_once="nothing is saved mid-way; the same command runs the feature pass and the k-NN "
                             "again"):
        main(build_parser().parse_args())
