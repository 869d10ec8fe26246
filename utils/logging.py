"""Machine-readable logs (one JSON object per line) and the PNG plots made from them.

Plots are drawn with matplotlib's Agg canvas (no display, no pyplot global state) and written
atomically, so a plot that is being refreshed during training is never seen half written.
"""
import json
import math
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from utils.atomic import atomic_path
from utils.errors import UserError


def _json_value(value):
    # Tensors and numpy numbers become Python numbers or lists.
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot log a {type(value).__name__} as JSON")


class JsonlLogger:
    """Append one JSON object per line to ``path``, flushed at once so tools can follow it.

    The logger writes whatever it is given; call it on the main process only.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(folder, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        except OSError as err:
            raise UserError(f"cannot write the log {self.path} ({err.strerror}); choose a writable "
                            f"save_dir") from None

    def log(self, record=None, **fields):
        """Write ``record`` merged with ``fields`` as one line; tensors and numpy values are allowed."""
        line = json.dumps({**(record or {}), **fields}, default=_json_value)
        self._file.write(line + "\n")
        self._file.flush()

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def read_jsonl(path):
    """The records of a JSONL log, in order.

    A cut-off last line (a run killed while writing) is skipped; a bad line elsewhere is an error.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"log {path} not found; check the run folder")
    with open(path, encoding="utf-8") as file:
        lines = file.read().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):  # no newline after it: the write was interrupted
                break
            raise UserError(f"{path} line {number} is not JSON ({err.msg}); fix or delete that "
                            f"line") from None
    return records


def save_json(obj, path):
    """Write ``obj`` as indented JSON through a temporary file, so readers never see half a file."""
    with atomic_path(path, fix="choose a writable save_dir") as temporary:
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(obj, file, indent=1)
            file.write("\n")


def _new_figure(size=(6.4, 4.2)):
    figure = Figure(figsize=size, dpi=120)
    FigureCanvasAgg(figure)
    return figure


def _save_figure(figure, path):
    with atomic_path(path, what="the plot ") as temporary:
        figure.savefig(temporary, format="png", bbox_inches="tight")


def plot_curves(records, x_key, y_keys, path, title=None, logy=False):
    """Plot fields of log records against ``x_key`` (e.g. loss against epoch) into a PNG.

    Args:
        records: dicts, as returned by ``read_jsonl``; records without a key are skipped for it.
        x_key: the field on the horizontal axis.
        y_keys: one field name or a list of them, one line each.
        path: the PNG file to write.
        title: figure title.
        logy: logarithmic vertical axis.
    """
    y_keys = [y_keys] if isinstance(y_keys, str) else list(y_keys)
    figure = _new_figure()
    axes = figure.add_subplot()
    for key in y_keys:
        points = [(r[x_key], r[key]) for r in records if x_key in r and r.get(key) is not None]
        if points:
            xs, ys = zip(*points)
            axes.plot(xs, ys, label=key, marker="." if len(points) < 30 else None)
    axes.set_xlabel(x_key)
    if len(y_keys) == 1:
        axes.set_ylabel(y_keys[0])
    elif axes.lines:
        axes.legend()
    if logy:
        axes.set_yscale("log")
    if title:
        axes.set_title(title)
    axes.grid(alpha=0.3)
    _save_figure(figure, path)


def plot_lines(series, path, xlabel, ylabel, title=None):
    """Overlay several named series ``{name: (xs, ys)}`` in one line plot saved as a PNG."""
    figure = _new_figure()
    axes = figure.add_subplot()
    for name, (xs, ys) in series.items():
        axes.plot(list(xs), list(ys), label=str(name), marker="o", markersize=3)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title)
    if series:
        axes.legend(fontsize="small", ncol=2 if len(series) > 8 else 1)
    axes.grid(alpha=0.3)
    _save_figure(figure, path)


def plot_heatmap(matrix, row_labels, col_labels, path, title=None, mark_best=True, fmt="{:.1f}",
                 xlabel=None, ylabel=None):
    """An annotated heatmap (e.g. probe accuracy, timestep x block) with the best cell outlined.

    Args:
        matrix: (rows, cols) values; NaN cells are left blank.
        row_labels, col_labels: tick labels, one per row / column.
        path: the PNG file to write.
        title: figure title.
        mark_best: outline the largest value.
        fmt: format of the number written in each cell.
        xlabel, ylabel: axis titles.
    """
    values = np.asarray(matrix, dtype=float)
    if values.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"matrix of shape {values.shape} needs {values.shape[0]} row labels and "
                         f"{values.shape[1]} column labels, got {len(row_labels)} and {len(col_labels)}")
    n_rows, n_cols = values.shape
    figure = _new_figure((max(4.0, 0.75 * n_cols + 2), max(2.5, 0.55 * n_rows + 1.5)))
    axes = figure.add_subplot()
    image = axes.imshow(values, cmap="viridis", aspect="auto")
    figure.colorbar(image, ax=axes)
    axes.set_xticks(range(n_cols), [str(label) for label in col_labels], rotation=45, ha="right")
    axes.set_yticks(range(n_rows), [str(label) for label in row_labels])
    finite = values[np.isfinite(values)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for row in range(n_rows):
        for col in range(n_cols):
            value = values[row, col]
            if math.isfinite(value):
                axes.text(col, row, fmt.format(value), ha="center", va="center", fontsize=8,
                          color="black" if value > middle else "white")
    if mark_best and finite.size:
        best_row, best_col = np.unravel_index(np.nanargmax(values), values.shape)
        axes.add_patch(Rectangle((best_col - 0.5, best_row - 0.5), 1, 1, fill=False,
                                 edgecolor="red", linewidth=2.5))
    if xlabel:
        axes.set_xlabel(xlabel)
    if ylabel:
        axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title)
    _save_figure(figure, path)
