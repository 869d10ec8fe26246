"""How probe results are named, printed and drawn: file tags, the per-cell table, the best line, the heatmap.

    table, best = accuracy_table(cells, accuracy)
    print(format_accuracy_table(table, timesteps, blocks)); print(best_line(best, test_images))
"""
import os

from evaluation.cells import cell_label
from model.heads import head_class
from utils.config import settings_of
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


def linear_tag(cfg, checkpoint, timesteps, blocks, grid, keyed=True, precision="fp32"):
    """Default name of linear.py's files: checkpoint, cells, head and the settings a sweep varies, so that
    probes of one checkpoint with other settings never meet, e.g.
    ``model_1999_sha1a2b3c4d_grid_ep15_lr0.001_bs128`` (the linear head; ``keyed``: see ``probe_tag``),
    ``model_1999_sha1a2b3c4d_grid_attention-width64_ep15_lr0.001_bs128`` or ``..._bs128_bf16``
    (``settings_tag``)."""
    settings = f"ep{cfg.linear.n_epoch}_lr{cfg.linear.lrate:g}_bs{cfg.linear.batch_size}"
    head = head_tag(cfg.linear.head, cfg.linear.head_args)
    settings += settings_tag(precision=precision)
    return f"{probe_tag(checkpoint, timesteps, blocks, grid, keyed)}{head}_{settings}"


def settings_tag(max_images=0, precision="fp32", seed=None, default_seed=None):
    """The part of a result's name for the run settings that change its numbers, each only when it is not the
    default (so the default's names stay as they were): ``_max{N}`` for --max_images N, ``_{precision}`` for
    an autocast precision (``_bf16``, ``_fp16``: --use_amp), ``_seed{S}`` for a ``seed`` other than
    ``default_seed`` (the config's). E.g. ``_max500_bf16``."""
    parts = [f"_max{max_images}" if max_images else "", "" if precision == "fp32" else f"_{precision}",
             "" if seed is None or seed == default_seed else f"_seed{seed}"]
    return "".join(parts)


def head_tag(head, settings):
    """The head's part of a tag: nothing for the linear head, else ``_NAME`` and each setting that differs
    from the head class's default as ``-KEYVALUE`` (``_attention-width64``)."""
    if head == "linear":
        return ""
    defaults = settings_of(head_class(head), skip=2)
    changed = [f"-{key}{_short(value)}" for key, value in settings.items()
               if key not in defaults or defaults[key][1] != value]
    return f"_{head}{''.join(changed)}"


def _short(value):
    if isinstance(value, (list, tuple)):
        return ",".join(map(_short, value))
    return f"{value:g}" if isinstance(value, float) else str(value).replace(os.sep, "_").replace(" ", "")


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
