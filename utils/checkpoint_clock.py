"""When to write save_dir/ckpts/latest.pth and when to stop: one decision shared by every rank.

Rank 0's clock says when ``every_min`` minutes have passed since the last save; any rank may have
received a stop signal (``utils.preemption.StopSignals``). A save or a stop must happen at the same
step on every rank, as both involve collectives, so the ranks agree through one small all-reduce
every ``POLL_EVERY`` steps. On CUDA that all-reduce is only read back at the next poll, once it has
long finished: the host never waits for the queued steps, and a decision takes effect at most
2 x POLL_EVERY steps after the clock or the signal. A single process decides at every step, for free.
"""
import time

import torch
import torch.distributed as dist

from utils import preemption
from utils.distributed import get_world_size, is_main

POLL_EVERY = 10  # steps between two agreements when several processes run
OTHER_RANK = "a signal to another process"  # the stop's cause on a rank that received no signal itself


class CheckpointClock:
    """Call ``after_step()`` at every step boundary on every rank; then ``save_due`` says whether to
    write latest.pth now and ``stop_due`` whether to stop after that save (the same on every rank).
    Call ``saved()`` after every checkpoint write, which restarts the clock.

    Args:
        every_min: minutes between two time checkpoints (fractions allowed); 0 or None: never.
        signals: a ``StopSignals`` (or anything with a ``requested`` attribute).
        device: the device of the collectives (the process group's: CUDA for NCCL).
    """

    def __init__(self, every_min, signals, device):
        self.interval = every_min * 60 if every_min else None
        self.signals = signals
        self.device = torch.device(device)
        self.world_size = get_world_size()
        self.last_save = time.monotonic()
        self.save_due = False
        self.stop_due = False
        self._steps = 0
        self._pending = None  # CUDA: (pinned host flags, event) of the all-reduce launched at the last poll

    def _local_flags(self):
        due = self.interval is not None and is_main() and time.monotonic() - self.last_save >= self.interval
        return float(due), float(self.signals.requested is not None)

    def _decide(self, flags):
        due, stop = flags
        self.stop_due = bool(stop)
        self.save_due = bool(due) or self.stop_due

    def after_step(self):
        if self.save_due:
            return  # a decision the caller has not acted on yet (it waits for the epoch's end)
        if self.world_size == 1 or not dist.is_initialized():
            self._decide(self._local_flags())
            return
        self._steps += 1
        if self._steps % POLL_EVERY:
            return
        if self.device.type != "cuda":  # gloo: the host does the all-reduce anyway
            flags = torch.tensor(self._local_flags())
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            self._decide(flags.tolist())
            return
        if self._pending is not None:
            host, event = self._pending
            self._pending = None
            event.synchronize()  # launched POLL_EVERY steps ago: done by now
            self._decide(host.tolist())
            if self.save_due:
                return  # poll afresh after the save, with the clock restarted
        flags = torch.zeros(2, device=self.device)
        for index, value in enumerate(self._local_flags()):
            flags[index].fill_(value)  # a kernel argument: no copy from host memory, no wait
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        host = torch.empty(2, pin_memory=True)
        host.copy_(flags, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending = (host, event)

    def saved(self):
        """A checkpoint was written: restart the clock and clear the save decision."""
        self.last_save = time.monotonic()
        self.save_due = False


def agree_to_stop(device):
    """Whether to stop now, the same answer on every rank: the name of the signal that this process's
    ``StopSignals`` received, a placeholder when only another rank received one, or None.

    A collective (one all-reduce and one host sync): call it at epoch boundaries, on every rank.
    """
    mine = preemption.requested()
    if get_world_size() == 1 or not dist.is_initialized():
        return mine
    flag = torch.full((1,), float(mine is not None), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        return mine or OTHER_RANK
    return None
