"""The bookkeeping around an epoch loop, in one place: resume, the per-epoch state, the log, the agreed stop.

The calls, in the order a loop makes them: docs/DESIGN.md's helpers table (linear.py is a short example).
Each script keeps what differs: what it trains, what it records and what its state file holds.
A stop needs the signals installed (``utils.preemption.StopSignals`` around ``main``); the ranks agree
on it at the end of the epoch (``utils.checkpoint_clock.agree_to_stop``), so none waits in a collective.
"""
import os
import resource
import time

import torch

from utils.atomic import atomic_path
from utils.checkpoint import (capture_rng_state, load_checkpoint, remove_stale_temporaries, restore_rng_state,
                              save_checkpoint)
from utils.checkpoint_clock import agree_to_stop
from utils.config import save_config
from utils.data import epoch_seed, set_loader_epoch
from utils.distributed import all_gather_object, all_reduce_sum, barrier, get_rank, get_world_size, is_main, print0
from utils.errors import UserError
from utils.logging import JsonlLogger, read_jsonl
from utils.preemption import exit_stopped
from utils.progress import LazyText, format_duration, progress
from utils.provenance import check_same_weights
from utils.tensorboard import Board

PROGRESS_EVERY = 50  # steps between progress-bar refreshes, the only host syncs inside an epoch (on a terminal)


def stop_line(signal, path, how, position=""):
    """The last line of a run stopped on ``signal`` after saving ``path`` (at ``position``, e.g.
    " after epoch 3 of 15"); ``how`` tells how to continue. ``utils.preemption.exit_stopped`` prints it
    with the exit code."""
    return f"stopped on {signal}: saved {path}{position}; {how}"


def every_rank_rng():
    """Every process's random state (``capture_rng_state``), ordered by rank: a collective."""
    return all_gather_object(capture_rng_state())


class EpochTotals:
    """This process's sums over one epoch's training batches, kept on the device: the loop never waits
    for the GPU until ``reduce``."""

    def __init__(self, device):
        self.device = device
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.images = 0

    def add(self, loss, logits, labels):
        """One batch: its mean ``loss`` (0-dim), ``logits`` (B, classes) and ``labels`` (B,)."""
        self.loss += loss.detach() * labels.shape[0]
        self.correct += (logits.detach().argmax(dim=1) == labels).sum()
        self.images += labels.shape[0]

    def reduce(self):
        """(mean loss, accuracy in %, images) over every process: a collective, and one host sync."""
        totals = all_reduce_sum(torch.stack([self.loss.double(), self.correct.double(),
                                             torch.tensor(float(self.images), dtype=torch.float64,
                                                          device=self.device)])).cpu()
        return (totals[0] / totals[2]).item(), (100 * totals[1] / totals[2]).item(), int(totals[2])


def check_saved_run(path, saved, settings, mismatch, keys=None, lenient=False, recorded=None, weights=None,
                    fix="delete it to start over"):
    """Refuse the saved run at ``path`` (a resume state, or a finished run's record) unless it is one of this
    run: the same weights (when ``weights``, a ``utils.provenance.weights_identity``, is given: ``recorded`` is
    the file's) and the same ``settings`` as the file's ``saved`` ones.

    Args:
        mismatch: the error when a setting differs, formatted with path, key, saved and wanted.
        keys: the settings to compare (default: all of ``settings``).
        lenient: skip the keys the file lacks (files written before they existed).
        fix: ends the error when the weights differ.
    """
    if weights is not None:
        check_same_weights(path, recorded, weights, fix)
    for key in settings if keys is None else keys:
        if (key in saved or not lenient) and saved.get(key) != settings[key]:
            raise UserError(mismatch.format(path=path, key=key, saved=saved.get(key), wanted=settings[key]))


