"""Training objectives side by side on the demo model: prediction target (eps / v / x0), min-SNR weighting or none,
uniform or logit-normal timesteps, the same data, epochs and seed; per-step loss curves, a DDIM sample and the
linear probe of each, in one table whose rows name their weights by hash. A few minutes per row on a CPU.

    python bench/objectives.py --out bench/results/objectives                      # the default rows
    python bench/objectives.py --rows eps/none/uniform v/min_snr/logit_normal --epochs 1 --out DIR

It shows that every combination trains, samples and probes through the real train.py / sample.py / linear.py
code; at this scale it is no claim of which objective is better. The losses of different prediction targets
measure different errors (eps, v or x0), so only their trends compare. Writes {out}/objectives.md, .json and
.png, and each row's run folder under {out}/runs/ (the checkpoints are deleted unless --keep).
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import linear  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from demo import probe_accuracy  # noqa: E402
from model.models import load_config, load_diffusion  # noqa: E402
from utils import data  # noqa: E402
from utils.checkpoint import list_checkpoints, weights_digest  # noqa: E402
from utils.errors import UserError, cli_entry  # noqa: E402
from utils.logging import save_json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# prediction / loss_weighting / t_sampling: the eps baseline, each target alone and with min-SNR, logit-normal.
DEFAULT_ROWS = ("eps/none/uniform", "v/none/uniform", "x0/none/uniform", "eps/min_snr/uniform", "v/min_snr/uniform",
                "x0/min_snr/uniform", "eps/none/logit_normal", "v/min_snr/logit_normal")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "config", "demo.yaml"))
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), metavar="PREDICTION/WEIGHTING/T_SAMPLING")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs of every row (the demo: 15)")
    parser.add_argument("--probe_epochs", type=int, default=2, help="linear.n_epoch of every row's probe")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every row (e.g. batch_size=16)")
    parser.add_argument("--train_images", type=int, default=256,
                        help="images of demo.py's synthetic data to train and probe on (the demo: 2000)")
    parser.add_argument("--test_images", type=int, default=128, help="the probe's test images (the demo: 1000)")
    parser.add_argument("--sample_steps", type=int, default=10, help="DDIM steps of each row's 16-image sample")
    parser.add_argument("--keep", action="store_true", help="keep the rows' checkpoints")
    parser.add_argument("--out", required=True)
    return parser


def row_overrides(row):
    prediction, weighting, t_sampling = parse_row(row)
    return [f"diffusion.prediction={prediction}", f"diffusion.loss_weighting={weighting}",
            f"diffusion.t_sampling={t_sampling}"]


def parse_row(row):
    parts = row.split("/")
    if len(parts) != 3 or not all(parts):
        raise UserError(f"--rows {row}: write PREDICTION/WEIGHTING/T_SAMPLING, e.g. v/min_snr/logit_normal")
    return parts


def run_row(args, row, out):
    """Train, sample and probe one row in-process with the scripts' own functions; its record."""
    save_dir = os.path.join(out, "runs", row.replace("/", "-"))
    # train.py's own grids (first and last epoch): 4 images; --set may change these, not the row's keys
    flags = [f"dataset={SUBSET}", f"linear.batch_size={min(128, args.train_images)}", "ckpt_interval=1000",
             "n_sample=4", *args.set, *row_overrides(row), f"save_dir={save_dir}", f"n_epoch={args.epochs}",
             f"linear.n_epoch={args.probe_epochs}"]
    sets = [a for flag in flags for a in ("--set", flag)]
    cfg = load_config(args.config, flags)  # a bad row stops here, before any training
    losses, step = [], train.train_step

    def recorded_step(state, images):  # the per-step loss curve (train.py logs per epoch)
        loss = step(state, images)
        losses.append(float(loss))
        return loss

    started = time.perf_counter()
    train.train_step = recorded_step
    try:
        train.main(train.parse_args(["--config", args.config, "--device", "cpu", *sets]))
    finally:
        train.train_step = step
    train_seconds = time.perf_counter() - started
    checkpoint = list_checkpoints(cfg.save_dir)[args.epochs - 1]
    sample.main(sample.build_parser().parse_args(
        ["--config", args.config, *sets, "--device", "cpu", "--ckpt", str(checkpoint), "--n_samples", "16",
         "--steps", str(args.sample_steps), "--out_dir", os.path.join(save_dir, "samples")]))
    linear.main(linear.build_parser().parse_args(["--config", args.config, *sets, "--device", "cpu",
                                                  "--ckpt", str(checkpoint)]))
    weights = weights_digest(load_diffusion(cfg, str(checkpoint)))
    record = dict(row=row, **dict(zip(("prediction", "loss_weighting", "t_sampling"), parse_row(row))),
                  weights_sha256=weights, steps=len(losses), losses=losses,
                  first_loss=losses[0], last_loss=sum(losses[-8:]) / len(losses[-8:]),
                  probe_accuracy=probe_accuracy(cfg, str(checkpoint)), train_seconds=round(train_seconds, 1),
                  samples=os.path.relpath(os.path.join(save_dir, "samples", "grid_0.png"), out))
    if not args.keep:  # the weights, the probe's resume states and the single PNGs (grid_0.png stays)
        shutil.rmtree(os.path.join(save_dir, "ckpts"), ignore_errors=True)
        shutil.rmtree(os.path.join(save_dir, "samples", "pngs"), ignore_errors=True)
        for name in os.listdir(os.path.join(save_dir, "linear")):
            if name.endswith(".state.pth"):
                os.remove(os.path.join(save_dir, "linear", name))
    return record


