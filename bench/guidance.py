"""Does a model's own DDAE head guide its sampling? sample.py with and without --classifier_head on one seed, then
the same head assigns each image a class: the rate of class K among images guided toward K against the rate of K
among the unguided ones (the same seeds), and the mean log p(K | image) by the head. A measurement, minutes on a CPU on the demo model; not a test.

    python bench/guidance.py --config config/demo.yaml --ckpt output_demo/ckpts/model_14.pth \\
        --head output_demo/noisy_DDAE_ep14_sha.../head.pth --scales 2 8 --n_samples 100 --out bench/results/guidance

Each image is classified by the head at timestep --level (default 1: nearly clean) with noise of a fixed seed,
through the features noisy_classifier_DDAE.py trained it on. Writes {out}/guidance.md and guidance.json; the
sample folders go to --work (the config's save_dir by default), named as sample.py names them.
"""
import argparse
import datetime
import os
import platform
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sample  # noqa: E402
from evaluation.features import extract_features  # noqa: E402
from model.guidance import load_head_guidance  # noqa: E402
from model.models import load_config, load_diffusion  # noqa: E402
from model.noise import PerImageNoise  # noqa: E402
from utils.errors import cli_entry  # noqa: E402
from utils.logging import save_json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "config", "demo.yaml"))
    parser.add_argument("--ckpt", required=True, help="the DDPM checkpoint the head was trained on")
    parser.add_argument("--head", required=True, help="its head.pth from noisy_classifier_DDAE.py")
    parser.add_argument("--classes", nargs="+", type=int, default=None, help="classes K to guide toward (default all)")
    parser.add_argument("--scales", nargs="+", type=float, default=[4.0], help="guidance scales S")
    parser.add_argument("--n_samples", type=int, default=100, help="images per (K, S) and unguided")
    parser.add_argument("--steps", type=int, default=100, help="DDIM steps")
    parser.add_argument("--level", type=int, default=1, help="the timestep the head classifies the images at")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="where the sample folders go (default: the config's save_dir)")
    parser.add_argument("--out", required=True, help="folder of guidance.md and guidance.json")
    return parser


def sample_folder(args, *flags):
    """Run sample.py as a user does; returns its output folder."""
    work = ["--set", f"save_dir={args.work}"] if args.work else []
    argv = ["--config", args.config, "--ckpt", args.ckpt, "--device", "cpu", "--n_samples", str(args.n_samples),
            "--steps", str(args.steps), "--seed", str(args.seed), "--batch_size", "50", *work, *map(str, flags)]
    print("$ python sample.py " + " ".join(argv), flush=True)
    return sample.main(sample.build_parser().parse_args(argv))["out_dir"]


def read_images(folder, n):
    pixels = [np.array(Image.open(os.path.join(folder, "pngs", f"{i}.png")).convert("RGB")) for i in range(n)]
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255  # (N, C, H, W) in [0, 1]


@torch.no_grad()
def head_log_probs(guidance, diffusion, images, level, seed):
    """The head's (N, classes) log-probabilities of each image, at timestep ``level`` with noise of image i's own seed."""
    noise = PerImageNoise([seed + i for i in range(len(images))], CPU)(tuple(images.shape[1:]))
    features = extract_features(diffusion, images, level, guidance.blockname, noise=noise)[guidance.blockname]
    levels = torch.full((len(images),), level, dtype=torch.long)
    return torch.log_softmax(guidance.head(features, levels), dim=1)


@cli_entry
def main(args):
    cfg = load_config(args.config, [f"save_dir={args.work}"] if args.work else [])
    diffusion = load_diffusion(cfg, args.ckpt, weights="ema", device=CPU)
    guidance, record = load_head_guidance(args.head, args.ckpt, diffusion, 0, 1.0)
    classes = args.classes if args.classes is not None else list(range(cfg.classes))

    unguided_log_p = head_log_probs(guidance, diffusion, read_images(sample_folder(args), args.n_samples), args.level,
                                    args.seed)
    unguided = unguided_log_p.argmax(dim=1)
    base = {k: float((unguided == k).float().mean()) for k in classes}
    base_log_p = {k: float(unguided_log_p[:, k].mean()) for k in classes}
    rows = []
    for scale in args.scales:
        for k in classes:
            folder = sample_folder(args, "--classifier_head", args.head, "--class", k, "--classifier_scale", scale)
            log_p = head_log_probs(guidance, diffusion, read_images(folder, args.n_samples), args.level, args.seed)
            rows.append({"class": k, "scale": scale, "guided_rate": float((log_p.argmax(dim=1) == k).float().mean()),
                         "unguided_rate": base[k], "guided_log_p": float(log_p[:, k].mean()),
                         "unguided_log_p": base_log_p[k], "folder": folder})
            print(f"class {k}, scale {scale}: {100 * rows[-1]['guided_rate']:.1f}% assigned {k} "
                  f"(unguided {100 * base[k]:.1f}%), mean log p {rows[-1]['guided_log_p']:.3f} "
                  f"(unguided {base_log_p[k]:.3f})", flush=True)

    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    header = {"command": "python " + " ".join(sys.argv), "date": datetime.date.today().isoformat(),
              "device": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
              "commit": commit, "head": record, "checkpoint": os.path.abspath(args.ckpt), "n_samples": args.n_samples,
              "steps": args.steps, "level": args.level, "seed": args.seed}
    os.makedirs(args.out, exist_ok=True)
    save_json({"header": header, "unguided_counts": {k: int((unguided == k).sum()) for k in range(cfg.classes)},
               "rows": rows}, os.path.join(args.out, "guidance.json"))
    lines = [f"# Classifier guidance by the model's own DDAE head ({header['device']}, {header['date']})", "",
             f"`{header['command']}`", "",
             f"{args.n_samples} DDIM-{args.steps} samples per row, seed {args.seed} (the same starting noise in every "
             f"row); each image classified by the same head at timestep {args.level}; commit {commit}.", "",
             "| scale S | class K | assigned K, guided (%) | assigned K, unguided (%) | mean log p(K), guided | "
             "mean log p(K), unguided |", "|---|---|---|---|---|---|"]
    lines += [f"| {row['scale']:g} | {row['class']} | {100 * row['guided_rate']:.1f} | {100 * row['unguided_rate']:.1f} | "
              f"{row['guided_log_p']:.3f} | {row['unguided_log_p']:.3f} |" for row in rows]
    for scale in args.scales:
        mine = [row for row in rows if row["scale"] == scale]
        mean = {key: sum(r[key] for r in mine) / len(mine)
                for key in ("guided_rate", "unguided_rate", "guided_log_p", "unguided_log_p")}
        lines.append(f"| {scale:g} | mean | {100 * mean['guided_rate']:.1f} | {100 * mean['unguided_rate']:.1f} | "
                     f"{mean['guided_log_p']:.3f} | {mean['unguided_log_p']:.3f} |")
    with open(os.path.join(args.out, "guidance.md"), "w") as file:
        file.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(build_parser().parse_args())
