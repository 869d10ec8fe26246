"""Linear probing of a frozen DDAE: one linear classifier per (timestep, block) on pooled features, or
another probe head (--head / linear.head: mlp, attention over a block's tokens, fusion of every cell).

    python linear.py --config config/DDPM_ddpm.yaml --use_amp --epoch 1999
    torchrun --nproc_per_node=4 linear.py --config config/EDM_ddpm.yaml --use_amp --epoch 1999 --grid
    python linear.py --config config/DDPM_ddpm.yaml --epoch 1999 --grid --head attention
    python linear.py --config config/DiT_XL_2_cifar.yaml --precision bf16   # on encode_latents.py's cache

Without --grid the probe reads the features at linear.timestep / linear.blockname; with --grid it
trains a head for every block at DDPM timesteps 1, 11, 21 (on another schedule or n_T, those of the same noise
levels; EDM: 3, 4, 5 of 18; DiT: 41 to 201 by 40) at once, from one forward pass per batch; a head that takes tokens gets each block's (B, T, C) tokens from
that same pass, one batch at a time, and a fused head (fusion) is one head over every cell. Results go to
save_dir/linear/{tag}.json (and {tag}.png with --grid and a head per cell); the tag names the checkpoint, the
start of its weights' SHA-256, the cells, the head (when not linear) and the settings
(model_1999_sha1a2b3c4d_grid_ep15_lr0.001_bs128, ..._grid_attention-width64_ep15_...), or is --tag. A probe that is stopped resumes from its
last finished epoch when run again with the same arguments and the same weights (a state of other weights
is refused); SIGTERM or SIGUSR1 stops it once the epoch's state is saved (exit code 75). --tensorboard
also writes each epoch's loss, lr and accuracies to save_dir/tb/linear_{tag}/.
A DiT config probes cached VAE latents, each training example read from one of its cached copies at random.
"""
import argparse
import json
import os

import torch

from evaluation.cells import cell_label, format_timesteps, probe_cells
from evaluation.features import extract_grid_features, label_tag, read_features_with
from evaluation.frozen import prepare_frozen, to_device
from evaluation.heads import FUSED_LABEL, ProbeHeads, check_heads, evaluate_heads
from evaluation.report import accuracy_table, best_line, format_accuracy_table, linear_tag, plot_accuracy_heatmap
from model.heads import HEADS, head_class
from model.models import feature_dims, load_config, load_diffusion, on_latents
from utils.atomic import check_writable
from utils.cli import (add_amp_args, add_checkpoint_args, add_feature_label_arg, add_speed_args, checkpoint_from_args,
                       configure_backends, resolve_precision)
from utils.config import add_config_args
from utils.data import add_data_args, build_loader, config_splits, probe_train_transform, resolve_num_workers
from utils.distributed import (add_launcher_args, all_reduce_sum, barrier, cleanup, get_rank, get_world_size,
                               init_distributed, is_main, print0, wrap_ddp)
from utils.epochs import EpochLoop, every_rank_rng
from utils.errors import UserError, cli_entry
from utils.latents import latent_datasets
from utils.logging import save_json
from utils.preemption import StopSignals
from utils.progress import batches
from utils.provenance import provenance, refuse_unkeyed_state, weights_identity
from utils.tensorboard import Board, add_tensorboard_arg, open_board


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    add_amp_args(parser)
    add_checkpoint_args(parser)
    add_feature_label_arg(parser)
    parser.add_argument("--grid", action="store_true",
                        help="probe the grid's blocks (a UNet's out_k) at its timesteps (DDPM 1/11/21 or "
                             "their noise levels on another schedule, EDM 3/4/5 of 18, DiT 41/81/.../201)")
    parser.add_argument("--blocks", nargs="+", default=None, metavar="BLOCK",
                        help="blocks to probe instead of the grid's (or linear.blockname), e.g. in_3,mid,out_6")
    parser.add_argument("--head", default=None, metavar="NAME",
                        help=f"the probe head instead of linear.head: {', '.join(HEADS)} or package.module.Class "
                             f"(its settings: --set linear.head_args.KEY=VALUE)")
    parser.add_argument("--tag", default=None,
                        help="name of the result files in save_dir/linear (default: the checkpoint, its weights' "
                             "hash, the cells, the head and the probe's settings, e.g. "
                             "model_1999_sha1a2b3c4d_grid_ep15_lr0.001_bs128)")
    add_data_args(parser)
    add_speed_args(parser)
    add_launcher_args(parser)
    add_tensorboard_arg(parser)
    return parser


