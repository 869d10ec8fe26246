"""Noise-conditional WideResNet trained from scratch on noised images: the baseline that DDAE's
time-conditioned heads are compared with, noise level by noise level, as in the DDAE paper.

    python noisy_classifier_WRN.py --mode DDPM                     # WRN-28-10, CIFAR-10, 200 epochs
    torchrun --nproc_per_node=4 noisy_classifier_WRN.py --mode EDM --use_amp
    python noisy_classifier_WRN.py --mode DDPM --resume            # continue an interrupted run

Writes to --save_dir (default ./output_WRN_{mode}): ckpts/model_{epoch}.pth after every epoch
(only the latest is kept), log.jsonl (one line per epoch), and after training the test accuracy
at each noise level: noisy_accuracy.json (with the provenance record: the SHA-256 of the last
checkpoint, the flags, the command, the code version) and noisy_accuracy.png. When noisy_classifier_DDAE.py
results of the same mode are found next to the save_dir, the comparison figure
noisy_compare_{mode}.png is drawn into the save_dir too (see utils/noisy.py). --tensorboard also
writes the loss, accuracy and learning rate of every epoch and the final accuracy per level to
save_dir/tb/.

The learning rate warms up linearly and then follows a cosine, updated every optimizer step.
--lr and --batch_size are per process and are not scaled by the number of processes.
--resume on a finished run only evaluates it again. The noise of every epoch is seeded from
(--seed, epoch, rank), so with --num_workers 0 a resumed run is bitwise the uninterrupted one on
the same device; with loader workers, the crops and flips after a resume differ.
"""
import argparse
import os

import torch
import torch.nn.functional as F

from evaluation.noisy import ImageNoiser, accuracy_per_level
from model.amp import autocast, make_grad_scaler, scaled_step
from model.wrn import WideResNet
from utils.checkpoint import checkpoint_path, latest_checkpoint, list_checkpoints, save_checkpoint
from utils.cli import add_amp_args, resolve_precision
from utils.data import (DATASETS, add_data_args, add_max_images_arg, build_dataset,
                        build_loader, default_num_workers, limit_images, probe_train_transform, test_transform)
from utils.distributed import (add_launcher_args, barrier, cleanup, get_rank, get_world_size, init_distributed, is_main,
                               print0, wrap_ddp)
from utils.epochs import EpochLoop, EpochTotals
from utils.errors import UserError, cli_entry
from utils.noisy import MODES, format_table, log_levels, publish_results
from utils.preemption import StopSignals
from utils.progress import batches
from utils.provenance import provenance
from utils.schedule import lr_factor
from utils.tensorboard import add_tensorboard_arg, open_board

# Flags a checkpoint must agree with to be resumed: they define the network and what it learns (the images, and
# the seed that draws its noise). The network is this script's own, so these flags are its identity: no
# pre-trained weights enter it. Checkpoints from before max_images and seed were compared skip them.
RESUME_KEYS = ("mode", "blocks_per_group", "width", "dataset", "image_size", "max_images", "seed")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train and test a noise-conditional WideResNet.")
    parser.add_argument("--mode", choices=MODES, required=True,
                        help="DDPM: t ~ U{1..1000}, conditioning t/1000; EDM: ln sigma ~ N(-1.2, 1.2), "
                             "conditioning ln sigma")
    parser.add_argument("--dataset", choices=list(DATASETS), default="cifar")
    add_data_args(parser, num_workers=False)
    parser.add_argument("--image_size", type=int, default=None,
                        help="image side; the dataset's own size by default (32 for synthetic)")
    parser.add_argument("--save_dir", default=None, help="output folder; default ./output_WRN_{mode}")
    parser.add_argument("--batch_size", type=int, default=128, help="images per step and process")
    parser.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight_decay", type=float, default=5e-4)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--warm_epochs", type=int, default=5, help="epochs of linear warm-up")
    parser.add_argument("--blocks_per_group", type=int, default=4, help="4 gives WRN-28 (6 * 4 + 4 layers)")
    parser.add_argument("--width", type=int, default=10, help="channel multiplier k of WRN-28-k")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in save_dir/ckpts (start fresh if none)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--num_workers", type=int, default=None,
                        help="data-loader processes per loader (default: chosen from the CPUs this process may use)")
    add_max_images_arg(parser)
    add_amp_args(parser)
    add_launcher_args(parser)
    add_tensorboard_arg(parser)
    args = parser.parse_args(argv)
    if args.save_dir is None:
        args.save_dir = f"./output_WRN_{args.mode}"
    if args.image_size is None:
        args.image_size = DATASETS[args.dataset].image_size or 32
    return args


