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
"""
import os
import signal
import threading
import time

# Exit code of a run that stopped on a signal after saving: EX_TEMPFAIL of sysexits.h, "temporary
# failure, try again". It is non-zero, so torchrun restarts the workers (--max-restarts) and a scheduler
# does not record the run as done; it differs from a crash (1) and a bad input (2), so a wrapper or
# SLURM's RequeueExit can requeue exactly these.
EXIT_REQUEUE = 75
REPEAT_SECONDS = 1.0
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_active = None  # the installed StopSignals of this process
_STOP = 0  # not a signal number: tells the watcher thread to end


class StopSignals:
    """Context manager that turns ``signals`` into a stop request (see the module docstring).

    Outside the main thread nothing is installed and ``requested`` stays None. Inside another
    StopSignals nothing more is installed either, and ``requested`` is the outer one's.

    Args:
        signals: the signals to watch.
        repeat_seconds: a second signal sooner than this after the first counts as the same one.
    """

    def __init__(self, signals=SIGNALS, repeat_seconds=REPEAT_SECONDS):
        self.signals = tuple(signals)
        self.repeat_seconds = repeat_seconds
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
        self._previous = {number: signal.signal(number, _ignore) for number in self.signals}
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._watcher = threading.Thread(target=self._watch, name="stop-signals", daemon=True)
        self._watcher.start()
        _active = self
        return self

    def __exit__(self, *exc_info):
        global _active
        self._outer = None
        if self._previous is None:
            return
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
        now = time.monotonic()
        if self._requested is None:
            self._requested, self._first_time = number.name, now
            _say(f"{number.name} received: stopping at the next step or epoch boundary, after saving; "
                 f"send it again to exit at once")
        elif now - self._first_time >= self.repeat_seconds:
            _say(f"second {number.name}: exiting at once, without saving")
            os._exit(128 + number)


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