def train_one_epoch(diffusion, heads, model, optimizer, loader, device, precision="fp32"):
    """One pass over this process's training shard, fresh noise for every batch.

    Args:
        heads: the ``ProbeHeads``; ``model`` is the module to call, the heads themselves or their
            DistributedDataParallel wrapper (utils.distributed.wrap_ddp).

    Returns:
        (per-head sum of the batch losses times batch sizes, (n_heads,) on the device; images seen).
        Nothing is read back to the host, so the GPU never waits.
    """
    heads.train()
    loss_sum = torch.zeros(len(heads.labels), device=device)
    images_seen = 0
    for images, labels in batches(loader, "probe training"):
        images, labels = to_device(images, labels, device)
        features = extract_grid_features(diffusion, images, heads.timesteps, heads.blocks, precision=precision,
                                         tokens=heads.tokens, labels=labels)
        losses = heads.losses(model([features[cell] for cell in heads.cells]), labels)  # (n_heads,)
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # the heads are independent: each gets the gradient of its own loss
        optimizer.step()
        loss_sum += losses.detach() * labels.shape[0]
        images_seen += labels.shape[0]
    return loss_sum, images_seen


def _settings(cfg, heads, world_size, precision):
    """What a saved probe state must match to be resumed: everything that changes its numbers."""
    return {"cells": [cell_label(t, block) for t, block in heads.cells], "head": cfg.linear.head,
            "head_args": dict(cfg.linear.head_args), "n_epoch": cfg.linear.n_epoch, "batch_size": cfg.linear.batch_size,
            "lrate": cfg.linear.lrate, "dataset": cfg.dataset, "seed": cfg.seed, "world_size": world_size,
            "precision": precision}