def check_args(args):
    for name in ("batch_size", "epochs", "blocks_per_group", "width", "image_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)}: must be at least 1")
    if not 0 <= args.warm_epochs <= args.epochs:
        raise UserError(f"--warm_epochs {args.warm_epochs}: must be in 0..--epochs ({args.epochs})")
    if args.lr <= 0:
        raise UserError(f"--lr {args.lr}: must be positive")
    if args.num_workers is None:
        args.num_workers = default_num_workers()
    elif args.num_workers < 0:
        raise UserError(f"--num_workers {args.num_workers}: must be 0 or positive")


def wrn_label(args):
    return f"WRN-{6 * args.blocks_per_group + 4}-{args.width}"


def run_settings(args):
    """The flags that describe the run, stored in every checkpoint."""
    keys = RESUME_KEYS + ("batch_size", "lr", "momentum", "weight_decay", "epochs", "warm_epochs")
    return {key: getattr(args, key) for key in keys}


def prepare_resume(args):
    """The checkpoint to continue from, or None; refuses to overwrite a run without --resume."""
    latest = latest_checkpoint(args.save_dir)
    if latest is None:
        if args.resume:
            print0(f"--resume: no checkpoint in {os.path.join(args.save_dir, 'ckpts')}; starting fresh")
        return None
    if not args.resume:
        raise UserError(f"{latest} exists: pass --resume to continue that run, or choose another --save_dir")
    return latest


def load_resume_state(loop, path, args, model, optimizer, scaler):
    """Load a checkpoint into the model, optimizer and scaler; return (next epoch, step)."""
    checkpoint = loop.resume(path, run_settings(args), "{path} was trained with --{key} {saved}, not {wanted}; "
                             "pass --{key} {saved} or choose another --save_dir", keys=RESUME_KEYS, lenient=True,
                             done=lambda state: state["epoch"] + 1)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["opt"])
    if checkpoint.get("scaler") is not None:
        scaler.load_state_dict(checkpoint["scaler"])
    return checkpoint["epoch"] + 1, checkpoint["step"]


def save_epoch_checkpoint(args, epoch, step, model, optimizer, scaler):
    """Write save_dir/ckpts/model_{epoch}.pth atomically, then remove the older ones (main process)."""
    path = checkpoint_path(args.save_dir, epoch)
    save_checkpoint({"model": model.state_dict(), "opt": optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                     "epoch": epoch, "step": step, "settings": run_settings(args)}, path)
    for older_epoch, older in list_checkpoints(args.save_dir).items():
        if older_epoch < epoch:
            os.remove(older)
    return path


def train_one_epoch(model, loader, noiser, optimizer, scaler, lr_at_step, step, device, precision):
    """One pass over the training shard; returns (next step, this process's ``EpochTotals``)."""
    model.train()
    totals = EpochTotals(device)
    for images, labels in batches(loader, "training"):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = lr_at_step(step)
        x_noisy, conditioning = noiser.training_batch(2 * images - 1)  # (B, C, H, W), (B,)
        with autocast(device, precision):
            logits = model(x_noisy, conditioning)
        loss = F.cross_entropy(logits.float(), labels)
        scaled_step(loss, optimizer, scaler)
        totals.add(loss, logits, labels)
        step += 1
    return step, totals


def evaluate(model, loader, noiser, device, precision):
    """Test accuracy (%) at each of ``noiser.levels``, and the number of test images."""
    model.eval()

    def classify(images, level):
        x_noisy, conditioning = noiser.test_batch(2 * images - 1, level)
        with autocast(device, precision):
            return model(x_noisy, conditioning).float()

    return accuracy_per_level(classify, loader, noiser.levels, device)


