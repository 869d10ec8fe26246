"""Shared parts of the noise-conditional classifiers (noisy_classifier_WRN.py, noisy_classifier_DDAE.py):
the noise levels, the result files and their plots (what needs a model: ``evaluation/noisy.py``).

Both scripts report test accuracy at the same noise levels: the 20 DDPM timesteps
1, 51, ..., 951, or the indices 1..18 of the 18-step EDM schedule (1: sigma_min, 18: sigma_max).
Each writes its accuracies to a ``noisy_accuracy.json`` and, when it finds the other method's
results of the same mode, draws the figure that compares them (see ``draw_comparison``). The
figure can also be drawn by hand from any result files of one mode:

    python -m utils.noisy plot output_WRN_DDPM/noisy_accuracy.json \\
        output_DDPM_ddpm/noisy_DDAE_ep1999/noisy_accuracy.json --out compare.png
"""
import argparse
import glob
import json
import os

from utils.errors import UserError, cli_entry
from utils.logging import plot_lines, save_json

MODES = ("DDPM", "EDM")
DDPM_LEVEL_COUNT = 20
EDM_STEPS = 18  # model.edm.EDM.FEATURE_STEPS (the WRN baseline has no diffusion model to ask)
RESULT_FILE = "noisy_accuracy.json"
LEVEL_AXIS = {
    "DDPM": "DDPM timestep t",
    "EDM": f"EDM noise index (of {EDM_STEPS}; 1: sigma_min, {EDM_STEPS}: sigma_max)",
}


def eval_levels(mode, n_T=1000, steps=EDM_STEPS):
    """The noise levels accuracy is reported at.

    Args:
        mode: "DDPM" (integer timesteps 1, 1 + n_T/20, ...: 1, 51, ..., 951 for n_T = 1000) or
            "EDM" (indices 1..steps of the reversed ``steps``-step schedule).
        n_T: DDPM diffusion steps.
        steps: length of the EDM schedule.
    """
    if mode == "DDPM":
        stride = n_T // DDPM_LEVEL_COUNT
        if stride < 1:
            raise ValueError(f"n_T = {n_T} has fewer than {DDPM_LEVEL_COUNT} timesteps to report")
        return [1 + k * stride for k in range(DDPM_LEVEL_COUNT)]
    if mode == "EDM":
        return list(range(1, steps + 1))
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def log_levels(board, levels, accuracies):
    """The test accuracy against the noise level, as one TensorBoard curve (the level is its step)."""
    for level, accuracy in zip(levels, accuracies):
        board.scalars({"test_accuracy_by_level": float(accuracy)}, level, prefix="noisy/")


def format_table(levels, accuracies, mode, title):
    """The accuracies as a two-column text table under ``title``."""
    level_header = "t" if mode == "DDPM" else "index"
    lines = [title, f"{level_header:>6}  {'acc (%)':>8}"]
    lines += [f"{level:>6}  {accuracy:>8.2f}" for level, accuracy in zip(levels, accuracies)]
    return "\n".join(lines)


def write_results(path, method, mode, levels, accuracies, label, n_test_images, **extra):
    """Write a result file (atomically): the per-level accuracies of one method.

    Keys: method ("WRN" or "DDAE"), mode ("DDPM" or "EDM"), label (the legend entry), levels
    (DDPM timesteps or EDM indices), accuracies (percent, one per level), n_test_images, and the
    ``extra`` keys (for EDM, "sigmas": the noise level of each index).
    """
    record = {"method": method, "mode": mode, "label": label, "levels": list(levels),
              "accuracies": [round(float(a), 4) for a in accuracies], "n_test_images": n_test_images,
              **extra}
    save_json(record, path)
    return path


def publish_results(out_dir, compare_root, method, mode, levels, accuracies, label, n_test_images, **extra):
    """Write ``out_dir``'s result file (``write_results``) and its plot noisy_accuracy.png, and, when both
    methods' results are found under ``compare_root``, their comparison figure into ``out_dir`` too (the
    run folder, not the folder the command ran in; main process only)."""
    path = write_results(os.path.join(out_dir, RESULT_FILE), method, mode, levels, accuracies, label,
                         n_test_images, **extra)
    plot_comparison([{"mode": mode, "label": label, "levels": levels, "accuracies": accuracies}],
                    os.path.join(out_dir, "noisy_accuracy.png"))
    print(f"wrote {path}")
    compare = draw_comparison(compare_root, mode, comparison_path(out_dir, mode))
    if compare:
        print(f"wrote {compare}")


