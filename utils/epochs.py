"""The bookkeeping around an epoch loop, in one place: resume, the per-epoch state, the log, the agreed stop.

    loop = EpochLoop(n_epoch, device, board=board, prefix="finetune/", log_path=None,
                     how="the same command with --resume continues it")
    state = loop.resume(state_path, settings, "{path} was trained with {key}={saved!r}, not {wanted!r}; ...")
    for epoch in loop.epochs(start, train_loader, seed=seed):   # timer, loader epoch, per-epoch seed
        totals = EpochTotals(device)
        ...train, calling totals.add(loss, logits, labels) per batch...
        loss, accuracy, images = totals.reduce()
        loop.log(epoch + 1, f"epoch {epoch + 1}/{n_epoch} ...", scalars={"loss": loss}, record={...})
        loop.save(state_path, {"epoch": epoch + 1, ...})       # rank 0 writes atomically; every rank waits
        loop.stop_if_asked(epoch, state_path)                   # SIGTERM / SIGUSR1: exit 75 on every rank
    loop.close()

Each script keeps what differs: what it trains, what it records and what its state file holds.
A stop needs the signals installed (``utils.preemption.StopSignals`` around ``main``); the ranks agree
on it at the end of the epoch (``utils.checkpoint_clock.agree_to_stop``), so none waits in a collective.
"""
import os
import time

import torch

from utils.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from utils.checkpoint_clock import agree_to_stop
from utils.data import epoch_seed, set_loader_epoch
from utils.distributed import all_gather_object, all_reduce_sum, barrier, get_rank, is_main, print0
from utils.errors import UserError
from utils.logging import JsonlLogger
from utils.preemption import exit_stopped
from utils.tensorboard import Board


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
    for the GPU until ``reduce``.

    Args:
        device: where the batches' losses and logits live.
    """

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


class EpochLoop:
    """Resume, per-epoch state, log and stop of a loop over epochs (see the module docstring).

    Args:
        n_epoch: epochs of the whole run.
        device: this process's device (the stop agreement's collective runs there).
        board: a ``utils.tensorboard.Board`` for the scalars (closed by its owner, not here).
        prefix: of the scalars' tags, e.g. "linear/".
        log_path: log.jsonl, appended to by the main process; None: no JSON log.
        how: what continues a stopped run, e.g. "the same command with --resume continues it".
    """

    def __init__(self, n_epoch, device, board=None, prefix="", log_path=None, how="the same command continues it"):
        self.n_epoch = n_epoch
        self.device = device
        self.board = board or Board()
        self.prefix = prefix
        self.how = how
        self.logger = JsonlLogger(log_path) if log_path is not None and is_main() else None
        self.started = None

    def resume(self, path, settings, mismatch, keys=None, lenient=False, done=lambda state: state["epoch"]):
        """The saved state at ``path`` (None when there is none), checked against this run's ``settings``.
        Restores this rank's random state when the file holds every rank's (``"rng"``).

        Args:
            mismatch: the error when a setting differs, formatted with path, key, saved and wanted.
            keys: the settings to compare (default: all of ``settings``).
            lenient: skip the keys the file lacks (files written before they existed).
            done: the epochs finished according to the state, for the "resuming" line.

        Raises:
            UserError: the state was written with other settings (``mismatch``).
        """
        if path is None or not os.path.isfile(path):
            return None
        state = load_checkpoint(path)
        saved = state.get("settings", {})
        for key in settings if keys is None else keys:
            if (key in saved or not lenient) and saved.get(key) != settings[key]:
                raise UserError(mismatch.format(path=path, key=key, saved=saved.get(key), wanted=settings[key]))
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
        """Write ``state`` to ``path`` atomically on the main process; every process waits for it.

        Every process builds ``state`` (state dicts only hold references), so an ``every_rank_rng()``
        in it, a collective, runs on all of them.
        """
        if is_main():
            save_checkpoint(state, path)
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
