"""Processes and devices: one place for torchrun's environment and the collective helpers.

Run a script on one device with ``python train.py ...`` or on N GPUs with
``torchrun --nproc_per_node=N train.py ...`` (``python -m torch.distributed.launch`` works too).
A plain ``python`` run is world size 1 and starts no process group; every helper here works
before ``init_distributed``, without it, and after ``cleanup``.
"""
import argparse
import contextlib
import inspect
import os

import torch
import torch.distributed as dist

from utils.errors import UserError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def _launched():
    """True when a launcher (torchrun, torch.distributed.launch) started this process."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def _env_int(name, default):
    value = os.environ.get(name, "")
    try:
        return int(value) if value != "" else default
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} must be an integer; "
                        f"unset it or launch with torchrun") from None


def _initialized():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    """Global rank of this process (0 when not distributed)."""
    return dist.get_rank() if _initialized() else _env_int("RANK", 0)


def get_local_rank():
    """Rank of this process on its machine, which picks its GPU (0 when not distributed)."""
    return _env_int("LOCAL_RANK", 0)


def usable_cpus():
    """The CPUs this process may use (its affinity; the machine's count where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@contextlib.contextmanager
def torchrun_cpu_threads(device):
    """On a CPU ``device``, run the block with the intra-op threads torchrun gives each worker: OMP_NUM_THREADS,
    else 1 (torch's count is restored after); other devices are left as they are.

    A CPU matmul's rounding depends on the number of threads that split it (a (10, 32) GEMM of the demo
    UNet's time embedding differed by 1.2e-7 between 1 and 2 threads: one pixel of one image in the end),
    so a script that promises the same bytes under ``python`` and ``torchrun`` (sample.py) runs in this.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    threads, before = _env_int("OMP_NUM_THREADS", 1), torch.get_num_threads()
    if threads < 1:
        raise UserError(f"environment variable OMP_NUM_THREADS={threads} must be at least 1; unset it for 1")
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def get_world_size():
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if _initialized() else _env_int("WORLD_SIZE", 1)


def is_main():
    """True on the process that prints, logs and writes files (rank 0)."""
    return get_rank() == 0


def print0(*args, **kwargs):
    """``print`` on rank 0 only, flushed so that launcher logs stay in order."""
    if is_main():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def resolve_device(device=None):
    """Return the ``torch.device`` for this process.

    Args:
        device: None or "auto" (CUDA when available, else CPU), "cpu", "cuda", or a torch.device.
            CUDA devices are indexed by LOCAL_RANK.
    """
    kind = device.type if isinstance(device, torch.device) else (device or "auto")
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    if kind != "cuda":
        raise UserError(f"--device {device}: expected one of {', '.join(DEVICE_CHOICES)}")
    if not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    local_rank = get_local_rank()
    if local_rank >= torch.cuda.device_count():
        raise UserError(f"LOCAL_RANK {local_rank}: only {torch.cuda.device_count()} CUDA devices are visible; "
                        f"start at most that many processes per machine (--nproc_per_node)")
    return torch.device("cuda", local_rank)


def init_distributed(device=None):
    """Return this process's torch.device (``device``: see ``resolve_device``) and, under a launcher, join the
    process group: NCCL on CUDA, gloo on CPU. Under plain ``python`` no process group is created."""
    device = resolve_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if _launched() and not _initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        options = {"device_id": device} if device.type == "cuda" else {}
        store = _attempt_store()
        if store is None:
            dist.init_process_group(backend=backend, init_method="env://", **options)
        else:
            dist.init_process_group(backend=backend, store=store, rank=get_rank(), world_size=get_world_size(),
                                    **options)
    return device


def _attempt_store():
    """Under torchrun, its store with a prefix for this restart attempt; None elsewhere.

    torchrun (2.14) hands the restarted workers of ``--max-restarts`` the store of the first attempt,
    which still holds that attempt's keys: a restarted rank may read a dead peer's address and fail
    to connect ("Gloo connectFullMesh failed ... Connection refused"). A prefix per attempt, as
    older torch versions added, keeps every attempt's keys apart.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from torch.distributed.constants import default_pg_timeout
    store = dist.TCPStore(os.environ["MASTER_ADDR"], _env_int("MASTER_PORT", 0), get_world_size(),
                          is_master=False, timeout=default_pg_timeout)
    return dist.PrefixStore(f"/ddae/attempt_{attempt}", store)


def cleanup():
    """Leave the process group, if any."""
    if _initialized():
        dist.destroy_process_group()


def wrap_ddp(module, device, sync_buffers=True, **options):
    """``DistributedDataParallel(module)`` on ``device``; ``options`` are its other keywords.

    ``sync_buffers=False``: buffers are made equal once, at the start, not before every forward (for
    constant buffers such as noise schedules). torch 2.13 renamed the keyword (``forward_sync_buffers``;
    ``broadcast_buffers`` now warns); older versions get the old one.
    """
    from torch.nn.parallel import DistributedDataParallel
    keyword = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
        else "broadcast_buffers"
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   **{keyword: sync_buffers}, **options)


def barrier():
    """Wait for every process; a no-op when not distributed."""
    if _initialized():
        dist.barrier()


def all_reduce_sum(tensor):
    """Return the sum of ``tensor`` over processes (a new tensor; NCCL needs it on the CUDA device)."""
    total = tensor.detach().clone()
    if _initialized():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def all_gather_object(obj):
    """Return a list with every process's picklable ``obj``, ordered by rank."""
    if not _initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def decide_on_main(decide):
    """Run ``decide()`` on rank 0 only and return its result on every rank (a barrier, too).

    A ``UserError`` raised by ``decide`` is raised on every rank, so that all of them stop with the
    same one-line message instead of the others waiting in the next collective.
    """
    answer = None
    if is_main():
        try:
            answer = {"value": decide()}
        except UserError as err:
            answer = {"error": str(err)}
    answer = all_gather_object(answer)[0]
    if "error" in answer:
        raise UserError(answer["error"])
    return answer["value"]


class _LocalRankAction(argparse.Action):
    """Store ``--local-rank`` and make it visible as LOCAL_RANK, as older launchers set only the flag."""

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.dest, value)
        os.environ.setdefault("LOCAL_RANK", str(value))


def add_launcher_args(parser):
    """Add ``--local_rank`` / ``--local-rank`` (from launchers) and ``--device {auto,cpu,cuda}``."""
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, action=_LocalRankAction,
                        default=_env_int("LOCAL_RANK", 0), help="set by the launcher; do not pass by hand")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                        help="auto: CUDA when available, else CPU")
    return parser