def report(args, levels, accuracies, n_test_images, noiser, board, device):
    """Print the table, write the result file (with the provenance record naming the trained network's last
    checkpoint by hash) and its plot, and the comparison figure if possible."""
    label = wrn_label(args)
    print0(format_table(levels, accuracies, args.mode,
                        f"{label} trained on noised images ({args.mode}): test accuracy"))
    log_levels(board, levels, accuracies)
    if not is_main():
        return
    extra = {"sigmas": [noiser.sigmas[level].item() for level in levels]} if args.mode == "EDM" else {}
    extra["provenance"] = provenance(checkpoint_path(args.save_dir, args.epochs - 1), vars(args), device, args.seed)
    publish_results(args.save_dir, os.path.dirname(os.path.abspath(args.save_dir)), "WRN", args.mode, levels,
                    accuracies, label, n_test_images, **extra)


@cli_entry
def main(args):
    check_args(args)
    device = init_distributed(args.device)
    try:
        run(args, device)
    finally:
        cleanup()


def run(args, device):
    rank, world_size = get_rank(), get_world_size()
    precision = resolve_precision(args, device)
    resume_from = prepare_resume(args)

    train_set = limit_images(build_dataset(args.dataset, args.data_root, True, probe_train_transform(args.image_size),
                                           image_size=args.image_size), args.max_images)
    test_set = limit_images(build_dataset(args.dataset, args.data_root, False, test_transform(),
                                          image_size=args.image_size), args.max_images)
    train_loader = build_loader(train_set, args.batch_size, train=True, num_workers=args.num_workers,
                                seed=args.seed, device=device, batch_flag="--batch_size")
    test_loader = build_loader(test_set, args.batch_size, train=False, num_workers=args.num_workers,
                               seed=args.seed, device=device)

    torch.manual_seed(args.seed)
    model = WideResNet(blocks_per_group=args.blocks_per_group, channel_multiplier=args.width,
                       num_classes=train_set.num_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scaler = make_grad_scaler(device, precision)
    board = open_board(args.tensorboard, os.path.join(args.save_dir, "tb"))
    log_path = os.path.join(args.save_dir, "log.jsonl")
    loop = EpochLoop(args.epochs, device, board=board, prefix="noisy/", log_path=log_path,
                     how="the same command with --resume continues it")
    start_epoch, step = 0, 0
    if resume_from is not None:
        start_epoch, step = load_resume_state(loop, resume_from, args, model, optimizer, scaler)
    trained = wrap_ddp(model, device) if world_size > 1 else model

    noiser = ImageNoiser(args.mode, device)
    steps_per_epoch = len(train_loader)
    total_steps, warm_steps = args.epochs * steps_per_epoch, args.warm_epochs * steps_per_epoch

    def lr_at_step(index):
        return args.lr * lr_factor(index, total_steps, warm_steps)

    print0(f"{wrn_label(args)} ({sum(p.numel() for p in model.parameters()):,} parameters), {args.mode}, "
           f"{len(train_set)} training images, {world_size} process(es), {precision}")
    for epoch in loop.epochs(start_epoch, train_loader, seed=args.seed):
        step, totals = train_one_epoch(trained, train_loader, noiser, optimizer, scaler, lr_at_step, step, device,
                                       precision)
        loss, train_acc, _ = totals.reduce()
        if is_main():
            save_epoch_checkpoint(args, epoch, step, model, optimizer, scaler)
        lr = lr_at_step(step - 1)
        loop.log(epoch + 1, f"epoch {epoch}: loss {loss:.4f}, train acc {train_acc:.2f}% (noised), "
                            f"{loop.seconds:.1f} s",
                 {"loss": loss, "train_accuracy": train_acc, "lr": lr},
                 {"epoch": epoch, "step": step, "loss": loss, "train_acc": train_acc, "lr": lr,
                  "seconds": round(loop.seconds, 2)})
        barrier()
        loop.stop_if_asked(epoch, checkpoint_path(args.save_dir, epoch))
    loop.close()

    torch.manual_seed(args.seed + rank)
    accuracies, n_test_images = evaluate(model, test_loader, noiser, device, precision)
    report(args, noiser.levels, accuracies, n_test_images, noiser, board, device)
    board.close()


if __name__ == "__main__":
    with StopSignals():  # SIGTERM / SIGUSR1: stop once the epoch's checkpoint is saved
        main(parse_args())
