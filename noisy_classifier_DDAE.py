"""Noise-conditional classifier on frozen DDAE features: an MLP head that is told the noise level,
compared with the WideResNet trained on noised images, noise level by noise level, as in the DDAE paper.

    python noisy_classifier_DDAE.py --config config/DDPM_ddpm.yaml --use_amp --epoch 1999
    torchrun --nproc_per_node=4 noisy_classifier_DDAE.py --config config/EDM_ddpm.yaml --use_amp

The EMA network of the checkpoint is frozen; its feature at ``linear.blockname`` (the network
stops after that block) of images noised to a random level per image, plus a time embedding of
that level, feeds a two-layer MLP trained with Adam (lr ``linear.lrate`` times the number of
processes, cosine over ``linear.n_epoch`` epochs, stepped per epoch) on cropped and flipped images.

Writes to save_dir/noisy_DDAE_ep{epoch}_sha{hash} (or noisy_DDAE_{checkpoint file name}_sha{hash} for --ckpt;
the hash is the start of the weights' SHA-256, so two models of one file name never share a folder):
noisy_accuracy.json (with the provenance record) and noisy_accuracy.png with the test accuracy at the
20 DDPM timesteps or the 18 EDM indices, log.jsonl and head.pth. When noisy_classifier_WRN.py results of the same mode
are found in a folder next to save_dir (./output_WRN_{mode} by default), the comparison figure
noisy_compare_{mode}.png is drawn into the run folder too (see utils/noisy.py). --tensorboard also
writes the loss and accuracy of every epoch and the final accuracy per level to
save_dir/tb/noisy_DDAE_ep{epoch}_sha{hash}/.
"""
import argparse
import os

import torch
import torch.nn.functional as F

from evaluation.features import extract_features
from evaluation.frozen import prepare_frozen, to_device
from evaluation.noisy import accuracy_per_level
from evaluation.report import settings_tag
from model.heads import NoiseConditionalHead
from model.models import diffusion_class, feature_dims, load_config, load_diffusion
from utils.checkpoint import CHECKPOINT_NAME, save_checkpoint
from utils.cli import (add_amp_args, add_checkpoint_args, add_speed_args, checkpoint_from_args, configure_backends,
                       resolve_precision)
from utils.config import add_config_args, config_name
from utils.data import (add_data_args, add_max_images_arg, build_loader, config_splits, probe_train_transform,
                        resolve_num_workers)
from utils.distributed import (add_launcher_args, cleanup, get_rank, get_world_size, init_distributed, is_main, print0,
                               wrap_ddp)
from utils.epochs import EpochLoop, EpochTotals
from utils.errors import UserError, cli_entry
from utils.noisy import format_table, log_levels, publish_results
from utils.preemption import StopSignals
from utils.progress import batches
from utils.provenance import provenance, short_digest
from utils.tensorboard import add_tensorboard_arg, open_board


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train and test a noise-conditional head on frozen DDAE features.")
    add_config_args(parser)
    add_checkpoint_args(parser)
    add_data_args(parser)
    add_max_images_arg(parser)
    add_amp_args(parser)
    add_speed_args(parser)
    add_launcher_args(parser)
    add_tensorboard_arg(parser)
    return parser.parse_args(argv)


def run_tag(checkpoint, max_images=0, precision="fp32"):
    """``ep{E}`` for save_dir/ckpts/model_{E}.pth, else the checkpoint file's name without suffix, then the
    start of the weights' hash and --max_images and the precision when not their defaults
    (``ep1999_sha1a2b3c4d``, ``ep1999_sha1a2b3c4d_max500_bf16``): another model of the same name, or other
    settings, get their own folder."""
    name = os.path.basename(checkpoint)
    match = CHECKPOINT_NAME.match(name)
    stem = f"{f'ep{match.group(1)}' if match else os.path.splitext(name)[0]}_{short_digest(checkpoint)}"
    return stem + settings_tag(max_images, precision)


def max_level(cfg):
    """Training draws levels uniformly in 1..max_level: DDPM timesteps, or EDM schedule indices."""
    return diffusion_class(cfg.model_type).feature_timesteps(cfg.diffusion)[1]


def train_one_epoch(diffusion, head, loader, optimizer, blockname, top_level, device, precision):
    """One pass over the training shard; returns this process's ``EpochTotals``."""
    head.train()
    totals = EpochTotals(device)
    for images, labels in batches(loader, "training"):
        images, labels = to_device(images, labels, device)
        levels = torch.randint(1, top_level + 1, (labels.shape[0],), device=device)  # (B,)
        features = extract_features(diffusion, images, levels, blockname, precision=precision)[blockname]
        logits = head(features, levels)  # (B, classes)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        totals.add(loss, logits, labels)
    return totals


def evaluate(diffusion, head, loader, levels, blockname, device, precision):
    """Test accuracy (%) at each level, and the number of test images."""
    head.eval()

    def classify(images, level):
        level_per_image = torch.full((images.shape[0],), level, dtype=torch.long, device=device)
        features = extract_features(diffusion, images, level, blockname, precision=precision)[blockname]
        return head(features, level_per_image)

    return accuracy_per_level(classify, loader, levels, device)


