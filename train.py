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
import random
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.transforms.v2 import functional as TF

from model.amp import autocast, make_grad_scaler
from model.ema import SyncFreeEMA, make_ema
from model.models import build_diffusion, load_config, load_weights
from model.noise import PerImageNoise
from model.speed import compile_module, mark_step_begin
from utils.atomic import atomic_path, check_writable
from utils.checkpoint import (CHECKPOINT_NAME, capture_rng_state, checkpoint_path, latest_path, list_checkpoints,
                              load_checkpoint, remove_stale_temporaries, restore_rng_state, resume_checkpoint,
                              save_checkpoint)
from utils.checkpoint_clock import OTHER_RANK, CheckpointClock
from utils.cli import add_amp_args, add_speed_args, configure_backends, resolve_precision
from utils.config import add_config_args, save_config
from utils.data import (add_data_args, build_dataset, build_loader, epoch_seed, resolve_num_workers, set_loader_epoch,
                        train_transform, uint8_images)
from utils.distributed import (add_launcher_args, all_gather_object, all_reduce_sum, barrier, cleanup, get_rank,
                               get_world_size, init_distributed, is_main, print0)
from utils.epochs import EpochLoop, stop_line
from utils.errors import UserError, cli_entry, describe_error
from utils.images import save_grid
from utils.logging import JsonlLogger, plot_curves, read_jsonl
from utils.preemption import StopSignals, exit_stopped
from utils.progress import LazyText, format_duration, is_interactive, progress
from utils.tensorboard import add_tensorboard_arg, open_board

