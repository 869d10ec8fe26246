"""Progress for people and for log files: a tqdm bar on a terminal, plain lines everywhere else.

    with progress(total=len(loader), desc="features", unit="batch") as bar:
        for batch in loader:
            ...
            bar.update()

When stderr is a terminal this is tqdm, as before. When it is not (a SLURM log, ``> log.txt 2>&1``)
no carriage returns are written: a plain line goes to stdout every ``every_percent`` percent and at
least every ``every_seconds`` seconds, and one when the loop ends, e.g.

    features: 120/391 batch (30%), 41.2 batch/s, 0:00:02 elapsed, 0:00:06 left
"""
import sys
import time

from tqdm import tqdm

EVERY_PERCENT = 10      # a plain line per 10% of the loop
EVERY_SECONDS = 300     # and at least one per 5 minutes in long loops
_now = time.perf_counter  # the clock (tests replace it)


def is_interactive(stream=None):
    """True when ``stream`` (default stderr, where tqdm draws) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def format_duration(seconds):
    """``H:MM:SS`` for a number of seconds (``?`` when unknown)."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class PlainProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close`` as occasional plain lines (see the module docstring).

    Args:
        total: the count at which the loop ends (None: unknown, lines by time only).
        desc: the line's prefix.
        unit: what is counted.
        disable: print nothing (non-main processes).
        every_percent: a line each time this percentage of ``total`` is passed (None: by time only).
        every_seconds: a line at least this often.
        stream: where the lines go (default stdout, flushed).
        final_line: print a line when the loop ends (off when the caller prints its own summary).
        initial: the count already done (a resumed loop); the rate counts only what follows.
    """

    def __init__(self, total=None, desc="", unit="it", disable=False, every_percent=EVERY_PERCENT,
                 every_seconds=EVERY_SECONDS, stream=None, final_line=True, initial=0):
        self.total, self.desc, self.unit, self.disable = total, desc, unit, disable
        self.final_line = final_line
        self.every_percent, self.every_seconds = every_percent, every_seconds
        self.stream = stream
        self.n = self.initial = initial
        self.values = {}
        self.start = self.last_time = _now()
        self.last_mark = int(100 * initial / total // every_percent) if every_percent and total else 0
        self.closed = False

    def update(self, n=1):
        self.n += n
        if self.disable:
            return
        now = _now()
        mark = self.last_mark
        if self.every_percent and self.total:
            mark = int(100 * self.n / self.total // self.every_percent)
        if (mark > self.last_mark and self.n < self.total) or now - self.last_time >= self.every_seconds:
            self.last_mark = mark
            self._line(now)

    def set_postfix(self, **values):
        """Values shown from the next line on; each is turned into text only when a line is written, so
        a ``LazyText`` (a device value) is read only then."""
        self.values = values

    @property
    def postfix(self):
        return ", ".join(f"{key} {value}" for key, value in self.values.items())

    def line(self, now=None):
        """The status line as it would be printed now."""
        now = _now() if now is None else now
        elapsed = now - self.start
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        percent = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        text = f"{self.desc}: {count} {self.unit}{percent}, {rate:.1f} {self.unit}/s, " \
               f"{format_duration(elapsed)} elapsed"
        if self.total and rate > 0 and self.n < self.total:
            text += f", {format_duration((self.total - self.n) / rate)} left"
        postfix = self.postfix
        return text + (f" [{postfix}]" if postfix else "")

    def _line(self, now):
        self.last_time = now
        print(self.line(now), file=self.stream or sys.stdout, flush=True)

    def close(self):
        if not self.closed and not self.disable and self.n and self.final_line:
            self._line(_now())
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class LazyText:
    """``format(function(), spec)``, computed when turned into text: a tqdm bar does that at once, a
    plain progress only when it writes a line (training's running loss, read from the GPU then)."""

    def __init__(self, function, spec=""):
        self.function, self.spec, self.text = function, spec, None

    def __str__(self):
        if self.text is None:
            self.text = format(self.function(), self.spec)
        return self.text


def progress(total=None, desc="", unit="it", disable=False, interactive=None, every_percent=EVERY_PERCENT,
             every_seconds=EVERY_SECONDS, final_line=True, initial=0, **tqdm_options):
    """A tqdm bar when stderr is a terminal (``interactive`` forces the choice), else a ``PlainProgress``.

    Both have ``update(n)``, ``set_postfix(**values)``, ``close()``, ``n``, ``disable`` and work as
    context managers. ``tqdm_options`` (``smoothing``, ``dynamic_ncols`` ...) apply to the bar only.
    """
    if is_interactive() if interactive is None else interactive:
        return tqdm(total=total, desc=desc, unit=unit, disable=disable, initial=initial, **tqdm_options)
    return PlainProgress(total=total, desc=desc, unit=unit, disable=disable, every_percent=every_percent,
                         every_seconds=every_seconds, final_line=final_line, initial=initial)


def iterate(iterable, total=None, **options):
    """Yield from ``iterable`` with a ``progress`` over it (``total`` defaults to its length)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with progress(total=total, **options) as bar:
        for item in iterable:
            yield item
            bar.update()


def batches(loader, desc):
    """The batches of ``loader`` with ``desc``'s progress on the main process: a transient bar on a
    terminal, a line every few minutes in a log file (the caller prints its own line per epoch)."""
    from utils.distributed import is_main  # here, so that this module stays importable on its own

    return iterate(loader, desc=desc, unit="batch", disable=not is_main(), every_percent=None, final_line=False,
                   leave=False, dynamic_ncols=True)
