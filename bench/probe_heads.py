"""Probe heads side by side: linear vs mlp vs attention vs fusion on the demo data, the same blocks and noise
levels, each trained by linear.py's run_probe; test accuracy and seconds per epoch, a few minutes on a CPU.

    python bench/probe_heads.py --out bench/results/probe_heads                  # random weights, demo data
    python bench/probe_heads.py --ckpt output_demo/ckpts/model_14.pth --train_images 2000 --epochs 8 --out DIR

Without --ckpt the network keeps its random initialisation (seed 0): the heads are then compared on the
features of an untrained UNet, which still separate the synthetic shapes, but say nothing about what
diffusion training adds. Each epoch's seconds include the feature pass, which every head repeats; the
column "head ms/step" times only the head's forward and backward on one batch of stored features.
Writes {out}/probe_heads.md, .json and .png.
"""
import argparse
import copy
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import linear  # noqa: E402
from evaluation.cells import probe_cells  # noqa: E402
from evaluation.features import extract_grid_features  # noqa: E402
from evaluation.frozen import prepare_frozen  # noqa: E402
from evaluation.heads import ProbeHeads  # noqa: E402
from model.heads import HEADS, head_class  # noqa: E402
from model.models import build_diffusion, feature_dims, load_config, load_diffusion  # noqa: E402
from utils.config import Settings, settings_of  # noqa: E402
from utils.data import config_splits, probe_train_transform  # noqa: E402
from utils.errors import UserError, cli_entry  # noqa: E402
from utils.logging import save_json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "config", "demo.yaml"))
    parser.add_argument("--ckpt", default=None, help="weights to probe (default: the network's random init)")
    parser.add_argument("--heads", nargs="+", default=list(HEADS), help="heads to compare, by name or import path")
    parser.add_argument("--timesteps", nargs="+", type=int, default=[11], help="noise levels of every head")
    parser.add_argument("--blocks", nargs="+", default=None, help="blocks of every head (default: the grid's)")
    parser.add_argument("--train_images", type=int, default=512)
    parser.add_argument("--test_images", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--head_lrate", type=float, default=1e-3,
                        help="Adam's rate for every head but linear (linear keeps the config's linear.lrate)")
    parser.add_argument("--width", type=int, default=64, help="linear.head_args.width of attention and fusion")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True, help="folder of probe_heads.md, .json and .png")
    return parser


def head_config(cfg, head, args):
    """``cfg`` with ``head`` as linear.head, its defaults (and --width where it has one) and its rate."""
    cfg = copy.deepcopy(cfg)
    settings = Settings({name: default for name, (_, default) in settings_of(head_class(head), skip=2).items()})
    if "width" in settings:
        settings["width"] = args.width
    cfg.linear.update(head=head, head_args=settings, n_epoch=args.epochs, batch_size=args.batch_size)
    if head != "linear":
        cfg.linear["lrate"] = args.head_lrate
    return cfg