def read_results(path):
    """Read and check a result file written by ``write_results``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path} not found; pass a {RESULT_FILE} written by noisy_classifier_WRN.py "
                        f"or noisy_classifier_DDAE.py")
    try:
        with open(path, encoding="utf-8") as file:
            record = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not a JSON file ({err}); pass a {RESULT_FILE}") from None
    required = ("method", "mode", "levels", "accuracies")
    missing = [key for key in required if not isinstance(record, dict) or key not in record]
    if missing:
        raise UserError(f"{path}: key '{missing[0]}' is missing; pass a {RESULT_FILE} written by "
                        f"noisy_classifier_WRN.py or noisy_classifier_DDAE.py")
    if not isinstance(record["mode"], str):  # DDPM, EDM or another diffusion kind's model_type
        raise UserError(f"{path}: key 'mode' must be a diffusion kind such as {' or '.join(MODES)}, "
                        f"got {record['mode']!r}")
    if len(record["levels"]) != len(record["accuracies"]):
        raise UserError(f"{path}: 'levels' has {len(record['levels'])} entries but 'accuracies' has "
                        f"{len(record['accuracies'])}; rerun the script that wrote it")
    record.setdefault("label", f"{record['method']} ({os.path.basename(os.path.dirname(path))})")
    return record


def plot_comparison(records, path, title=None):
    """Overlay the accuracy-per-noise-level curves of ``records`` (one mode) in a PNG."""
    modes = {record["mode"] for record in records}
    if len(modes) != 1:
        raise UserError(f"the result files mix modes ({', '.join(sorted(modes))}); compare files "
                        f"of one mode (DDPM timesteps and EDM indices are different axes)")
    (mode,) = modes
    series = {}
    for record in records:
        label = record["label"]
        while label in series:
            label += "'"
        series[label] = (record["levels"], record["accuracies"])
    plot_lines(series, path, xlabel=LEVEL_AXIS.get(mode, f"{mode} noise level"), ylabel="test accuracy (%)",
               title=title or f"noise-conditional classifiers, {mode}")
    return path


def find_results(root, mode):
    """Result files of ``mode`` in the run folders under ``root``: ``root/*/noisy_accuracy.json``
    (the WRN script's save_dir) and ``root/*/*/noisy_accuracy.json`` (the DDAE script's
    save_dir/noisy_DDAE_<checkpoint>), sorted by path. Unreadable files are skipped."""
    paths = sorted(glob.glob(os.path.join(root, "*", RESULT_FILE)) +
                   glob.glob(os.path.join(root, "*", "*", RESULT_FILE)))
    found = []
    for path in paths:
        try:
            record = read_results(path)
        except UserError:
            continue
        if record["mode"] == mode:
            found.append((path, record))
    return found


def comparison_path(root, mode):
    """The comparison figure's name in ``root``: ``root/noisy_compare_{mode}.png``."""
    return os.path.join(root, f"noisy_compare_{mode}.png")


def draw_comparison(root, mode, path=None):
    """Draw ``path`` (default ``comparison_path(root, mode)``) from every result of ``mode`` under ``root``
    when both methods are among them; return the figure's path, or None when a method is missing."""
    found = find_results(root, mode)
    if len({record["method"] for _, record in found}) < 2:
        return None
    return plot_comparison([record for _, record in found], path or comparison_path(root, mode))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m utils.noisy", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    plot = commands.add_parser("plot", help="overlay the accuracy curves of result files of one mode")
    plot.add_argument("results", nargs="+", help=f"{RESULT_FILE} files")
    plot.add_argument("--out", default="noisy_compare.png", help="the PNG to write")
    plot.add_argument("--title", default=None, help="figure title")
    return parser.parse_args(argv)


@cli_entry
def main(args):
    records = [read_results(path) for path in args.results]
    print(f"wrote {plot_comparison(records, args.out, args.title)}")


if __name__ == "__main__":
    main(parse_args())
