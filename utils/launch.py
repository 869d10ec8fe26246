"""torchrun with the exit codes a scheduler needs, and one line per event: 75 for a clean stop, another code
for a failure.

    python -m utils.launch --standalone --nproc_per_node=4 train.py --config config/DDPM_ddpm.yaml --resume auto

takes exactly torchrun's options (it calls torchrun's own ``torch.distributed.run.run``; nothing else
is launched differently). Plain torchrun ends a clean stop with exit code 1 and a long traceback: its
workers exit with 75 (``utils.preemption.EXIT_REQUEUE``), which torchrun counts as a failure, and a
SIGTERM to torchrun itself surfaces as a SignalException. This wrapper gives the workers a folder in
$DDAE_LAUNCH_RECORDS, where a worker leaves the line it would have printed (``utils.launch_records``): its
stop line after a clean stop (``utils.preemption.exit_stopped``, after the save), its one-line error
(``utils.errors.cli_entry``), or, when its end followed from another worker's, a ``peer`` record instead
of a traceback: a collective that broke because a peer left (its traceback, kept), or the SIGTERM the
launcher sends the other workers after a failure (no stop: the worker exits at once with 143 and says
nothing; the launcher marks the workers it ends so, ``_Teardown``). The launcher decides from them and the
workers' exit codes, in the order torchrun saw the workers end, and prints one line, the last:

- every worker done: 0;
- the workers stopped cleanly (a stop record, and every worker that torchrun saw end exited with 75
  or was ended by a signal the launcher sent), whether the signal reached torchrun or the workers: the
  stop line and exit code 75;
- otherwise the first worker that failed is named, never one with a ``peer`` record while another
  failed: one killed by a signal the launcher did not send (SIGKILL: most often the kernel's
  out-of-memory killer) comes before a worker that printed an error in the same second; a worker's
  one-line error (a bad input: exit code 2; a full disk: 1) is printed once, as the worker wrote it; a
  crash says its exit code (its traceback is above); a collective that broke with no other worker
  failing shows its traceback, then the line. The exit code is the worker's own when it is neither 0
  nor 75, else 1;
- torchrun signalled before any worker saved: one line and 128 + the signal's number.

The signals the launcher sends are the one it received (passed on to the workers), SIGTERM (torchrun
ends the other workers with it after a failure) and SIGKILL at least ``--shutdown-timeout`` seconds
(30) after the first failure, never as the first. torchrun's own log lines that the final line restates
(a worker's exit code, "closing signal SIGTERM", "death signal") are dropped; its other warnings stay.
"""
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile

from utils.launch_records import RECORDS_ENV, mark_teardown, read_records
from utils.preemption import EXIT_REQUEUE

EXIT_FAILED = 1
# torchrun's log lines that the launcher's last line restates, by logger and message template.
RESTATED_LOGS = {
    "torch.distributed.elastic.multiprocessing.api": ("failed (exitcode: ", "Sending process %s closing signal",
                                                      "Closing process %s via signal"),
    "torch.distributed.elastic.agent.server.api": ("Received %s death signal",),
}


def stop_message(records):
    """The line to end a clean stop with: rank 0's, else the lowest rank's."""
    rank, line = next(iter(records.items()))
    return line if rank == 0 else f"rank {rank}: {line}"


def failure_order(failures, errors, sent, seconds=None, peers=()):
    """The ranks of ``failures`` in the order they most likely failed: the workers whose end followed from
    another's (``peers``: a broken collective, the launcher's teardown) last; the others by the second
    torchrun recorded (``seconds``), and within one second a death by a signal not in ``sent`` first (the
    others' collectives broke because of it), then a worker that left an error line, then torchrun's order."""
    seconds = seconds or {}
    position = {rank: index for index, rank in enumerate(failures)}

    def key(rank):
        code = failures[rank]
        kind = 0 if code < 0 and code not in sent else 1 if rank in errors else 2
        return rank in peers, seconds.get(rank, 0), kind, position[rank]

    return sorted(failures, key=key)


def signal_line(rank, code):
    name = signal.Signals(-code).name
    if -code == signal.SIGKILL:
        why = ("most often the kernel's out-of-memory killer: lower batch_size (and raise --accum to keep the "
               "batch per step), or check the node's memory (dmesg, sacct's MaxRSS); the other workers' errors "
               "follow from it")
    else:
        why = "its own output above may say more; the other workers' errors follow from it"
    return f"error: worker rank {rank} was killed by {name}, which the launcher did not send: {why}"


