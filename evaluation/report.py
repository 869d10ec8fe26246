"""How probe results are named, printed and drawn: file tags, the per-cell table, the best line, the heatmap.

    table, best = accuracy_table(cells, accuracy)
    print(format_accuracy_table(table, timesteps, blocks)); print(best_line(best, test_images))
"""
import os

from evaluation.cells import cell_label
from utils.logging import plot_heatmap
from utils.provenance import short_digest


def probe_tag(checkpoint, timesteps, blocks, grid, keyed=True):
    """Name of a probe's outputs: the checkpoint's file stem, the start of its weights' hash and the cells,
    e.g. ``model_1999_sha1a2b3c4d_grid`` (the default grid), ``model_1999_sha1a2b3c4d_t11_out_6`` or
    ``..._t1-11-21_in_3-mid`` (chosen blocks): two models of one file name never share a name.
    ``keyed=False`` gives the name without the hash, which results had before."""
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    if keyed:
        stem = f"{stem}_{short_digest(checkpoint)}"
    return f"{stem}_grid" if grid else f"{stem}_t{'-'.join(map(str, timesteps))}_{'-'.join(blocks)}"


def best_line(best, test_images, details=""):
    """The one format of the final ``best:`` line of linear.py and knn.py, e.g.
    ``best: 11/out_6 88.23% (10000 test images)``."""
    return f"best: {cell_label(best['timestep'], best['block'])} {best['accuracy']:.2f}% ({test_images} test images" \
           f"{'; ' + details if details else ''})"


def linear_tag(cfg, checkpoint, timesteps, blocks, grid, keyed=True):
    """Default name of linear.py's files: checkpoint, cells and the settings a sweep varies, so that
    probes of one checkpoint with other settings never meet, e.g.
    ``model_1999_sha1a2b3c4d_grid_ep15_lr0.001_bs128`` (``keyed``: see ``probe_tag``)."""
    settings = f"ep{cfg.linear.n_epoch}_lr{cfg.linear.lrate:g}_bs{cfg.linear.batch_size}"
    return f"{probe_tag(checkpoint, timesteps, blocks, grid, keyed)}_{settings}"


def accuracy_table(cells, accuracy):
    """Per-cell accuracies as a table and the best cell.

    Args:
        cells: (t, block) pairs.
        accuracy: one value per cell, in the order of ``cells``.

    Returns:
        (``{str(t): {block: accuracy}}``, ``{"timestep", "block", "accuracy"}`` of the best cell).
    """
    table = {}
    for (t, block), value in zip(cells, accuracy):
        table.setdefault(str(t), {})[block] = value
    best = max(range(len(cells)), key=lambda i: accuracy[i])
    return table, {"timestep": cells[best][0], "block": cells[best][1], "accuracy": accuracy[best]}


def format_accuracy_table(table, timesteps, blocks):
    """An ``accuracy_table`` as text: one row per timestep, one column per block."""
    width = max(6, *(len(block) for block in blocks))
    lines = ["t \\ block " + " ".join(f"{block:>{width}}" for block in blocks)]
    for t in timesteps:
        lines.append(f"{t:<10}" + " ".join(f"{table[str(t)][block]:>{width}.2f}" for block in blocks))
    return "\n".join(lines)


def plot_accuracy_heatmap(table, timesteps, blocks, path, title):
    """An ``accuracy_table`` as a timestep x block heatmap PNG, the best cell outlined."""
    matrix = [[table[str(t)][block] for block in blocks] for t in timesteps]
    plot_heatmap(matrix, [f"t={t}" for t in timesteps], blocks, path, title=title, xlabel="block", ylabel="timestep")
