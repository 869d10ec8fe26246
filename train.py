"""Train a DDAE diffusion model (DDPM or EDM) on one device, several GPUs or several machines.

    python train.py --config config/DDPM_ddpm.yaml --use_amp                       # one GPU (or the CPU)
    torchrun --nproc_per_node=4 train.py --config config/DDPM_ddpm.yaml --use_amp  # the paper's 4 GPUs
    python train.py --config config/DDPM_ddpm.yaml --use_amp --accum 4             # their batch and lr, 1 GPU
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        train.py --config config/EDM_ddpmpp.yaml --use_amp                         # on every machine
    python train.py --config config/DDPM_ddpm.yaml --use_amp --resume              # continue the latest checkpoint
    python train.py --config config/DDPM_ddpm.yaml --use_amp --resume auto         # the same, or start fresh

The run folder (save_dir) receives config.yaml, log.jsonl (one JSON line per epoch), loss.png, and at
every epoch ep divisible by ckpt_interval (0, 100, ...) and at the last epoch visual/image_ep{ep}_ema.png
(samples above real images) and ckpts/model_{ep}.pth; with --tensorboard, tb/train/ gets the same
numbers and the grids. Every --ckpt_every_min minutes, and on SIGTERM or SIGUSR1, ckpts/latest.pth is
written at a step boundary, mid-epoch included; after a signal the run exits with code 75
(utils.preemption.EXIT_REQUEUE), and the same command with --resume auto continues it. On a terminal
each epoch shows a tqdm bar; in a log file (stderr not a terminal) it is one plain line per epoch with
the time left, a line per checkpoint and a summary at the end.
"""
import argparse
import os
import time
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from model.amp import autocast
from model.models import diffusion_class, load_config
from model.speed import mark_step_begin
from model.training import (done_line, end_of_interval, new_training_state, restore_training, run_is_complete,
                            save_latest_checkpoint, start_epoch)
from utils.atomic import check_writable
from utils.checkpoint import (check_mid_epoch_settings, epoch_settings, find_resume_checkpoint, latest_path,
                              load_checkpoint)
from utils.checkpoint_clock import OTHER_RANK, CheckpointClock
from utils.cli import add_amp_args, add_speed_args, configure_backends, resolve_precision
from utils.config import add_config_args
from utils.data import TrainData, add_data_args, build_dataset, resolve_num_workers, train_transform
from utils.distributed import add_launcher_args, barrier, cleanup, get_rank, get_world_size, init_distributed, print0
from utils.epochs import EpochLoop, epoch_line, start_run_folder, stop_line
from utils.errors import UserError, cli_entry
from utils.preemption import StopSignals, exit_stopped
from utils.progress import is_interactive
from utils.tensorboard import add_tensorboard_arg, open_board

CLIP_NORM = 1.0
SCALARS = ("loss", "lr", "img_per_s", "peak_mem_gib")  # the record's entries that go to TensorBoard


def build_parser():
    parser = argparse.ArgumentParser(
        description="Train a DDAE diffusion model.", epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    add_amp_args(parser)
    add_data_args(parser)
    add_launcher_args(parser)
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH|auto",
                        help="continue a run exactly: alone, from the furthest checkpoint in save_dir "
                             "(latest.pth or the last model_{epoch}.pth, whichever stores the later epoch, "
                             "batch and step); "
                             "'auto': the same, or a fresh start when there is none (one command line for "
                             "the first launch and every restart); with PATH, from that checkpoint file "
                             "(the config's load_epoch does the same for model_{load_epoch}.pth)")
    parser.add_argument("--ckpt_every_min", type=float, default=30, metavar="M",
                        help="write save_dir/ckpts/latest.pth every M minutes (fractions allowed), at a step "
                             "boundary, mid-epoch included, replacing the previous one; 0: only on SIGTERM / "
                             "SIGUSR1. The model_{epoch}.pth checkpoints are written as before")
    parser.add_argument("--accum", type=int, default=1, metavar="K",
                        help="accumulate gradients over K micro-batches of batch_size per optimizer step. "
                             "K micro-batches emulate K times more GPUs, so the learning rate becomes "
                             "lrate * world_size * K: one GPU with --accum 4 trains like the paper's 4 GPUs")
    add_speed_args(parser, "torch.compile the network (speed; the first steps compile it; dropout draws "
                           "differ from the eager network's)")
    parser.add_argument("--channels_last", action="store_true",
                        help="channels-last memory format for the network and batches (speed on GPUs; "
                             "the training noise is drawn in that layout, so the draws differ)")
    parser.add_argument("--gpu_data", action="store_true",
                        help="keep the whole training set on the device as uint8 and flip there "
                             "(speed; the same batches as the data loader gives, bit for bit)")
    parser.add_argument("--drop_last", action="store_true",
                        help="drop each epoch's last, smaller batch, so that every step has the same shape "
                             "(speed with --compile: no second graph). By default it is kept, as the "
                             "original does: 391 steps of 128 per CIFAR-10 epoch instead of 390")
    parser.add_argument("--max_steps", type=int, default=None, metavar="N",
                        help="stop after N optimizer steps (benchmarks, tests); an epoch cut short is "
                             "logged but not checkpointed")
    add_tensorboard_arg(parser)
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def check_args(args):
    """Range checks argparse cannot express."""
    if args.accum < 1:
        raise UserError(f"--accum {args.accum}: must be at least 1")
    if args.max_steps is not None and args.max_steps < 0:
        raise UserError(f"--max_steps {args.max_steps}: must be 0 or positive")
    if not args.ckpt_every_min >= 0:  # also refuses nan
        raise UserError(f"--ckpt_every_min {args.ckpt_every_min:g}: must be 0 (off) or a positive number of minutes")


