"""SIGTERM and SIGUSR1 as a request to stop cleanly, as schedulers send them before a preemption.

    with StopSignals() as signals:
        for step in ...:
            ...
            if signals.requested:          # poll at a step or epoch boundary
                save(); raise SystemExit(EXIT_REQUEUE)

The first signal only sets ``requested`` (its name, e.g. "SIGTERM"): the loop finishes its step,
saves and exits with ``EXIT_REQUEUE``. A second signal, at least ``REPEAT_SECONDS`` later, exits at
once with code 128 + its number, as the signal itself would. Repeats closer together count once: under
SLURM a preemption signals every process of the job, and torchrun forwards the same signal to its
workers again.

The signals are watched by a thread reading Python's wakeup file descriptor, not by the main thread,
so the second signal works even while the main thread waits in a collective whose peer has died.
Processes forked meanwhile (DataLoader workers) ignore the signals: the main process ends them.

A script with nothing to save mid-way (sampling, a feature pass, FID) stops at once instead:

    with StopSignals(at_once="the rerun writes only the missing images"):
        ...

There the first signal raises ``Stopped`` in the main thread (at the next Python instruction, so files
being written atomically are cleaned up), and leaving the block prints "stopped on SIGTERM: <at_once>"
and exits with ``EXIT_REQUEUE``. Every clean stop ends through ``exit_stopped``. Under ``utils.launch`` (the
torchrun wrapper) a worker leaves its stop line in a record instead of printing it, and only rank 0 says
that a signal came, so that the launcher prints the stop once (``utils.launch_records``). A SIGTERM the
launcher sends because another worker failed is no stop: the worker exits at once, says nothing and
leaves a ``peer`` record, so that the launcher names the worker that failed.
"""
import os
import signal
import threading
import time

from utils.launch_records import EXIT_TORN_DOWN, torn_down, under_launcher, write_record

# Exit code of a run that stopped on a signal after saving: EX_TEMPFAIL of sysexits.h, "temporary
# failure, try again". It is non-zero, so torchrun restarts the workers (--max-restarts) and a scheduler
# does not record the run as done; it differs from a crash (1) and a bad input (2), so a wrapper or
# SLURM's RequeueExit can requeue exactly these.
EXIT_REQUEUE = 75
REPEAT_SECONDS = 1.0
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Stopped(BaseException):
    """Raised in the main thread by a ``StopSignals(at_once=...)`` on the first signal (its name in
    ``args[0]``). A BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it."""

_active = None  # the installed StopSignals of this process
_STOP = 0  # not a signal number: tells the watcher thread to end


class StopSignals:
    """Context manager that turns ``signals`` into a stop request (see the module docstring).

    Outside the main thread nothing is installed and ``requested`` stays None. Inside another
    StopSignals nothing more is installed either, and ``requested`` is the outer one's.

    Args:
        signals: the signals to watch.
        repeat_seconds: a second signal sooner than this after the first counts as the same one.
        at_once: None: only record the request (the caller polls ``requested``). A text: stop at
            once (``Stopped`` in the main thread), then print "stopped on SIGNAL: <at_once>" and exit
            with ``EXIT_REQUEUE``; it says what the rerun of the same command redoes.
    """

    def __init__(self, signals=SIGNALS, repeat_seconds=REPEAT_SECONDS, at_once=None):
        self.signals = tuple(signals)
        self.repeat_seconds = repeat_seconds
        self.at_once = at_once
        self._raised = False
        self._requested = None
        self._first_time = None
        self._previous = None
        self._outer = None

    @property
    def requested(self):
        """Name of the first signal received, e.g. "SIGTERM"; None before."""
        return self._outer.requested if self._outer is not None else self._requested

    def __enter__(self):
        global _active
        self._outer = _active
        if threading.current_thread() is not threading.main_thread() or _active is not None:
            return self
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        # A Python-level handler must exist for the interpreter to report the signal on the wakeup fd.
        handler = self._raise if self.at_once is not None else _ignore
        self._previous = {number: signal.signal(number, handler) for number in self.signals}
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._watcher = threading.Thread(target=self._watch, name="stop-signals", daemon=True)
        self._watcher.start()
        _active = self
        return self

    def __exit__(self, kind, value, traceback):
        self._outer = None
        if self._previous is None:
            return
        self._uninstall()
        if kind is Stopped:
            exit_stopped(f"stopped on {value.args[0]}: {self.at_once}")

    def _raise(self, number, frame):
        """The main thread's handler with ``at_once``: unwind to ``__exit__`` (once)."""
        if not self._raised and not torn_down():  # the launcher's teardown: the watcher thread exits
            self._raised = True
            raise Stopped(signal.Signals(number).name)

    def _uninstall(self):
        global _active
        signal.set_wakeup_fd(self._previous_fd)
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = None
        _active = None
        os.write(self._write, bytes([_STOP]))  # ends the watcher (forked workers may hold the pipe open)
        self._watcher.join()
        os.close(self._write)
        os.close(self._read)

    def _watch(self):
        while True:
            received = os.read(self._read, 64)
            for number in received:
                if number == _STOP:
                    return
                if number in self.signals:
                    self._receive(signal.Signals(number))

    def _receive(self, number):
        if torn_down():  # not a user's signal: the launcher ends the workers after another one failed
            write_record("peer", "ended by the launcher after another worker failed")
            os._exit(EXIT_TORN_DOWN)
        now = time.monotonic()
        if self._requested is None:
            self._requested, self._first_time = number.name, now
            when = "now" if self.at_once is not None else "at the next step or epoch boundary, after saving"
            if not under_launcher() or os.environ.get("RANK", "0") == "0":  # one notice per run
                _say(f"{number.name} received: stopping {when}; send it again to exit at once")
        elif now - self._first_time >= self.repeat_seconds:
            _say(f"second {number.name}: exiting at once, without saving")
            os._exit(128 + number)


def exit_stopped(line, rank=None):
    """End a run that stopped cleanly on a signal: ``line`` (which says what was saved and what the rerun
    does) with "(exit code 75)", printed on the main process, or left for ``utils.launch`` to print when
    running under it, then ``SystemExit(EXIT_REQUEUE)``."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    line = f"{line} (exit code {EXIT_REQUEUE})"
    if not write_record("stop", line, rank) and rank == 0:
        print(line, flush=True)
    raise SystemExit(EXIT_REQUEUE)


def requested():
    """The signal the installed StopSignals has received ("SIGTERM"), or None (also when none is installed)."""
    return _active.requested if _active is not None else None


def _ignore(number, frame):
    """The main thread's handler: the watcher thread acts on the signal."""


def _say(message):
    # os.write, not print: the main thread may hold sys.stderr's lock.
    os.write(2, f"{message}\n".encode())


def _in_forked_child():
    # A forked DataLoader worker must neither write to the parent's pipe nor stop on its own.
    global _active
    if _active is not None and threading.current_thread() is threading.main_thread():
        signal.set_wakeup_fd(-1)
        for number in _active.signals:
            signal.signal(number, signal.SIG_IGN)
        os.close(_active._read)
        os.close(_active._write)
        _active = None


os.register_at_fork(after_in_child=_in_forked_child)
