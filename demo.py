"""The whole DDAE pipeline on built-in synthetic images, on a CPU, in a few minutes.

    python demo.py                 # train, sample a grid, linear-probe; outputs in ./output_demo
    python demo.py --fresh         # start over in a new folder instead of reusing a finished run

It runs the same commands a user runs on CIFAR-10 (printed as it goes), on config/demo.yaml:
train.py trains a tiny DDPM, sample.py draws a grid of samples with DDIM, and linear.py probes the
features of one (timestep, block) twice: on the trained network, and on a randomly initialised
network of the same shape. A diffusion model that learned something gives the better probe.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

from evaluation.report import linear_tag
from model.models import build_diffusion, load_config
from utils.checkpoint import list_checkpoints, save_checkpoint
from utils.errors import UserError, cli_entry

ROOT = os.path.dirname(os.path.abspath(__file__))
DEMO_CONFIG = os.path.join(ROOT, "config", "demo.yaml")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEMO_CONFIG, help="the demo's config")
    parser.add_argument("--save_dir", default=None, help="run folder (default: the config's save_dir)")
    parser.add_argument("--fresh", action="store_true",
                        help="train from scratch in save_dir_<time> when save_dir already holds a run")
    parser.add_argument("--n_samples", type=int, default=50, help="images in the sample grid")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps of the sample grid")
    return parser


def run(step, command):
    """Run one of the project's scripts as a user would, echoing the command."""
    print(f"\n== {step}\n$ {' '.join(command)}", flush=True)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *command], cwd=ROOT)
    if done.returncode != 0:
        raise UserError(f"{step} failed (exit code {done.returncode}); its error is printed above")
    return time.perf_counter() - started


def last_checkpoint(cfg):
    """(epoch, path) of the run's last checkpoint (its file name gives the epoch), or (None, None)."""
    checkpoints = list_checkpoints(cfg.save_dir)
    if not checkpoints:
        return None, None
    epoch = max(checkpoints)
    return epoch, checkpoints[epoch]


def write_random_init(cfg, path):
    """A checkpoint of the untrained network (same shape, the training seed), for the baseline probe."""
    torch.manual_seed(cfg.seed)
    save_checkpoint({"MODEL": build_diffusion(cfg).state_dict()}, path)


def probe_accuracy(cfg, checkpoint):
    tag = linear_tag(cfg, checkpoint, [cfg.linear.timestep], [cfg.linear.blockname], grid=False)
    with open(os.path.join(cfg.save_dir, "linear", f"{tag}.json")) as f:
        return json.load(f)["best"]["accuracy"]


@cli_entry
def main(args):
    overrides = [] if args.save_dir is None else [f"save_dir={args.save_dir}"]
    cfg = load_config(args.config, overrides)
    if args.fresh and os.path.exists(cfg.save_dir):
        overrides = [f"save_dir={cfg.save_dir.rstrip('/')}_{time.strftime('%Y%m%d-%H%M%S')}"]
        cfg = load_config(args.config, overrides)
    common = ["--config", args.config, *[a for o in overrides for a in ("--set", o)]]
    started = time.perf_counter()

    epoch, checkpoint = last_checkpoint(cfg)
    if epoch is not None and epoch >= cfg.n_epoch - 1:
        print(f"\n== 1/4 reusing the finished run {checkpoint} (pass --fresh to train again)")
    else:
        run("1/4 train a tiny DDPM on synthetic images", ["train.py", *common, "--resume", "auto"])
        epoch, checkpoint = last_checkpoint(cfg)

    sample_dir = os.path.join(cfg.save_dir, f"demo_samples_ep{epoch}")
    run("2/4 sample a grid with DDIM", ["sample.py", *common, "--epoch", str(epoch), "--steps", str(args.steps),
                                        "--n_samples", str(args.n_samples), "--batch_size", str(args.n_samples),
                                        "--out_dir", sample_dir])

    run(f"3/4 linear probe of the trained network at t={cfg.linear.timestep}, {cfg.linear.blockname}",
        ["linear.py", *common, "--epoch", str(epoch)])

    random_init = os.path.join(cfg.save_dir, "random_init.pth")
    if not os.path.exists(random_init):
        write_random_init(cfg, random_init)
    run("4/4 the same probe on a randomly initialised network", ["linear.py", *common, "--ckpt", random_init])

    trained, baseline = probe_accuracy(cfg, checkpoint), probe_accuracy(cfg, random_init)
    print(f"\nlinear probe at t={cfg.linear.timestep}, {cfg.linear.blockname}, {cfg.linear.n_epoch} epochs:")
    print(f"  trained DDAE          {trained:6.2f}%")
    print(f"  random initialisation {baseline:6.2f}%")
    print(f"  the learned representation is {'better' if trained > baseline else 'NOT better'} "
          f"by {trained - baseline:+.2f} points")
    print(f"samples: {sample_dir}/grid_0.png   run folder: {cfg.save_dir}   "
          f"({time.perf_counter() - started:.0f} s)")
    if trained <= baseline:
        sys.exit(1)


if __name__ == "__main__":
    main(build_parser().parse_args())