class EpochLoop:
    """Resume, per-epoch state, log and stop of a loop over epochs (see the module docstring).

    Args:
        n_epoch: epochs of the whole run.
        device: this process's device (the stop agreement's collective runs there).
        board: a ``utils.tensorboard.Board`` for the scalars (closed by its owner, not here).
        prefix: of the scalars' tags, e.g. "linear/".
        log_path: log.jsonl, appended to by the main process; None: no JSON log.
        how: what continues a stopped run, e.g. "the same command with --resume continues it".
        what: what the saved state is, for a failed write's message, e.g. "probe state".
    """

    def __init__(self, n_epoch, device, board=None, prefix="", log_path=None, how="the same command continues it",
                 what="checkpoint"):
        self.n_epoch = n_epoch
        self.device = device
        self.board = board or Board()
        self.prefix = prefix
        self.how = how
        self.what = what
        self.logger = JsonlLogger(log_path) if log_path is not None and is_main() else None
        self.started = None

    def resume(self, path, settings, mismatch, keys=None, lenient=False, done=lambda state: state["epoch"],
               weights=None, fix="delete it to start over"):
        """The saved state at ``path`` (None when there is none), checked against this run's ``settings``
        and ``weights``. Restores this rank's random state when the file holds every rank's (``"rng"``).

        Args:
            mismatch, keys, lenient, fix: as for ``check_saved_run``.
            done: the epochs finished according to the state, for the "resuming" line.
            weights: the evaluated model's ``utils.provenance.weights_identity``, which the state must
                record under ``"weights"`` (``save`` it there).
        """
        if path is None or not os.path.isfile(path):
            return None
        state = load_checkpoint(path)
        check_saved_run(path, state.get("settings", {}), settings, mismatch, keys, lenient,
                        state.get("weights"), weights, fix)
        if "rng" in state:
            restore_rng_state(state["rng"][get_rank()])
        print0(f"resuming {path}: {done(state)} of {self.n_epoch} epochs done")
        return state

    def epochs(self, start, loader=None, seed=None):
        """Yield the epochs from ``start`` on. Before each: start its timer, tell ``loader`` (the training
        loader) which epoch starts, and with ``seed`` seed torch's generator from (seed, epoch, rank), so a
        resumed epoch draws what the uninterrupted one drew."""
        for epoch in range(start, self.n_epoch):
            self.started = time.perf_counter()
            if seed is not None:
                torch.manual_seed(epoch_seed(seed, epoch, get_rank()))
            if loader is not None:
                set_loader_epoch(loader, epoch)
            yield epoch

    @property
    def seconds(self):
        """Seconds since the current epoch started."""
        return time.perf_counter() - self.started

    def log(self, step, line=None, scalars=None, record=None):
        """The epoch's numbers: ``line`` printed by the main process, ``record`` appended to log.jsonl,
        ``scalars`` to the board at ``step`` (the epoch count, or the optimizer step)."""
        if line is not None:
            print0(line)
        if record is not None and self.logger is not None:
            self.logger.log(record)
        if scalars:
            self.board.scalars(scalars, step, prefix=self.prefix)

    def save(self, path, state):
        """Write ``state`` to ``path`` atomically on the main process; every process waits for it. Every process
        builds ``state`` (state dicts only hold references), so an ``every_rank_rng()`` in it runs on all."""
        if is_main():
            save_checkpoint(state, path, self.what)
        barrier()

    def stop_if_asked(self, epoch, path):
        """After epoch ``epoch``'s state is saved at ``path``: on SIGTERM / SIGUSR1 to any rank, every rank
        says so and exits with ``EXIT_REQUEUE`` (75), unless that was the last epoch. A collective."""
        stopped = agree_to_stop(self.device)
        if stopped and epoch + 1 < self.n_epoch:
            self.close()
            exit_stopped(stop_line(stopped, path, self.how, f" after epoch {epoch + 1} of {self.n_epoch}"),
                         rank=get_rank())

    def close(self):
        """Close log.jsonl (the board belongs to the caller)."""
        if self.logger is not None:
            self.logger.close()
            self.logger = None