def train_step(state, images, labels=None):
    """One optimizer step on ``images`` (accum * batch_size, C, H, W) in [0, 1] (and their (B,) ``labels``,
    which a conditional model trains on, None otherwise); no host sync.

    The batch is cut into accum micro-batches (fewer when the epoch's last batch has fewer than accum
    images) whose gradients are averaged, as DDP averages its ranks'; they are unscaled under fp16,
    clipped to norm 1 and applied; the EMA follows.

    Returns:
        the mean loss over the micro-batches, a detached 0-dim tensor on the device.
    """
    state.optimizer.zero_grad(set_to_none=True)
    mark_step_begin(state.compile_mode, state.device)
    micro_batches = images.chunk(state.accum)
    micro_labels = labels.chunk(state.accum) if labels is not None else [None] * len(micro_batches)
    total = torch.zeros((), device=state.device)
    for index, (micro_batch, micro_label) in enumerate(zip(micro_batches, micro_labels)):
        last = index == len(micro_batches) - 1
        # DDP all-reduces the gradients only with the last micro-batch.
        ddp = isinstance(state.model, DistributedDataParallel)
        with state.model.no_sync() if ddp and not last else nullcontext():
            with autocast(state.device, state.precision):
                loss = state.model(micro_batch) if micro_label is None else state.model(micro_batch, micro_label)
            state.scaler.scale(loss / len(micro_batches)).backward()
        total += loss.detach()
    state.scaler.unscale_(state.optimizer)
    nn.utils.clip_grad_norm_(state.diffusion.parameters(), CLIP_NORM)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.ema_updater.update()
    state.step += 1
    return total / len(micro_batches)


def build_training(cfg, args, device):
    """The TrainState of a fresh run as ``args`` ask (precision, --accum, the data and speed switches).

    The data comes first, then the model from seed ``cfg.seed + rank`` (``model.training``). Call after
    ``init_distributed`` when running under a launcher.
    """
    precision = resolve_precision(args, device)
    configure_backends(args, device)
    dataset = build_dataset(cfg.dataset, args.data_root, train=True,
                            transform=train_transform(flip=False),  # TrainData flips on the device
                            image_size=cfg.image_shape[1])
    data = TrainData(dataset, cfg.batch_size * args.accum, device, seed=cfg.seed, flip=cfg.flip,
                     num_workers=resolve_num_workers(args, cfg), on_device=args.gpu_data,
                     channels_last=args.channels_last, drop_last=args.drop_last,
                     labels=getattr(diffusion_class(cfg.model_type), "conditional", False))
    return new_training_state(cfg, data, device, precision, args.accum, args.compile, args.channels_last)


