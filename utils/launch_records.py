"""The one-line records a worker leaves for ``utils.launch``, so that the launcher, not every worker, says
what ended the run: ``stop.RANK`` (a clean stop on a signal, ``utils.preemption.exit_stopped``),
``error.RANK`` (a bad input or a failed write, ``utils.errors.cli_entry``) and ``peer.RANK`` (an end that
followed from another worker's: a collective that broke because a peer left, or the launcher's SIGTERM
after a peer failed), in the folder $DDAE_LAUNCH_RECORDS names, as ``KIND.RANK.ATTEMPT``: torchrun's
restarts (``--max-restarts``) keep the folder, and the launcher reads the last attempt's records only
(every worker marks its start, ``start.RANK.ATTEMPT``, so that an attempt that left no line still
hides the records of the one before). The launcher leaves ``teardown.PID`` there
just before it sends a worker SIGTERM because another worker failed, so that the worker tells this
SIGTERM from a user's (``utils.preemption``).

Outside ``utils.launch`` (plain ``python``, plain torchrun) the variable is unset, nothing is written and
each process prints its own line as before.
"""
import os
import sys

RECORDS_ENV = "DDAE_LAUNCH_RECORDS"
KINDS = ("stop", "error", "peer")
TEARDOWN = "teardown"
# A worker ended by the launcher after a peer failed: 128 + SIGTERM, as the signal itself would give.
EXIT_TORN_DOWN = 143


def under_launcher():
    """True when ``utils.launch`` started this process (it then prints the workers' lines)."""
    return bool(os.environ.get(RECORDS_ENV))


def attempt():
    """This worker's attempt: 0, then 1 after torchrun's first restart, ..."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def write_record(kind, line, rank=None):
    """Leave ``line`` for the launcher as ``KIND.RANK.ATTEMPT``; True when written, False outside the
    launcher or when the folder is gone (then the caller prints the line itself)."""
    folder = os.environ.get(RECORDS_ENV)
    if not folder:
        return False
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    try:
        with open(os.path.join(folder, f"{kind}.{rank}.{attempt()}"), "w") as file:
            file.write(line + "\n")
        return True
    except OSError as err:
        print(f"note: cannot write the launcher's record into {folder} ({err.strerror})", file=sys.stderr,
              flush=True)
        return False


def is_collective_error(err):
    """True for what a collective raises when a peer has gone: torch.distributed's DistError (NCCL's
    DistBackendError, DistNetworkError, ...) or gloo's RuntimeError, whose message names gloo's source."""
    kinds = {kind.__name__ for kind in type(err).__mro__}
    return "DistError" in kinds or (isinstance(err, RuntimeError) and "gloo/" in str(err))


def mark_teardown(folder, pid):
    """The launcher's mark, left before it sends worker ``pid`` SIGTERM because another worker failed."""
    with open(os.path.join(folder, f"{TEARDOWN}.{pid}"), "w"):
        pass


def torn_down():
    """True when this process's SIGTERM came from the launcher ending the workers after one failed, not
    from a user or a scheduler."""
    folder = os.environ.get(RECORDS_ENV)
    return bool(folder) and os.path.exists(os.path.join(folder, f"{TEARDOWN}.{os.getpid()}"))


def mark_started():
    """Mark this worker's attempt as started (``utils.errors.cli_entry`` does, before ``main``)."""
    write_record("start", "")


def read_records(folder):
    """``{kind: {rank: text}}`` of the last attempt's records in ``folder``, ranks in order (a text is one
    line, but a ``peer`` record's may end a traceback)."""
    found = []
    for name in os.listdir(folder):
        kind, rank, number = (name.split(".") + ["", ""])[:3]
        if rank.isdigit() and number.isdigit():
            found.append((kind, int(rank), int(number), name))
    last = max((number for _, _, number, _ in found), default=0)
    records = {kind: {} for kind in KINDS}
    for kind, rank, number, name in found:
        if kind in records and number == last:
            with open(os.path.join(folder, name)) as file:
                records[kind][rank] = file.read().strip()
    return {kind: dict(sorted(lines.items())) for kind, lines in records.items()}