def run_probe(cfg, diffusion, train_set, test_set, timesteps, blocks, device, out_dir, tag, precision="fp32",
              num_workers=0, heatmap=False, source=None, board=None):
    """Train and test the probe heads (``cfg.linear.head``) of every (timestep, block) cell, or the one fused
    head of them all; resumable per epoch.

    Args:
        cfg: the config (``linear``, ``classes``, ``seed``, ``image_shape`` are read).
        diffusion: the frozen model (see ``evaluation.frozen.prepare_frozen``).
        train_set, test_set: datasets with the probe's training and test transforms.
        timesteps, blocks: the probed cells are every pair (see ``evaluation.cells.probe_cells``).
        device: this process's device.
        out_dir: folder of ``{tag}.json``, ``{tag}.png`` and the resume state ``{tag}.state.pth``.
        tag: name of this probe's files.
        precision: autocast precision of the feature pass.
        num_workers: data-loader workers per process.
        heatmap: also draw the accuracy table as a heatmap.
        source: the checkpoint the features come from: its weights' hash keys the resume state (another
            model's state is refused) and it is recorded in the JSON's provenance.
        board: a ``utils.tensorboard.Board`` that also receives each epoch's numbers.

    Returns:
        the result dict written to ``{tag}.json``.
    """
    rank, world_size = get_rank(), get_world_size()
    board = board or Board()
    n_epoch = cfg.linear.n_epoch
    torch.manual_seed(cfg.seed)  # the same initial heads on every process and at any world size
    heads = ProbeHeads(feature_dims(diffusion, cfg.image_shape), timesteps, blocks, cfg.classes,
                       head_class(cfg.linear.head), cfg.linear.head_args, name=cfg.linear.head).to(device)
    check_heads(heads, diffusion, test_set, device, precision)  # a head that cannot train: one line, no epoch
    optimizer = torch.optim.Adam(heads.parameters(), lr=cfg.linear.lrate * world_size,
                                 fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=n_epoch)
    torch.manual_seed(cfg.seed + rank)  # noise and augmentation differ between processes

    settings = _settings(cfg, heads, world_size, precision)
    state_path = os.path.join(out_dir, f"{tag}.state.pth")
    loop = EpochLoop(n_epoch, device, board=board, prefix="linear/", how="the same command continues the probe",
                     what="probe state")
    history, start_epoch, test_images = [], 0, None
    weights = weights_identity(source) if source else None
    state = loop.resume(state_path, settings, "{path} holds a probe with {key}={saved!r}, not {wanted!r}; run "
                                              "with the same settings to resume it, or delete it to start over",
                        weights=weights, fix="pass another --tag, or delete it to start over")
    if state is not None:
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, start_epoch, test_images = state["history"], state["epoch"], state["test_images"]
    result_path = os.path.join(out_dir, f"{tag}.json")
    done = _finished(result_path) if start_epoch == n_epoch else None
    if done is not None:  # nothing to train: the result stays the finished run's, not this command's
        print0(f"{result_path}: finished, {n_epoch} epochs; nothing to train")
        return done
    # The record of what trained the heads: this command's, or the finished state's when only its JSON is missing.
    record = state["provenance"] if start_epoch == n_epoch and state.get("provenance") else \
        provenance(source, cfg, device, cfg.seed)

    model = heads
    if world_size > 1:
        model = wrap_ddp(heads, device)
    train_loader = build_loader(train_set, cfg.linear.batch_size, train=True, num_workers=num_workers,
                                seed=cfg.seed, device=device, batch_flag="--set linear.batch_size=N")
    test_loader = build_loader(test_set, cfg.linear.batch_size, train=False, num_workers=num_workers,
                               seed=cfg.seed, device=device)
    labels = heads.labels
    for epoch in loop.epochs(start_epoch, train_loader):
        lr = optimizer.param_groups[0]["lr"]
        loss_sum, images_seen = train_one_epoch(diffusion, heads, model, optimizer, train_loader, device, precision)
        scheduler.step()
        totals = all_reduce_sum(torch.cat([loss_sum, torch.tensor([float(images_seen)], device=device)])).cpu()
        train_loss = (totals[:-1] / totals[-1]).tolist()
        accuracy, test_images = evaluate_heads(diffusion, heads, test_loader, device, precision)
        seconds = loop.seconds
        history.append({"epoch": epoch, "lr": lr, "seconds": seconds,
                        "train_loss": dict(zip(labels, train_loss)), "test_accuracy": dict(zip(labels, accuracy))})
        best = max(range(len(labels)), key=accuracy.__getitem__)
        loss, rate = sum(train_loss) / len(labels), int(totals[-1]) / seconds
        loop.log(epoch + 1, f"epoch {epoch}/{n_epoch}  lr {lr:.2e}  loss {loss:.4f}  best {labels[best]} "
                            f"{accuracy[best]:.2f}%  ({rate:.0f} train img/s)",
                 {"loss": loss, "lr": lr, "img_per_s": rate, "best_accuracy": accuracy[best]})
        board.scalars(dict(zip(labels, accuracy)), epoch + 1, prefix="accuracy/")
        loop.save(state_path, {"settings": settings, "epoch": epoch + 1, "heads": heads.state_dict(),
                               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                               "rng": every_rank_rng(), "history": history, "test_images": test_images,
                               "weights": weights, "provenance": record})
        loop.stop_if_asked(epoch, state_path)
    barrier()

    result = _summary(cfg, heads, history, test_images, world_size, source)
    result["precision"], result["provenance"] = precision, record
    if is_main():
        save_json(result, result_path)
        if heads.fused:
            print0(f"fused {cfg.linear.head} head over {len(heads.cells)} cell(s): "
                   f"{result['accuracy'][FUSED_LABEL]:.2f}% ({test_images} test images)")
            return result
        print0(format_accuracy_table(result["accuracy"], timesteps, blocks))
        best = result["best"]
        print0(best_line(best, test_images))
        if heatmap:
            plot_accuracy_heatmap(result["accuracy"], timesteps, blocks, os.path.join(out_dir, f"{tag}.png"),
                                  title=f"{cfg.linear.head} probe test accuracy (%), {tag}")
    return result