def train(cfg, args):
    """Train ``cfg``'s model as ``args`` ask, from scratch or from a checkpoint.

    SIGTERM and SIGUSR1 stop it at the next step boundary that every rank agrees on, after writing
    latest.pth; ``state.stopped`` then names the signal and ``state.stop_path`` the checkpoint.

    Returns:
        the final TrainState; None when the checkpoint to continue already ended the run.
    """
    # Set-up: the processes, the checkpoint to continue (checked before anything is built), the model.
    check_args(args)
    device = init_distributed(args.device)
    resume_path = find_resume_checkpoint(cfg, args.resume, args.config)
    checkpoint = load_checkpoint(resume_path) if resume_path else None
    if checkpoint is not None and run_is_complete(cfg, checkpoint, resume_path, auto=args.resume == "auto"):
        return None
    check_mid_epoch_settings(checkpoint, resume_path,
                             epoch_settings(get_world_size(), cfg.batch_size, args.accum, args.drop_last))
    check_writable(cfg.save_dir, "save_dir", "choose another folder with --set save_dir=DIR")
    board = open_board(args.tensorboard, os.path.join(cfg.save_dir, "tb", "train"))  # a missing package fails here
    state = build_training(cfg, args, device)

    # Resume: weights, EMA, optimizer, counters and random state, possibly in the middle of an epoch.
    if checkpoint is not None:
        restore_training(state, checkpoint, resume_path)
        del checkpoint
        position = f", batch {state.batch} of {len(state.data)}" if state.batch else ""
        print0(f"resuming from {resume_path}: epoch {state.epoch}{position}, step {state.step}")
    log_path = start_run_folder(cfg, state.epoch)
    loop = EpochLoop(cfg.n_epoch, device, board=board, prefix="train/", log_path=log_path)
    print0(f"training {cfg.model_type} on {cfg.dataset}: {get_world_size()} process(es) on {device.type}, "
           f"{len(state.data)} steps of {state.data.batch_size} images per process and epoch "
           f"({state.data.describe_end()}), lr {state.base_lr:g}, {state.precision}")
    plain = not is_interactive()  # a log file: one line per epoch, with the time left
    first_epoch, started, record = state.epoch, time.perf_counter(), None
    first = first_epoch + state.batch / len(state.data)  # a resumed epoch counts only its remaining part
    signals = StopSignals()
    clock = CheckpointClock(args.ckpt_every_min, signals, device)

    # The loop: steps, then at each epoch's end its line, the interval's checkpoint and grid, the clock.
    try:
        with signals:
            for epoch in range(state.epoch, cfg.n_epoch):
                if args.max_steps is not None and state.step >= args.max_steps:
                    break
                meter = start_epoch(state, epoch)
                for images, labels in state.data.labelled_batches(epoch, start=state.batch):
                    if args.max_steps is not None and state.step >= args.max_steps:
                        break
                    # (an unconditional step is called as before: tests and benchmarks wrap train_step(state, images))
                    loss = train_step(state, images) if labels is None else train_step(state, images, labels)
                    meter.update(loss, images.shape[0])
                    state.batch += 1
                    clock.after_step()
                    if clock.save_due and state.batch < len(state.data):  # at the epoch's end: after its work
                        save_latest_checkpoint(state, clock, meter)
                        if clock.stop_due:
                            break
                if clock.stop_due and state.batch < len(state.data):  # stopped mid-epoch: in latest.pth
                    meter.bar.close()
                    state.stop_path = latest_path(cfg.save_dir)
                    break
                state.batch = 0
                record = meter.finish(state.step)
                line = epoch_line(record, cfg.n_epoch, started, first) if plain else None
                loop.log(record["step"], line, {key: record[key] for key in SCALARS}, record)
                if record["steps"] < len(state.data):
                    break  # cut short by --max_steps
                state.epoch = epoch + 1
                saved = None
                if epoch % cfg.ckpt_interval == 0 or epoch == cfg.n_epoch - 1:
                    saved = end_of_interval(state, epoch, log_path, board, clock)
                if clock.save_due:  # asked for at the epoch's last step
                    saved = save_latest_checkpoint(state, clock)
                if clock.stop_due and state.epoch < cfg.n_epoch:
                    state.stop_path = saved
                    break
            if clock.stop_due and state.stop_path:
                state.stopped = signals.requested or OTHER_RANK
                barrier()  # rank 0 has written latest.pth: no rank exits 75 before the save is whole
    finally:
        board.close()
        loop.close()
    if not state.stopped:
        print0(done_line(state, first_epoch, record, time.perf_counter() - started))
    return state


@cli_entry
def main(args):
    cfg = load_config(args.config, args.set)
    try:
        state = train(cfg, args)
    finally:
        cleanup()
    if state is not None and state.stopped:
        exit_stopped(stop_line(state.stopped, state.stop_path, "run the same command with --resume auto (or "
                                                               "--resume) to continue"), rank=get_rank())


if __name__ == "__main__":
    main(parse_args())