def peak_memory_gib(device):
    """Peak memory of this process: CUDA memory allocated on ``device``, else the peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class EpochMeter:
    """One training epoch's numbers, kept on the device: the bar (on a terminal; a line every few minutes in a
    log file), the loss sum and the pace; ``finish`` gives the epoch's log record.

    Args:
        epoch, n_epoch, lr: for the bar and the record.
        steps, batch_size: the epoch's steps and a full step's images, on this process.
        done: steps trained before a mid-epoch resume, with ``loss`` their loss sum on this process (0-dim)
            and ``seconds`` their time (None for files without it: estimated at this part's pace).
    """

    def __init__(self, epoch, n_epoch, steps, batch_size, lr, device, done=0, loss=None, seconds=None):
        self.epoch, self.batch_size, self.lr, self.device = epoch, batch_size, lr, device
        self.world_size = get_world_size()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # A bar on a terminal; in a log file only a line every few minutes, the epoch's line comes after it.
        self.bar = progress(total=steps, initial=done, desc=f"epoch {epoch}/{n_epoch}", unit="step",
                            disable=not is_main(), every_percent=None, final_line=False, dynamic_ncols=True)
        self.loss_sum = torch.zeros((), device=device)
        if done:  # the batches trained before the resume count in the epoch's loss
            self.loss_sum += loss.to(device)
        self.recent_loss = torch.zeros((), device=device)
        self.first = self.steps = done
        self.images, self.resumed_seconds = 0, seconds
        self.start = time.perf_counter()
        self.started = self.start - (seconds or 0.0)  # the epoch's start, its part before a resume included

    @property
    def seconds(self):
        """Seconds of the epoch so far, its part before a resume included."""
        return time.perf_counter() - self.started

    def update(self, loss, images):
        """After a step on ``images`` images of this process, with mean loss ``loss`` (0-dim, on the device)."""
        self.loss_sum += loss
        self.recent_loss += loss
        self.steps += 1
        self.images += images * self.world_size  # shards are padded to equal length
        self.bar.update()
        if self.steps % PROGRESS_EVERY == 0 and not self.bar.disable:
            rate = self.images / (time.perf_counter() - self.start)
            # Read on a terminal now; in a log file only if a line is written before the next refresh.
            mean = self.recent_loss / PROGRESS_EVERY
            self.bar.set_postfix(loss=LazyText(mean.item, ".4f"), img_s=f"{rate:.0f}")
            self.recent_loss = torch.zeros((), device=self.device)

    def finish(self, step):
        """Close the bar; return the record: epoch, step (``step``), steps, loss (mean over steps and ranks),
        lr, img_per_s (all ranks), peak_mem_gib, seconds. A collective, the epoch's one."""
        loss_total, step_total = all_reduce_sum(torch.stack([self.loss_sum,
                                                             self.loss_sum.new_tensor(float(self.steps))])).tolist()
        now = time.perf_counter()
        seconds = now - self.started
        if self.first and self.resumed_seconds is None and self.steps > self.first:  # at this part's pace
            seconds = (now - self.start) * self.steps / (self.steps - self.first)
        images = self.images + self.first * self.batch_size * self.world_size  # skipped: never the short last one
        record = {"epoch": self.epoch, "step": step, "steps": self.steps,
                  "loss": loss_total / step_total if step_total else None, "lr": self.lr,
                  "img_per_s": round(images / seconds, 1), "peak_mem_gib": round(peak_memory_gib(self.device), 3),
                  "seconds": round(seconds, 2)}
        if self.steps:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.0f}")
        self.bar.close()
        return record


def epoch_line(record, n_epoch, started, first):
    """The plain status line of a finished epoch, for logs that are files. The time left is at the pace
    since ``started`` (``time.perf_counter()``) of the epochs trained since ``first`` (a fraction after
    a mid-epoch resume), their checkpoints and grids included."""
    per_epoch = (time.perf_counter() - started) / (record["epoch"] + 1 - first)
    seconds_left = per_epoch * (n_epoch - record["epoch"] - 1)
    loss = "n/a" if record["loss"] is None else f"{record['loss']:.4f}"
    return (f"epoch {record['epoch']}/{n_epoch}  step {record['step']}  loss {loss}  lr {record['lr']:.2e}  "
            f"{record['img_per_s']:.0f} img/s  peak {record['peak_mem_gib']:.2f} GiB  {record['seconds']:.1f} s  "
            f"{format_duration(seconds_left)} left")


def start_run_folder(cfg, epoch):
    """On the main process: delete the temporaries that a kill -9 left in save_dir/ckpts, write config.yaml
    and rewrite log.jsonl keeping only the epochs before ``epoch`` (the later ones are trained again).
    Returns the path of log.jsonl there, None on the other processes."""
    if not is_main():
        return None
    remove_stale_temporaries(cfg.save_dir)
    log_path = os.path.join(cfg.save_dir, "log.jsonl")
    try:
        os.makedirs(cfg.save_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.save_dir, "config.yaml"))
        kept = [r for r in read_jsonl(log_path) if r.get("epoch", 0) < epoch] \
            if epoch and os.path.isfile(log_path) else []
        with atomic_path(log_path) as temporary, JsonlLogger(temporary) as rewritten:
            for record in kept:
                rewritten.log(record)
    except OSError as err:
        raise UserError(f"cannot write into save_dir {cfg.save_dir} ({err.strerror}); choose a writable "
                        f"folder with --set save_dir=DIR") from None
    return log_path
