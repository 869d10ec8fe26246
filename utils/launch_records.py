"""The one-line records a worker leaves for ``utils.launch``, so that the launcher, not every worker, says
what ended the run: ``stop.RANK`` (a clean stop on a signal, ``utils.preemption.exit_stopped``) and
``error.RANK`` (a bad input, ``utils.errors.cli_entry``), in the folder $DDAE_LAUNCH_RECORDS names.

Outside ``utils.launch`` (plain ``python``, plain torchrun) the variable is unset, nothing is written and
each process prints its own line as before.
"""
import os
import sys

RECORDS_ENV = "DDAE_LAUNCH_RECORDS"
KINDS = ("stop", "error")


def under_launcher():
    """True when ``utils.launch`` started this process (it then prints the workers' lines)."""
    return bool(os.environ.get(RECORDS_ENV))


def write_record(kind, line, rank=None):
    """Leave ``line`` for the launcher as ``KIND.RANK``; True when written, False outside the launcher or
    when the folder is gone (then the caller prints the line itself)."""
    folder = os.environ.get(RECORDS_ENV)
    if not folder:
        return False
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    try:
        with open(os.path.join(folder, f"{kind}.{rank}"), "w") as file:
            file.write(line + "\n")
        return True
    except OSError as err:
        print(f"note: cannot write the launcher's record into {folder} ({err.strerror})", file=sys.stderr,
              flush=True)
        return False


def read_records(folder):
    """``{kind: {rank: line}}`` of the records in ``folder``, ranks in order."""
    records = {kind: {} for kind in KINDS}
    for name in os.listdir(folder):
        kind, _, rank = name.partition(".")
        if kind in records and rank.isdigit():
            with open(os.path.join(folder, name)) as file:
                records[kind][int(rank)] = file.read().strip()
    return {kind: dict(sorted(lines.items())) for kind, lines in records.items()}