def head_step_ms(cfg, diffusion, train_set, timesteps, blocks, repeats=9):
    """Milliseconds of one optimizer step of the heads alone (forward, backward, Adam) on one stored batch."""
    images = torch.stack([train_set[i][0] for i in range(cfg.linear.batch_size)])
    labels = torch.tensor([train_set[i][1] for i in range(cfg.linear.batch_size)])
    torch.manual_seed(cfg.seed)
    heads = ProbeHeads(feature_dims(diffusion, cfg.image_shape), timesteps, blocks, cfg.classes,
                       head_class(cfg.linear.head), cfg.linear.head_args, name=cfg.linear.head)
    features = extract_grid_features(diffusion, images, timesteps, blocks, tokens=heads.tokens)
    inputs = [features[cell] for cell in heads.cells]
    heads.check(inputs)  # (batch, classes) logits, or one line naming the head
    optimizer = torch.optim.Adam(heads.parameters(), lr=cfg.linear.lrate)
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        heads.losses(heads(inputs), labels).sum().backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return 1000 * sorted(times[1:])[repeats // 2], sum(p.numel() for p in heads.parameters())


def run_head(cfg, diffusion, splits, timesteps, blocks, head, args, out_dir):
    head_cfg = head_config(cfg, head, args)
    step_ms, parameters = head_step_ms(head_cfg, diffusion, splits[0], timesteps, blocks)
    result = linear.run_probe(head_cfg, diffusion, *splits, timesteps, blocks, CPU, out_dir, head)
    final = result["epochs"][-1]["test_accuracy"]
    seconds = [record["seconds"] for record in result["epochs"]]
    return {"head": head, "head_args": result["head_args"], "lrate": head_cfg.linear.lrate, "heads": len(final),
            "parameters": parameters, "best_accuracy": max(final.values()),
            "mean_accuracy": sum(final.values()) / len(final), "accuracy": final,
            "seconds_per_epoch": sum(seconds[1:] or seconds) / len(seconds[1:] or seconds), "head_ms_per_step": step_ms}


def markdown(rows, header):
    lines = [f"# Probe heads on the demo data ({header['device']})", "",
             f"`{header['command']}`", "",
             f"{header['weights']}; {header['train_images']} training / {header['test_images']} test images, "
             f"{header['epochs']} epochs, batch {header['batch_size']}; cells: timesteps {header['timesteps']} x "
             f"blocks {header['blocks']}; {header['threads']} CPU threads; commit {header['commit']}.", "",
             "| head | settings | lr | heads | parameters | best cell acc. (%) | mean acc. (%) | s / epoch | "
             "head ms / step |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        settings = ", ".join(f"{k}={v}" for k, v in row["head_args"].items()) or "-"
        lines.append(f"| {row['head']} | {settings} | {row['lrate']:g} | {row['heads']} | {row['parameters']:,} | "
                     f"{row['best_accuracy']:.2f} | {row['mean_accuracy']:.2f} | {row['seconds_per_epoch']:.1f} | "
                     f"{row['head_ms_per_step']:.1f} |")
    lines += ["", "A fused head (fusion) is one head over every cell: its best and mean are its one accuracy. "
              "s / epoch is the mean over the epochs after the first (one training pass with the feature pass and "
              "the test pass); head ms / step is the median of 9 steps of the heads alone on one stored batch.", ""]
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["head"] for row in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.bar(names, [row["best_accuracy"] for row in rows], label="best cell")
    left.scatter(names, [row["mean_accuracy"] for row in rows], color="black", zorder=3, label="mean over cells")
    left.set_ylabel("test accuracy (%)")
    left.legend(loc="lower right", fontsize=8)
    right.bar(names, [row["head_ms_per_step"] for row in rows])
    right.set_ylabel("head ms / step (features stored)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@cli_entry
def main(args):
    torch.set_num_threads(args.threads)
    for name in ("train_images", "test_images", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)}: must be at least 1")
    cfg = load_config(args.config)
    for head in args.heads:
        head_class(head, "--heads")
    timesteps, blocks = probe_cells(cfg, grid=True, blocks=args.blocks)
    timesteps = list(args.timesteps)
    if args.ckpt:
        diffusion = load_diffusion(cfg, args.ckpt)
        weights = f"weights {args.ckpt}"
    else:
        torch.manual_seed(0)
        diffusion = build_diffusion(cfg)
        weights = "random weights (seed 0, untrained)"
    diffusion = prepare_frozen(diffusion, CPU)
    splits = config_splits(cfg, None, probe_train_transform(cfg.image_shape[-1]))
    splits = tuple(torch.utils.data.Subset(split, range(min(n, len(split))))
                   for split, n in zip(splits, (args.train_images, args.test_images)))
    os.makedirs(args.out, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for head in args.heads:
            rows.append(run_head(cfg, diffusion, splits, timesteps, blocks, head, args, work))
            print(f"{head}: best {rows[-1]['best_accuracy']:.2f}%, {rows[-1]['seconds_per_epoch']:.1f} s/epoch, "
                  f"head {rows[-1]['head_ms_per_step']:.1f} ms/step", flush=True)
    header = {"device": f"CPU, {platform.processor() or platform.machine()}", "weights": weights,
              "command": "python bench/probe_heads.py " + " ".join(sys.argv[1:]),
              "train_images": len(splits[0]), "test_images": len(splits[1]), "epochs": args.epochs,
              "batch_size": args.batch_size, "timesteps": timesteps, "blocks": blocks, "threads": args.threads,
              "commit": commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    text = markdown(rows, header)
    with open(os.path.join(args.out, "probe_heads.md"), "w") as file:
        file.write(text)
    save_json({"header": header, "rows": rows}, os.path.join(args.out, "probe_heads.json"))
    plot(rows, os.path.join(args.out, "probe_heads.png"))
    print(text)


if __name__ == "__main__":
    main(build_parser().parse_args())