@cli_entry
def main(args):
    cfg = load_config(args.config, args.set)
    checkpoint = checkpoint_from_args(cfg, args)
    device = init_distributed(args.device)
    try:
        run(cfg, args, checkpoint, device)
    finally:
        cleanup()


def run(cfg, args, checkpoint, device):
    rank, world_size = get_rank(), get_world_size()
    precision = resolve_precision(args, device)
    linear, blockname = cfg.linear, cfg.linear.blockname
    kind = diffusion_class(cfg.model_type)
    if not hasattr(kind, "noisy_levels"):
        raise UserError(f"{args.config}: model_type {cfg.model_type} has no noisy_levels(settings), the levels this "
                        f"script reports; give the class one (docs/DESIGN.md, Diffusion contract)")
    try:
        levels = kind.noisy_levels(cfg.diffusion)
    except ValueError as err:
        raise UserError(f"{args.config}: {err}") from None

    train_set, test_set = config_splits(cfg, args.data_root, probe_train_transform(cfg.image_shape[-1]),
                                        args.max_images)
    if train_set.num_classes != cfg.classes:
        raise UserError(f"{args.config}: key 'classes' is {cfg.classes} but dataset '{cfg.dataset}' has "
                        f"{train_set.num_classes} classes; set classes: {train_set.num_classes}")
    num_workers = resolve_num_workers(args, cfg)
    train_loader = build_loader(train_set, linear.batch_size, train=True, num_workers=num_workers,
                                seed=cfg.seed, device=device, batch_flag="--set linear.batch_size=N")
    test_loader = build_loader(test_set, linear.batch_size, train=False, num_workers=num_workers,
                               seed=cfg.seed, device=device)

    configure_backends(args, device)
    diffusion = prepare_frozen(load_diffusion(cfg, checkpoint, weights="ema", device=device), device,
                               compile=args.compile)
    tag = run_tag(checkpoint, args.max_images, precision)  # after the load: its hash is the loaded bytes'
    out_dir = os.path.join(cfg.save_dir, f"noisy_DDAE_{tag}")
    board = open_board(args.tensorboard, os.path.join(cfg.save_dir, "tb", f"noisy_DDAE_{tag}"))
    feature_dim = feature_dims(diffusion, cfg.image_shape)[blockname]
    torch.manual_seed(cfg.seed)  # the same head on every process
    head = NoiseConditionalHead(feature_dim, cfg.classes).to(device)
    trained = wrap_ddp(head, device) if world_size > 1 else head
    optimizer = torch.optim.Adam(head.parameters(), lr=linear.lrate * world_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=linear.n_epoch)

    print0(f"DDAE {config_name(args.config)} ({checkpoint}), feature {blockname} (d = {feature_dim}), "
           f"{cfg.model_type}, {len(train_set)} training images, {world_size} process(es), {precision}")
    loop = EpochLoop(linear.n_epoch, device, board=board, prefix="noisy/", log_path=os.path.join(out_dir, "log.jsonl"))
    torch.manual_seed(cfg.seed + rank)
    for epoch in loop.epochs(0, train_loader):
        totals = train_one_epoch(diffusion, trained, train_loader, optimizer, blockname, max_level(cfg), device,
                                 precision)
        scheduler.step()
        loss, train_acc, _ = totals.reduce()
        loop.log(epoch + 1, f"epoch {epoch}: loss {loss:.4f}, train acc {train_acc:.2f}% (random levels), "
                            f"{loop.seconds:.1f} s",
                 {"loss": loss, "train_accuracy": train_acc, "lr": scheduler.get_last_lr()[0]},
                 {"epoch": epoch, "loss": loss, "train_acc": train_acc, "seconds": round(loop.seconds, 2)})
    loop.close()

    accuracies, n_test_images = evaluate(diffusion, head, test_loader, levels, blockname, device, precision)
    label = f"DDAE {config_name(args.config)} {tag} {blockname}"
    print0(format_table(levels, accuracies, cfg.model_type, f"{label} + noise-conditional MLP: test accuracy"))
    log_levels(board, levels, accuracies)
    board.close()
    if is_main():
        record = provenance(checkpoint, cfg, device, cfg.seed)
        save_checkpoint({"head": head.state_dict(), "feature_dim": feature_dim, "blockname": blockname,
                         "checkpoint": os.path.abspath(checkpoint), "weights": record["weights"]},
                        os.path.join(out_dir, "head.pth"))
        # The noise level of each index under this config's schedule (get_feature's levels).
        extra = diffusion.level_record(levels) | {"provenance": record}
        publish_results(out_dir, os.path.dirname(os.path.abspath(cfg.save_dir)), "DDAE", cfg.model_type, levels,
                        accuracies, label, n_test_images, **extra)


if __name__ == "__main__":
    # SIGTERM / SIGUSR1: stop at once with exit code 75, saying what the same command redoes
    with StopSignals(at_once="nothing is saved mid-way; the same command trains the heads again from the start"):
        main(parse_args())