def write_table(records, meta, out):
    lines = [f"# Training objectives on the demo model ({meta['date']})", "",
             f"Command: `{meta['command']}`  ", f"Code: {meta['commit']}; torch {meta['torch']}; {meta['machine']}", "",
             f"Every row: config/demo.yaml's model on {meta['train_images']} of its synthetic images (probe test: "
             f"{meta['test_images']}), batch {meta['batch_size']}, seed {meta['seed']}, {meta['epochs']} epoch(s) of "
             f"the same batches; probe "
             f"at t = {meta['timestep']}, {meta['block']}, {meta['probe_epochs']} epochs. Losses of different "
             f"targets measure different errors.", "",
             "| prediction | loss weighting | t sampling | steps | first loss | last loss (mean of 8) | probe acc. (%) "
             "| train s | weights sha256 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['prediction']} | {r['loss_weighting']} | {r['t_sampling']} | {r['steps']} | "
                     f"{r['first_loss']:.4f} | {r['last_loss']:.4f} | {r['probe_accuracy']:.2f} | {r['train_seconds']} "
                     f"| `{r['weights_sha256'][:16]}` |")
    with open(os.path.join(out, "objectives.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(records, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axis = plt.subplots(figsize=(7, 4))
    for r in records:
        axis.plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["row"], linewidth=1)
    axis.set(xlabel="step", ylabel="training loss (per target)", yscale="log", title="demo model, per-step loss")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(os.path.join(out, "objectives.png"), dpi=120)
    plt.close(figure)


def commit():
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


SUBSET = "demo_subset"  # the synthetic shapes of config/demo.yaml, --train_images / --test_images of them


def register_subset(train_images, test_images):
    data.DATASETS[SUBSET] = data.DatasetSpec(lambda root, train, transform, size: data.SyntheticImages(
        n=train_images if train else test_images, image_size=size or 16, train=train, transform=transform),
        10, layout="NCHW")


@cli_entry
def main(args):
    if min(args.epochs, args.probe_epochs, args.train_images, args.test_images) < 1:
        raise UserError("--epochs, --probe_epochs, --train_images and --test_images: pass 1 or more")
    register_subset(args.train_images, args.test_images)
    for row in args.rows:
        load_config(args.config, [*args.set, *row_overrides(row)])  # every row is checked before the first trains
    os.makedirs(args.out, exist_ok=True)
    cfg = load_config(args.config, [f"dataset={SUBSET}", *args.set])
    meta = dict(date=datetime.date.today().isoformat(), command=" ".join(["python", *sys.argv]), commit=commit(),
                torch=torch.__version__, machine=f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
                seed=cfg.seed, epochs=args.epochs, train_images=args.train_images, test_images=args.test_images,
                batch_size=cfg.batch_size, probe_epochs=args.probe_epochs, timestep=cfg.linear.timestep,
                block=cfg.linear.blockname)
    records = []
    for row in args.rows:
        records.append(run_row(args, row, args.out))
        save_json({"provenance": meta, "rows": records}, os.path.join(args.out, "objectives.json"))
        write_table(records, meta, args.out)
    plot(records, args.out)
    print(json.dumps([{k: r[k] for k in ("row", "last_loss", "probe_accuracy", "weights_sha256")} for r in records],
                     indent=1))


if __name__ == "__main__":
    main(build_parser().parse_args())