def _finished(path):
    """The result record at ``path``; None when there is none or it is damaged (then it is written again)."""
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def _summary(cfg, heads, history, test_images, world_size, source):
    """The result record: settings, per-epoch history, final accuracy table and best cell (a fused head:
    its one accuracy, ``{"fused": accuracy}``, and no best cell)."""
    final = history[-1]["test_accuracy"]
    if heads.fused:
        table, best = dict(final), None
    else:
        table, best = accuracy_table(heads.cells, [final[label] for label in heads.labels])
    return {"checkpoint": source, "model_type": cfg.model_type, "head": cfg.linear.head,
            "head_args": dict(cfg.linear.head_args), "timesteps": heads.timesteps,
            "blocks": heads.blocks, "n_epoch": cfg.linear.n_epoch, "world_size": world_size,
            "test_images": test_images, "epochs": history, "accuracy": table, "best": best}


@cli_entry
def main(args):
    cfg = load_config(args.config, args.set, flags={"linear.head": ("--head", args.head)}, allow_dit=True)
    timesteps, blocks = probe_cells(cfg, args.grid, blocks=args.blocks)
    latents = latent_datasets(cfg) if on_latents(cfg) else None  # checked before the weights load
    checkpoint = checkpoint_from_args(cfg, args)
    diffusion = read_features_with(load_diffusion(cfg, checkpoint, weights="ema"), args.feature_label)
    num_workers = resolve_num_workers(args, cfg)
    out_dir = os.path.join(cfg.save_dir, "linear")
    check_writable(out_dir, "save_dir", "choose a writable save_dir with --set save_dir=DIR")
    grid = args.grid and not args.blocks
    if args.tag and (os.sep in args.tag or (os.altsep and os.altsep in args.tag)):
        raise UserError(f"--tag {args.tag}: a file name, without folders; pass a plain name")

    device = init_distributed(args.device)
    board = Board()
    try:
        precision = resolve_precision(args, device)  # in the tag: it changes the numbers
        tag = args.tag or (linear_tag(cfg, checkpoint, timesteps, blocks, grid, precision=precision)
                           + label_tag(args.feature_label))
        if not args.tag:
            old = linear_tag(cfg, checkpoint, timesteps, blocks, grid, False, precision)
            refuse_unkeyed_state(os.path.join(out_dir, f"{old}.state.pth"), os.path.join(out_dir, f"{tag}.state.pth"),
                                 checkpoint, "probe state")
        board = open_board(args.tensorboard, os.path.join(cfg.save_dir, "tb", f"linear_{tag}"))
        configure_backends(args, device)
        diffusion = prepare_frozen(diffusion, device, compile=args.compile)
        if latents:
            train_set, test_set = latents
        else:
            train_set, test_set = config_splits(cfg, args.data_root, probe_train_transform(cfg.image_shape[-1]))
        print0(f"linear probe of {checkpoint}: timestep(s) {format_timesteps(timesteps)} x {len(blocks)} block(s), "
               f"{cfg.linear.n_epoch} epochs, {get_world_size()} process(es), {precision}")
        run_probe(cfg, diffusion, train_set, test_set, timesteps, blocks, device, out_dir=out_dir, tag=tag,
                  precision=precision, num_workers=num_workers, heatmap=args.grid, source=checkpoint, board=board)
    finally:
        board.close()
        cleanup()


if __name__ == "__main__":
    with StopSignals():  # SIGTERM / SIGUSR1: stop once the epoch's state is saved
        main(build_parser().parse_args())