CLIP_NORM = 1.0
GRID_ROW = 10
PROGRESS_EVERY = 50  # steps between progress-bar refreshes, the only host syncs inside an epoch (on a terminal)
OPTIMIZERS = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}
# Optimizer-group entries that choose an implementation, not the maths: this run's choice wins on resume.
IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")


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


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class TrainData:
    """This process's training batches; their order and flips are a pure function of (seed, epoch, rank).

    The order is DistributedSampler's (seed, epoch) permutation split over ranks; the flips are drawn
    on the device from a generator seeded by (seed, epoch, rank). An epoch therefore sees the same
    images whether it runs straight or after a resume, with any number of loader workers, and from
    host memory or from the device copy (``on_device``).

    Args:
        dataset: training split yielding (float image in [0, 1], label), without random flips.
        batch_size: images per optimizer step on this process.
        device: where batches are delivered.
        seed: shuffling and flipping seed, the same on every rank.
        flip: random horizontal flips with probability 1/2.
        num_workers: loader processes (unused with ``on_device``).
        on_device: keep the whole set on the device as uint8 and gather batches there.
        channels_last: deliver batches in channels-last memory format.
        drop_last: drop the epoch's last, smaller batch (by default it is kept, as in the original).
    """

    def __init__(self, dataset, batch_size, device, seed, flip=True, num_workers=0, on_device=False,
                 channels_last=False, drop_last=False):
        self.dataset = dataset
        self.batch_size = batch_size
        self.device = device
        self.seed = seed
        self.flip = flip
        self.channels_last = channels_last
        self.drop_last = drop_last
        self.rank = get_rank()
        # With on_device the loader is never iterated: its sampler only supplies the order.
        self.loader = build_loader(dataset, batch_size, train=True, num_workers=0 if on_device else num_workers,
                                   seed=seed, device=device, drop_last=drop_last)
        self.images = uint8_images(dataset).to(device) if on_device else None  # (N, C, H, W)

    def __len__(self):
        return len(self.loader)

    def batches(self, epoch, start=0):
        """Yield the epoch's (batch_size, C, H, W) float batches in [0, 1] on the device, from batch
        ``start`` on (a mid-epoch resume).

        Skipped batches are not loaded, but their flips are drawn, so every later batch is flipped as in
        an uninterrupted epoch. The loader itself draws nothing random (its transform has no random
        step), so its workers need no replay.
        """
        set_loader_epoch(self.loader, epoch)
        flips = torch.Generator(self.device).manual_seed(epoch_seed(self.seed, epoch, self.rank))
        if self.flip:
            for _ in range(start):  # only the last batch can be smaller, and it is never skipped
                torch.rand(self.batch_size, generator=flips, device=self.device)
        if self.images is None:
            self.loader.sampler.skip(start * self.batch_size)
            source = (images.to(self.device, non_blocking=True) for images, _ in self.loader)
        else:
            order = torch.tensor(list(self.loader.sampler), device=self.device)
            source = (TF.to_dtype(self.images[order[i * self.batch_size:(i + 1) * self.batch_size]],
                                  torch.float32, scale=True) for i in range(start, len(self)))
        for images in source:
            yield self._finish(images, flips)

    def _finish(self, images, flips):
        if self.flip:
            flipped = torch.rand(images.shape[0], generator=flips, device=self.device) < 0.5
            images = torch.where(flipped.view(-1, 1, 1, 1), images.flip(-1), images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def first_images(self, n):
        """The first ``n`` training images, unflipped, on the CPU: the real half of the sample grids."""
        return torch.stack([self.dataset[i][0] for i in range(min(n, len(self.dataset)))])


@dataclass
class TrainState:
    """Everything a training step touches, plus the counters a checkpoint records."""

    cfg: object                     # utils.config.Config
    device: torch.device
    precision: str                  # fp32, fp16 or bf16
    diffusion: nn.Module            # the bare model: state dicts, EMA and sampling use it
    model: nn.Module                # what computes the loss: DDP(diffusion), or diffusion itself
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: nn.Module                  # ema_pytorch.EMA of diffusion
    ema_updater: SyncFreeEMA
    data: TrainData
    base_lr: float                  # lrate * world_size * accum, before warm-up
    accum: int = 1                  # micro-batches per optimizer step
    compile_mode: str = None        # --compile's mode, None when the network runs eagerly
    epoch: int = 0                  # the next epoch to run, or the one running
    step: int = 0                   # optimizer steps taken
    batch: int = 0                  # batches of epoch `epoch` already trained (a mid-epoch resume)
    epoch_loss: torch.Tensor = None  # with `batch`: this rank's loss sum over those batches
    epoch_seconds: float = None     # with `batch`: the seconds spent on those batches before the resume
    epoch_started: float = None     # perf_counter() at which the running epoch (its earlier part included) began
    settings: dict = None           # epoch_settings(): what decides the epoch's batches
    stopped: str = None             # the signal that stopped the run, if one did
    stop_path: str = None           # the checkpoint written before that stop


def make_optimizer(cfg, parameters, lr, device):
    """Adam, or AdamW with the config's optim_args; fused on CUDA (the same update in one kernel)."""
    kwargs = dict(cfg.optim_args)
    if device.type == "cuda" and "foreach" not in kwargs:  # torch refuses fused together with foreach
        kwargs.setdefault("fused", True)
    try:
        return OPTIMIZERS[cfg.optim](parameters, lr=lr, **kwargs)
    except (TypeError, ValueError) as err:
        raise UserError(f"key 'optim_args' {cfg.optim_args}: torch.optim.{cfg.optim} refuses them "
                        f"({describe_error(err)}); use its keyword arguments") from None


def build_training(cfg, args, device):
    """Build the data, model, DDP wrapper, optimizer, scaler and EMA of a fresh run.

    The model is initialised from seed ``cfg.seed + rank``; under DDP every rank then holds rank 0's
    weights. Call after ``init_distributed`` when running under a launcher.

    Args:
        cfg: a checked Config.
        args: parsed train.py arguments (precision, accum, data and speed switches).
        device: this process's device.
    """
    rank, world_size = get_rank(), get_world_size()
    precision = resolve_precision(args, device)
    configure_backends(args, device)
    batch_size = cfg.batch_size * args.accum
    dataset = build_dataset(cfg.dataset, args.data_root, train=True,
                            transform=train_transform(flip=False),  # TrainData flips on the device
                            image_size=cfg.image_shape[1])
    num_workers = resolve_num_workers(args, cfg)
    data = TrainData(dataset, batch_size, device, seed=cfg.seed, flip=cfg.flip, num_workers=num_workers,
                     on_device=args.gpu_data, channels_last=args.channels_last, drop_last=args.drop_last)

    seed_everything(cfg.seed + rank)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    diffusion = build_diffusion(cfg).to(device, memory_format=memory_format)
    model = diffusion
    if dist.is_initialized() and world_size > 1:
        # The diffusion buffers are constant schedules: no need to broadcast them every step.
        model = DistributedDataParallel(diffusion, device_ids=[device.index] if device.type == "cuda" else None,
                                        broadcast_buffers=False)
    ema = make_ema(diffusion, cfg.ema)  # after DDP, so that it starts from rank 0's weights
    ema.ema_model.eval()
    if args.compile:
        compile_module(diffusion.nn_model, args.compile)  # in place: names and the EMA copy stay as they are
    base_lr = cfg.lrate * world_size * args.accum
    return TrainState(cfg=cfg, device=device, precision=precision, diffusion=diffusion, model=model,
                      optimizer=make_optimizer(cfg, diffusion.parameters(), base_lr, device),
                      scaler=make_grad_scaler(device, precision), ema=ema, ema_updater=SyncFreeEMA(ema),
                      data=data, base_lr=base_lr, accum=args.accum, compile_mode=args.compile,
                      settings=epoch_settings(cfg, args, world_size))


def epoch_settings(cfg, args, world_size):
    """The settings that decide which images each batch of an epoch holds: a mid-epoch latest.pth
    continues only with the same ones (a model_{epoch}.pth with any)."""
    return {"processes": world_size, "batch_size": cfg.batch_size, "accum": args.accum,
            "drop_last": bool(args.drop_last)}


def setting_fix(key, saved):
    """How to run with the setting ``key`` a mid-epoch checkpoint was ``saved`` with."""
    if key == "processes":
        return f"launch {saved} process(es) in all (torchrun --nproc_per_node x --nnodes)"
    if key == "batch_size":
        return f"pass --set batch_size={saved}"
    if key == "accum":
        return f"pass --accum {saved}"
    return "pass --drop_last" if saved else "leave out --drop_last"


def check_mid_epoch_settings(checkpoint, path, settings):
    """Refuse, before any work, to continue a mid-epoch checkpoint with other ``epoch_settings``: the
    epoch's remaining batches would not be the ones it left. Files written before the checkpoint recorded
    its settings are checked on what they hold (processes, the config's batch_size).

    Raises:
        UserError: naming the setting, the saved and the new value, and the fix.
    """
    if not checkpoint.get("batch"):
        return
    saved = checkpoint.get("settings")
    if saved is None:
        saved = {"processes": len(checkpoint.get("epoch_loss", ())) or None,
                 "batch_size": (checkpoint.get("config") or {}).get("batch_size")}
    position = f"batch {checkpoint['batch']} of epoch {int(checkpoint.get('epoch', -1)) + 1}"
    for key, wanted in settings.items():
        if saved.get(key) is not None and saved[key] != wanted:
            raise UserError(f"{path} stopped mid-epoch ({position}) with {key} {saved[key]}, and this run has "
                            f"{key} {wanted}: the rest of that epoch would not be the batches it left; "
                            f"{setting_fix(key, saved[key])}, or continue from a model_{{epoch}}.pth with "
                            f"--resume PATH")


def describe_last_batch(data):
    """How the epoch ends, for the header line: the size of the last batch, or that it is dropped."""
    remainder = len(data.loader.sampler) % data.batch_size
    if not remainder:
        return "all full"
    if data.drop_last:
        return f"--drop_last: the last {remainder} images of each shard are dropped"
    return f"the last of {remainder}"


def train_step(state, images):
    """One optimizer step on ``images`` (accum * batch_size, C, H, W) in [0, 1]; no host sync.

    The batch is cut into accum micro-batches (fewer when the epoch's last batch has fewer than accum
    images) whose gradients are averaged, as DDP averages its ranks'; they are unscaled under fp16,
    clipped to norm 1 and applied; the EMA follows.

    Returns:
        the mean loss over the micro-batches, a detached 0-dim tensor on the device.
    """
    state.optimizer.zero_grad(set_to_none=True)
    mark_step_begin(state.compile_mode, state.device)
    micro_batches = images.chunk(state.accum)
    total = torch.zeros((), device=state.device)
    for index, micro_batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        # DDP all-reduces the gradients only with the last micro-batch.
        ddp = isinstance(state.model, DistributedDataParallel)
        with state.model.no_sync() if ddp and not last else nullcontext():
            with autocast(state.device, state.precision):
                loss = state.model(micro_batch)
            state.scaler.scale(loss / len(micro_batches)).backward()
        total += loss.detach()
    state.scaler.unscale_(state.optimizer)
    nn.utils.clip_grad_norm_(state.diffusion.parameters(), CLIP_NORM)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.ema_updater.update()
    state.step += 1
    return total / len(micro_batches)


def peak_memory_gib(device):
    """Peak memory of this process: CUDA memory allocated on ``device``, else the peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def train_one_epoch(state, epoch, max_steps=None, clock=None):
    """Run one epoch (or until ``state.step`` reaches ``max_steps``) with the warmed-up learning rate.

    A mid-epoch resume (``state.batch`` > 0) continues with the epoch's next batch. After every step
    ``clock`` (a CheckpointClock) may ask for latest.pth, which is written at once unless the step
    ended the epoch (then the caller writes it after the epoch's own work), and for a stop.

    Returns:
        the epoch's log record: epoch, step, steps, loss (mean over steps and ranks), lr,
        img_per_s (all ranks), peak_mem_gib, seconds; None when the clock stopped the epoch
        (latest.pth holds it).
    """
    cfg = state.cfg
    lr = state.base_lr * min((epoch + 1) / cfg.warm_epoch, 1.0)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    world_size = get_world_size()
    if state.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(state.device)
    first = state.batch
    # A bar on a terminal; in a log file only a line every few minutes, the epoch's line comes after it.
    bar = progress(total=len(state.data), initial=first, desc=f"epoch {epoch}/{cfg.n_epoch}", unit="step",
                   disable=not is_main(), every_percent=None, final_line=False, dynamic_ncols=True)
    loss_sum = torch.zeros((), device=state.device)
    if first:  # the batches trained before the resume count in the epoch's loss
        loss_sum += state.epoch_loss.to(state.device)
    state.epoch_loss = None
    recent_loss = torch.zeros((), device=state.device)
    steps, images_seen = first, 0
    start = time.perf_counter()
    # The epoch's clock includes the part trained before a mid-epoch resume (older files: estimated below).
    state.epoch_started = start - (state.epoch_seconds or 0.0)
    for images in state.data.batches(epoch, start=first):
        if max_steps is not None and state.step >= max_steps:
            break
        loss = train_step(state, images)
        loss_sum += loss
        recent_loss += loss
        steps += 1
        images_seen += images.shape[0] * world_size  # shards are padded to equal length
        bar.update()
        if steps % PROGRESS_EVERY == 0 and not bar.disable:
            rate = images_seen / (time.perf_counter() - start)
            # Read on a terminal now; in a log file only if a line is written before the next refresh.
            mean = recent_loss / PROGRESS_EVERY
            bar.set_postfix(loss=LazyText(mean.item, ".4f"), img_s=f"{rate:.0f}")
            recent_loss = torch.zeros((), device=state.device)
        state.batch = steps
        if clock is not None:
            clock.after_step()
            if clock.save_due and steps < len(state.data):
                save_latest_checkpoint(state, clock, loss_sum)
                if clock.stop_due:
                    bar.close()
                    return None
    state.batch = 0
    # The epoch's one collective: loss sums and step counts of every rank.
    loss_total, step_total = all_reduce_sum(torch.stack([loss_sum, loss_sum.new_tensor(float(steps))])).tolist()
    now = time.perf_counter()
    seconds = now - state.epoch_started
    if first and state.epoch_seconds is None and steps > first:  # a file without the time: at this part's pace
        seconds = (now - start) * steps / (steps - first)
    images_seen += first * state.data.batch_size * world_size  # the skipped batches are never the short last one
    state.epoch_seconds = None
    record = {
        "epoch": epoch,
        "step": state.step,
        "steps": steps,
        "loss": loss_total / step_total if step_total else None,
        "lr": lr,
        "img_per_s": round(images_seen / seconds, 1),
        "peak_mem_gib": round(peak_memory_gib(state.device), 3),
        "seconds": round(seconds, 2),
    }
    if steps:
        bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.0f}")
    bar.close()
    return record


def save_training_checkpoint(state, epoch, path=None, loss_sum=None):
    """Write save_dir/ckpts/model_{epoch}.pth (or ``path``) atomically (the DESIGN.md layout).

    ``epoch`` is the last finished epoch. Mid-epoch (``state.batch`` > 0) the file also holds ``batch``,
    the batches of epoch ``epoch + 1`` already trained, and ``epoch_loss``, every rank's loss sum over
    them (``loss_sum`` here).

    Collective: every rank must call it, as each contributes its RNG state; rank 0 writes.

    Returns:
        the path on rank 0, None elsewhere.
    """
    mid_epoch = state.batch > 0
    gathered = all_gather_object((capture_rng_state(), loss_sum.detach().cpu() if mid_epoch else None))
    if not is_main():
        return None
    rng_states = [rng for rng, _ in gathered]
    checkpoint = {
        "MODEL": state.diffusion.state_dict(),
        "EMA": state.ema.state_dict(),
        "opt": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler.is_enabled() else None,
        "epoch": epoch,
        "step": state.step,
        "rng": {"world_size": len(rng_states), "ranks": rng_states},
        "config": state.cfg.to_dict(),
    }
    if mid_epoch:
        checkpoint["batch"] = state.batch
        checkpoint["epoch_loss"] = [loss for _, loss in gathered]
        checkpoint["epoch_seconds"] = time.perf_counter() - state.epoch_started
        checkpoint["settings"] = state.settings
    path = path or checkpoint_path(state.cfg.save_dir, epoch)
    save_checkpoint(checkpoint, path)
    return path


def save_latest_checkpoint(state, clock, loss_sum=None):
    """Write save_dir/ckpts/latest.pth at this step boundary (collective, like save_training_checkpoint)
    and restart ``clock``. ``state.epoch`` and ``state.batch`` say where training stands.

    Returns:
        the path (on every rank).
    """
    path = latest_path(state.cfg.save_dir)
    save_training_checkpoint(state, state.epoch - 1, path, loss_sum)
    clock.saved()
    position = f"epoch {state.epoch}, batch {state.batch}" if state.batch else f"end of epoch {state.epoch - 1}"
    print0(f"checkpoint {path} ({position}, step {state.step})")
    return path


@torch.no_grad()
def save_sample_grid(state, epoch):
    """Sample cfg.n_sample images with the EMA model and save them above as many real training images.

    The starting noise comes from fixed per-image seeds, so grids of different epochs are comparable
    and the global random state (and so training) is untouched.
    """
    cfg = state.cfg
    noise = PerImageNoise(range(cfg.n_sample), state.device)
    with autocast(state.device, state.precision):
        samples = state.ema.ema_model.sample(cfg.n_sample, cfg.image_shape, noise=noise)  # default sampler
    grid = torch.cat([samples.float().clamp(0, 1).cpu(), state.data.first_images(cfg.n_sample)])
    path = os.path.join(cfg.save_dir, "visual", f"image_ep{epoch}_ema.png")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_grid(grid, path, nrow=GRID_ROW)
    except OSError as err:
        raise UserError(f"cannot write {path} ({err.strerror}); choose a writable save_dir") from None
    return path


def find_resume_checkpoint(cfg, args):
    """The checkpoint this run continues from, or None for a fresh run.

    ``--resume`` and ``--resume auto`` take latest.pth or the highest model_{epoch}.pth, whichever got
    further (``utils.checkpoint.resume_checkpoint``); with nothing there, ``auto`` starts fresh.

    Raises:
        UserError: --resume with nothing to resume, a load_epoch without its checkpoint, or a
            fresh run into a save_dir that already holds checkpoints.
    """
    folder = os.path.join(cfg.save_dir, "ckpts")
    if args.resume is True or args.resume == "auto":
        path = resume_checkpoint(cfg.save_dir)
        if path is None and args.resume is True:
            raise UserError(f"--resume: no checkpoint to resume in {folder}; start without --resume, "
                            f"use --resume auto to start fresh when there is none, or pass --resume PATH "
                            f"to a checkpoint file")
        return path
    if args.resume:
        if not os.path.isfile(args.resume):
            raise UserError(f"--resume {args.resume}: file not found; pass a checkpoint such as "
                            f"{checkpoint_path(cfg.save_dir, 0)}, or --resume alone for the latest in save_dir")
        return args.resume
    saved = list_checkpoints(cfg.save_dir)
    if cfg.load_epoch != -1:
        if cfg.load_epoch not in saved:
            found = ", ".join(map(str, saved)) or "none"
            raise UserError(f"{args.config}: key 'load_epoch' is {cfg.load_epoch}, but {folder} has no "
                            f"model_{cfg.load_epoch}.pth (saved epochs: {found}); set load_epoch to one "
                            f"of them or -1")
        return saved[cfg.load_epoch]
    newest = resume_checkpoint(cfg.save_dir)
    if newest is not None:
        raise UserError(f"save_dir {cfg.save_dir} already holds checkpoints (the newest is {newest}); "
                        f"pass --resume to continue that run, or choose another folder with --set save_dir=DIR")
    return None


def checkpoint_epoch(checkpoint, path):
    """The epoch a checkpoint ends: its ``epoch`` entry, else the N of its name model_N.pth."""
    if "epoch" in checkpoint:
        return int(checkpoint["epoch"])
    match = CHECKPOINT_NAME.match(os.path.basename(path))
    if match is None:
        raise UserError(f"{path}: no 'epoch' entry and the name is not model_{{epoch}}.pth; rename it "
                        f"to model_{{epoch}}.pth after the epoch it ends")
    return int(match.group(1))


def load_optimizer_state(optimizer, saved, path):
    # Keep this run's implementation switches (fused, foreach) whatever wrote the checkpoint.
    switches = [{key: group[key] for key in IMPLEMENTATION_KEYS if key in group}
                for group in optimizer.param_groups]
    saved = {"state": saved["state"],
             "param_groups": [{**group, **switch} for group, switch in zip(saved["param_groups"], switches)]}
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError, RuntimeError) as err:
        raise UserError(f"{path}: its optimizer state does not fit this model ({describe_error(err)}); "
                        f"check --config") from None


def restore_training(state, checkpoint, path):
    """Load a checkpoint (ours or the original code's) into ``state`` so that training continues exactly.

    Restores the weights, EMA, optimizer, scaler, counters and this rank's RNG state, as far as the
    checkpoint holds them.

    Raises:
        UserError: the checkpoint belongs to another network or is not a training checkpoint.
    """
    load_weights(state.diffusion, path, weights="online", checkpoint=checkpoint)
    if "EMA" in checkpoint:
        try:
            state.ema.load_state_dict(checkpoint["EMA"])
        except (RuntimeError, KeyError) as err:
            raise UserError(f"{path}: its EMA entry does not fit the config's network "
                            f"({describe_error(err)}); check --config") from None
    else:
        state.ema.ema_model.load_state_dict(state.diffusion.state_dict())
    state.ema_updater = SyncFreeEMA(state.ema)
    if "opt" in checkpoint:
        load_optimizer_state(state.optimizer, checkpoint["opt"], path)
    if checkpoint.get("scaler") and state.scaler.is_enabled():
        state.scaler.load_state_dict(checkpoint["scaler"])
    state.epoch = checkpoint_epoch(checkpoint, path) + 1
    state.step = int(checkpoint.get("step", state.ema_updater.step))  # the original counted EMA updates only
    rank = get_rank()
    state.batch = int(checkpoint.get("batch", 0))
    if state.batch:
        saved_by = len(checkpoint["epoch_loss"])
        if saved_by != get_world_size() or state.batch >= len(state.data):
            raise UserError(f"{path} stopped after batch {state.batch} of epoch {state.epoch}, written by "
                            f"{saved_by} process(es); a mid-epoch checkpoint continues only with the same "
                            f"processes, batch_size, --accum and --drop_last (here {get_world_size()} "
                            f"process(es), {len(state.data)} batches per epoch); resume from a "
                            f"model_{{epoch}}.pth instead")
        state.epoch_loss = checkpoint["epoch_loss"][rank]
        state.epoch_seconds = checkpoint.get("epoch_seconds")
    rng = checkpoint.get("rng")
    if rng is not None:
        if rank < len(rng["ranks"]):
            restore_rng_state(rng["ranks"][rank])
        else:
            print(f"note: rank {rank} has no saved random state in {path} (saved by {len(rng['ranks'])} "
                  f"processes); it continues from seed {state.cfg.seed + rank}", flush=True)


def start_run_folder(state):
    """Create save_dir, write config.yaml, and rewrite log.jsonl keeping only the epochs before ``state.epoch``.

    Returns:
        the path of log.jsonl.
    """
    cfg = state.cfg
    log_path = os.path.join(cfg.save_dir, "log.jsonl")
    try:
        os.makedirs(cfg.save_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.save_dir, "config.yaml"))
        # Epochs after the checkpoint are trained again: drop their old lines.
        kept = [r for r in read_jsonl(log_path) if r.get("epoch", 0) < state.epoch] \
            if state.epoch and os.path.isfile(log_path) else []
        with atomic_path(log_path) as temporary, JsonlLogger(temporary) as rewritten:
            for record in kept:
                rewritten.log(record)
    except OSError as err:
        raise UserError(f"cannot write into save_dir {cfg.save_dir} ({err.strerror}); choose a writable "
                        f"folder with --set save_dir=DIR") from None
    return log_path


def epoch_line(record, n_epoch, seconds_left):
    """The plain status line of a finished epoch, for logs that are files."""
    loss = "n/a" if record["loss"] is None else f"{record['loss']:.4f}"
    return (f"epoch {record['epoch']}/{n_epoch}  step {record['step']}  loss {loss}  lr {record['lr']:.2e}  "
            f"{record['img_per_s']:.0f} img/s  peak {record['peak_mem_gib']:.2f} GiB  {record['seconds']:.1f} s  "
            f"{format_duration(seconds_left)} left")


def done_line(state, first_epoch, record, seconds):
    """The summary of a run that ended (not stopped): the epochs it trained, a last one cut short by
    --max_steps, the step, the last loss and the time."""
    cfg = state.cfg
    if record is None:
        trained = "no epoch trained"
    else:
        last = record["epoch"]
        trained = f"epoch {last}" if last == first_epoch else f"epochs {first_epoch}..{last}"
        trained += f" of {cfg.n_epoch}"
        if record["steps"] < len(state.data):
            trained += f" (epoch {last} cut short by --max_steps after {record['steps']} of {len(state.data)} steps)"
    loss = "n/a" if record is None or record["loss"] is None else f"{record['loss']:.4f}"
    return (f"done: {trained}, step {state.step}, last loss {loss}, {format_duration(seconds)}; "
            f"run folder {cfg.save_dir}")


def end_of_interval(state, epoch, log_path, board):
    """Checkpoint (every rank takes part), then on rank 0 the sample grid and the loss curve.

    Returns:
        the checkpoint's path on every rank, None when save_model is off.
    """
    cfg = state.cfg
    path = None
    if cfg.save_model:
        save_training_checkpoint(state, epoch)
        path = checkpoint_path(cfg.save_dir, epoch)
        print0(f"checkpoint {path} (epoch {epoch}, step {state.step})")
    if is_main():
        grid = save_sample_grid(state, epoch)
        print0(f"sample grid {grid}")
        board.image_file("samples_ema", grid, state.step)
        plot_curves(read_jsonl(log_path), "epoch", "loss", os.path.join(cfg.save_dir, "loss.png"),
                    title=f"training loss ({os.path.basename(os.path.normpath(cfg.save_dir))})")
    return path


def train(cfg, args):
    """Train ``cfg``'s model as ``args`` ask, from scratch or from a checkpoint.

    SIGTERM and SIGUSR1 stop it at the next step boundary that every rank agrees on, after writing
    latest.pth; ``state.stopped`` then names the signal and ``state.stop_path`` the checkpoint.

    Returns:
        the final TrainState.
    """
    check_args(args)
    device = init_distributed(args.device)
    resume_path = find_resume_checkpoint(cfg, args)
    checkpoint = load_checkpoint(resume_path) if resume_path else None
    if checkpoint is not None:
        check_mid_epoch_settings(checkpoint, resume_path, epoch_settings(cfg, args, get_world_size()))
    check_writable(cfg.save_dir, "save_dir", "choose another folder with --set save_dir=DIR")
    board = open_board(args.tensorboard, os.path.join(cfg.save_dir, "tb", "train"))  # a missing package fails here
    state = build_training(cfg, args, device)
    if checkpoint is not None:
        restore_training(state, checkpoint, resume_path)
        del checkpoint
        if state.epoch >= cfg.n_epoch:
            if args.resume == "auto":  # a restart after the run ended: nothing to do, and no error
                print0(f"{resume_path} ends epoch {state.epoch - 1}, the last of n_epoch {cfg.n_epoch}: "
                       f"the run is complete")
                return state
            raise UserError(f"{resume_path} ends epoch {state.epoch - 1}, the last of n_epoch {cfg.n_epoch}: "
                            f"nothing to train; raise n_epoch (--set n_epoch=N) to continue")
        position = f", batch {state.batch} of {len(state.data)}" if state.batch else ""
        print0(f"resuming from {resume_path}: epoch {state.epoch}{position}, step {state.step}")
    if is_main():
        remove_stale_temporaries(cfg.save_dir)  # left by writes that a kill -9 cut short
    log_path = start_run_folder(state) if is_main() else None
    loop = EpochLoop(cfg.n_epoch, device, board=board, prefix="train/", log_path=log_path)
    plain = not is_interactive()
    print0(f"training {cfg.model_type} on {cfg.dataset}: {get_world_size()} process(es) on {device.type}, "
           f"{len(state.data)} steps of {state.data.batch_size} images per process and epoch "
           f"({describe_last_batch(state.data)}), lr {state.base_lr:g}, {state.precision}")
    first_epoch, started, record = state.epoch, time.perf_counter(), None
    # Epochs this run trains, for the time left: a resumed epoch counts only its remaining part.
    resumed_part = state.batch / len(state.data)
    signals = StopSignals()
    clock = CheckpointClock(args.ckpt_every_min, signals, device)
    try:
        with signals:
            for epoch in range(state.epoch, cfg.n_epoch):
                if args.max_steps is not None and state.step >= args.max_steps:
                    break
                record = train_one_epoch(state, epoch, args.max_steps, clock)
                if record is None:  # stopped mid-epoch, saved in latest.pth
                    state.stop_path = latest_path(cfg.save_dir)
                    break
                line = None
                if plain:  # the time left counts the checkpoints and grids of the epochs so far
                    per_epoch = (time.perf_counter() - started) / (epoch + 1 - first_epoch - resumed_part)
                    line = epoch_line(record, cfg.n_epoch, per_epoch * (cfg.n_epoch - epoch - 1))
                scalars = {key: record[key] for key in ("loss", "lr", "img_per_s", "peak_mem_gib")}
                loop.log(record["step"], line, scalars, record)
                if record["steps"] < len(state.data):
                    break  # cut short by --max_steps
                state.epoch = epoch + 1
                saved = None
                if epoch % cfg.ckpt_interval == 0 or epoch == cfg.n_epoch - 1:
                    saved = end_of_interval(state, epoch, log_path, board)
                    if saved:
                        clock.saved()
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
    if state.stopped:
        exit_stopped(stop_line(state.stopped, state.stop_path, "run the same command with --resume auto (or "
                                                               "--resume) to continue"), rank=get_rank())


if __name__ == "__main__":
    main(parse_args())