def decide(failures, records, signalled=None, seconds=None):
    """Exit code and line of a torchrun run that did not end normally.

    Args:
        failures: ``{rank: exit code}`` of the workers torchrun saw fail (negative: killed by a signal),
            in the order torchrun recorded them.
        records: ``utils.launch_records.read_records``'s answer (``{"stop": {rank: line}, "error": ...,
            "peer": ...}``).
        signalled: the signal torchrun itself received (a ``signal.Signals``), if any.
        seconds: ``{rank: time}`` torchrun recorded each failure at (whole seconds), if known.
    """
    stops, errors, peers = records.get("stop", {}), records.get("error", {}), records.get("peer", {})
    sent = {-signal.SIGTERM} | ({-int(signalled)} if signalled else set())
    order = failure_order(failures, errors, sent, seconds, peers)

    def by_launcher(rank):  # its SIGKILL comes after the shutdown timeout, never first
        return (failures[rank] in sent or rank in peers
                or (failures[rank] == -signal.SIGKILL and rank != order[0]))

    unexpected = [rank for rank in order if failures[rank] != EXIT_REQUEUE and not by_launcher(rank)]
    if stops and not unexpected:
        return EXIT_REQUEUE, stop_message(stops)
    if failures:
        broken = [rank for rank in order if "\n" in peers.get(rank, "")]  # a collective's traceback
        rank = (unexpected or broken or order)[0]
        code = failures[rank]
        exit_code = code if 0 < code != EXIT_REQUEUE else EXIT_FAILED
        if rank in unexpected and code < 0:
            return exit_code, f"{signal_line(rank, code)} (exit code {exit_code})"
        if rank in errors:
            line = errors[rank]
            return exit_code, line if rank == 0 or errors.get(0) == line else f"rank {rank}: {line}"
        if rank in broken:  # and no other worker failed
            trace, _, line = peers[rank].rpartition("\n")
            return exit_code, (f"{trace}\nerror: worker rank {rank}: a collective failed ({line}) and no other "
                               f"worker failed before it; its traceback is above (exit code {exit_code})")
        reason = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        return exit_code, (f"error: worker rank {rank} failed ({reason}); its own output above says why "
                           f"(exit code {exit_code})")
    name = signalled.name if signalled else "a signal"
    exit_code = 128 + int(signalled) if signalled else EXIT_FAILED
    return exit_code, (f"torchrun received {name} before the workers saved anything; the run stopped "
                       f"without a checkpoint of this attempt (exit code {exit_code})")


class _Restated(logging.Filter):
    """Drops the log records whose message template starts with one of ``prefixes``, and those below
    ``level``."""

    def __init__(self, prefixes, level=logging.NOTSET):
        super().__init__()
        self.prefixes = prefixes
        self.level = level

    def filter(self, record):
        return record.levelno >= self.level and not str(record.msg).startswith(self.prefixes)


class _Teardown(logging.Filter):
    """Marks each worker that torchrun is about to send SIGTERM to because another worker failed
    (``utils.launch_records.mark_teardown``; torchrun logs "Sending process PID closing signal" just before
    it sends it), so that the worker ends quietly instead of stopping as on a user's signal. After
    torchrun itself received a signal ("death signal"), the signal it passes on is the user's: no mark."""

    def __init__(self, folder):
        super().__init__()
        self.folder = folder
        self.signalled = False

    def filter(self, record):
        message = str(record.msg)
        if message.startswith("Received %s death signal"):
            self.signalled = True
        elif message.startswith("Sending process %s closing signal") and not self.signalled:
            with contextlib.suppress(OSError, IndexError, TypeError):  # never break torchrun's teardown
                mark_teardown(self.folder, record.args[0])
        return True


def watch_logs(folder):
    """Mark torchrun's teardowns in ``folder`` (``_Teardown``) and drop its log lines that the launcher's
    last line restates (``RESTATED_LOGS``)."""
    teardown = _Teardown(folder)
    for name, prefixes in RESTATED_LOGS.items():
        logger = logging.getLogger(name)
        level = logger.getEffectiveLevel()  # torchrun's LOGLEVEL (WARNING unless set)
        logger.setLevel(min(level, logging.WARNING))  # its teardown's warning must reach the filters, ...
        logger.addFilter(teardown)  # first: a filter that drops a record ends the chain
        logger.addFilter(_Restated(prefixes, level))  # ... which still show only what LOGLEVEL lets through


def main(argv=None):
    """Run torchrun with ``argv`` (default: the command line) and exit with the code ``decide`` gives."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    folder = tempfile.mkdtemp(prefix="ddae-launch-")
    os.environ[RECORDS_ENV] = folder  # the workers inherit it
    watch_logs(folder)
    failures, seconds, signalled = None, None, None
    try:
        run(args)
        return 0
    except ChildFailedError as err:
        failures = {rank: failure.exitcode for rank, failure in err.failures.items()}  # torchrun's order
        seconds = {rank: failure.timestamp for rank, failure in err.failures.items()}
    except SignalException as err:
        signalled = signal.Signals(err.sigval)
        failures = {}
    finally:
        records = read_records(folder)
        shutil.rmtree(folder, ignore_errors=True)
    code, line = decide(failures, records, signalled, seconds)
    print(line, file=sys.stdout if code == EXIT_REQUEUE else sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
