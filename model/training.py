"""The run bookkeeping below train.py's loop, each piece one call there: the training state, its
checkpoints and resume, each epoch's start, the sample grids, the closing line. The step stays in train.py.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from model.amp import autocast, make_grad_scaler
from model.ema import SyncFreeEMA, make_ema
from model.models import build_diffusion, load_weights
from model.noise import PerImageNoise
from model.speed import compile_module
from utils.checkpoint import (capture_rng_state, checkpoint_epoch, checkpoint_path, epoch_settings, latest_path,
                              restore_rng_state, save_checkpoint, seed_everything)
from utils.data import TrainData
from utils.distributed import all_gather_object, get_rank, get_world_size, is_main, print0, wrap_ddp
from utils.epochs import EpochMeter
from utils.errors import UserError, describe_error
from utils.images import save_grid
from utils.logging import plot_curves, read_jsonl
from utils.progress import format_duration

GRID_ROW = 10
OPTIMIZERS = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}
# Optimizer-group entries that choose an implementation, not the maths: this run's choice wins on resume.
IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")


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
    stopped: str = None             # the signal that stopped the run, if one did
    stop_path: str = None           # the checkpoint written before that stop

    @property
    def settings(self):
        """``epoch_settings``: what decides the epoch's batches."""
        return epoch_settings(get_world_size(), self.cfg.batch_size, self.accum, self.data.drop_last)


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


def new_training_state(cfg, data, device, precision, accum=1, compile_mode=None, channels_last=False):
    """The model, DDP wrapper, optimizer, scaler and EMA of a fresh run on ``data`` (a TrainData), the
    TrainState fields of the same names otherwise. The model is initialised from seed ``cfg.seed + rank``;
    under DDP every rank then holds rank 0's weights. Call after ``init_distributed`` under a launcher."""
    world_size = get_world_size()
    seed_everything(cfg.seed + get_rank())
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    diffusion = build_diffusion(cfg).to(device, memory_format=memory_format)
    model = diffusion
    if dist.is_initialized() and world_size > 1:
        # The diffusion buffers are constant schedules: no need to broadcast them every step.
        model = wrap_ddp(diffusion, device, sync_buffers=False)
    ema = make_ema(diffusion, cfg.ema)  # after DDP, so that it starts from rank 0's weights
    ema.ema_model.eval()
    if compile_mode:
        compile_module(diffusion.nn_model, compile_mode)  # in place: names and the EMA copy stay as they are
    base_lr = cfg.lrate * world_size * accum
    return TrainState(cfg=cfg, device=device, precision=precision, diffusion=diffusion, model=model,
                      optimizer=make_optimizer(cfg, diffusion.parameters(), base_lr, device),
                      scaler=make_grad_scaler(device, precision), ema=ema, ema_updater=SyncFreeEMA(ema),
                      data=data, base_lr=base_lr, accum=accum, compile_mode=compile_mode)


def start_epoch(state, epoch):
    """Set epoch ``epoch``'s learning rate (warmed up linearly over warm_epoch epochs) and return its
    ``EpochMeter``, which carries the batches trained before a mid-epoch resume."""
    cfg = state.cfg
    lr = state.base_lr * min((epoch + 1) / cfg.warm_epoch, 1.0)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    meter = EpochMeter(epoch, cfg.n_epoch, len(state.data), state.data.batch_size, lr, state.device,
                       done=state.batch, loss=state.epoch_loss, seconds=state.epoch_seconds)
    state.epoch_loss = state.epoch_seconds = None
    return meter


def save_training_checkpoint(state, epoch, path=None, meter=None):
    """Write save_dir/ckpts/model_{epoch}.pth (or ``path``) atomically (the DESIGN.md layout).

    ``epoch`` is the last finished epoch; mid-epoch (``state.batch`` > 0) the file also holds the entries
    the layout lists, ``epoch_loss`` and ``epoch_seconds`` from ``meter`` (the running epoch's EpochMeter).

    Collective: every rank must call it, as each contributes its RNG state; rank 0 writes.
    Returns the path.
    """
    mid_epoch = state.batch > 0
    path = path or checkpoint_path(state.cfg.save_dir, epoch)
    gathered = all_gather_object((capture_rng_state(), meter.loss_sum.detach().cpu() if mid_epoch else None))
    if not is_main():
        return path
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
        checkpoint["epoch_seconds"] = meter.seconds
        checkpoint["settings"] = state.settings
    save_checkpoint(checkpoint, path)
    return path


def save_latest_checkpoint(state, clock, meter=None):
    """Write save_dir/ckpts/latest.pth at this step boundary (collective, like save_training_checkpoint)
    and restart ``clock``. ``state.epoch`` and ``state.batch`` say where training stands; mid-epoch,
    ``meter`` is the running epoch's EpochMeter. Returns the path (on every rank)."""
    path = save_training_checkpoint(state, state.epoch - 1, latest_path(state.cfg.save_dir), meter)
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
    """
    load_weights(state.diffusion, path, weights="online", checkpoint=checkpoint,
                 origin=getattr(state.cfg, "origin", None), resume=True)
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
    if state.batch:  # check_mid_epoch_settings has compared the processes, batch_size, --accum, --drop_last
        if state.batch >= len(state.data):  # the same settings, another training set
            raise UserError(f"{path} stopped after batch {state.batch} of epoch {state.epoch}, but an epoch has "
                            f"{len(state.data)} batches here; resume from a model_{{epoch}}.pth instead")
        state.epoch_loss = checkpoint["epoch_loss"][rank]
        state.epoch_seconds = checkpoint.get("epoch_seconds")
    rng = checkpoint.get("rng")
    if rng is not None:
        if rank < len(rng["ranks"]):
            restore_rng_state(rng["ranks"][rank])
        else:
            print(f"note: rank {rank} has no saved random state in {path} (saved by {len(rng['ranks'])} "
                  f"processes); it continues from seed {state.cfg.seed + rank}", flush=True)


def run_is_complete(cfg, checkpoint, path, auto):
    """Whether ``checkpoint`` (at ``path``) ended the run's last epoch (ask before building anything): fine with
    ``auto`` (``--resume auto`` restarting a finished run), else a UserError, as there is nothing to train."""
    epoch = checkpoint_epoch(checkpoint, path)
    ends = f"{path} ends epoch {epoch}, the last of n_epoch {cfg.n_epoch}"
    if epoch + 1 >= cfg.n_epoch and not auto:
        raise UserError(f"{ends}: nothing to train; raise n_epoch (--set n_epoch=N) to continue")
    if epoch + 1 >= cfg.n_epoch:
        print0(f"{ends}: the run is complete")
    return epoch + 1 >= cfg.n_epoch


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


def end_of_interval(state, epoch, log_path, board, clock):
    """Checkpoint (every rank takes part; it restarts ``clock``), then on rank 0 the sample grid and the
    loss curve. Returns the checkpoint's path on every rank, None when save_model is off."""
    cfg = state.cfg
    path = None
    if cfg.save_model:
        path = save_training_checkpoint(state, epoch)
        print0(f"checkpoint {path} (epoch {epoch}, step {state.step})")
    if is_main():
        grid = save_sample_grid(state, epoch)
        print0(f"sample grid {grid}")
        board.image_file("samples_ema", grid, state.step)
        plot_curves(read_jsonl(log_path), "epoch", "loss", os.path.join(cfg.save_dir, "loss.png"),
                    title=f"training loss ({os.path.basename(os.path.normpath(cfg.save_dir))})")
    if path:
        clock.saved()
    return path
