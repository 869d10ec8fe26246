"""torchrun with the exit codes a scheduler needs: 75 for a clean stop, another code for a failure.

    python -m utils.launch --standalone --nproc_per_node=4 train.py --config config/DDPM_ddpm.yaml --resume auto

takes exactly torchrun's options (it calls torchrun's own ``torch.distributed.run.run``; nothing else
is launched differently). Plain torchrun ends a clean stop with exit code 1 and a long traceback: its
workers exit with 75 (``utils.preemption.EXIT_REQUEUE``), which torchrun counts as a failure, and a
SIGTERM to torchrun itself surfaces as a SignalException. This wrapper gives the workers a folder in
$DDAE_STOP_RECORD, where a worker that stops cleanly (``utils.preemption.exit_stopped``, after the
save) leaves its last line, and decides from it and the workers' exit codes:

- every worker done: 0;
- the workers stopped cleanly (a stop record, and every worker that torchrun saw end exited with 75
  or was ended by torchrun's own signal), whether the signal reached torchrun or the workers: the
  stop line and exit code 75;
- otherwise a worker failed: one line naming the first one and its exit code, and exit code 1
  (or the worker's own code, such as 2 for a bad input, when it is not 75);
- torchrun signalled before any worker saved: one line and 128 + the signal's number.
"""
import os
import shutil
import signal
import sys
import tempfile

from utils.preemption import EXIT_REQUEUE, STOP_RECORD_ENV

EXIT_FAILED = 1


def read_stop_records(folder):
    """``{rank: line}`` of the stop records the workers left in ``folder``."""
    records = {}
    for name in os.listdir(folder):
        if name.startswith("stop."):
            with open(os.path.join(folder, name)) as file:
                records[int(name.split(".", 1)[1])] = file.read().strip()
    return dict(sorted(records.items()))


def stop_message(records):
    """The line to end a clean stop with: rank 0's, else the lowest rank's."""
    rank, line = next(iter(records.items()))
    return line if rank == 0 else f"rank {rank}: {line}"


def decide(failures, records, signalled=None):
    """Exit code and line of a torchrun run that did not end normally.

    Args:
        failures: ``{rank: exit code}`` of the workers torchrun saw fail (negative: killed by a signal).
        records: ``read_stop_records``'s answer.
        signalled: the signal torchrun itself received (a ``signal.Signals``), if any.
    """
    ended_by_launcher = {-signal.SIGTERM, -signal.SIGKILL} | ({-int(signalled)} if signalled else set())
    unexpected = {rank: code for rank, code in failures.items()
                  if code != EXIT_REQUEUE and code not in ended_by_launcher}
    if records and not unexpected:
        return EXIT_REQUEUE, stop_message(records)
    if failures:
        rank, code = next(iter((unexpected or failures).items()))
        reason = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        exit_code = code if 0 < code != EXIT_REQUEUE else EXIT_FAILED
        return exit_code, (f"error: worker rank {rank} failed ({reason}); its own output above says why "
                           f"(exit code {exit_code})")
    name = signalled.name if signalled else "a signal"
    exit_code = 128 + int(signalled) if signalled else EXIT_FAILED
    return exit_code, (f"torchrun received {name} before the workers saved anything; the run stopped "
                       f"without a checkpoint of this attempt (exit code {exit_code})")


def main(argv=None):
    """Run torchrun with ``argv`` (default: the command line) and exit with the code ``decide`` gives."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    folder = tempfile.mkdtemp(prefix="ddae-stop-")
    os.environ[STOP_RECORD_ENV] = folder  # the workers inherit it
    failures, signalled = None, None
    try:
        run(args)
        return 0
    except ChildFailedError as err:
        failures = {rank: failure.exitcode for rank, failure in sorted(err.failures.items())}
    except SignalException as err:
        signalled = signal.Signals(err.sigval)
        failures = {}
    finally:
        records = read_stop_records(folder)
        shutil.rmtree(folder, ignore_errors=True)
    code, line = decide(failures, records, signalled)
    print(line, file=sys.stdout if code == EXIT_REQUEUE else sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
