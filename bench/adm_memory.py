"""Seconds per image and peak memory of an ADM feature pass on the CPU, random weights at the real size
(config/ADM_guided_256_uncond.yaml: 552.8M values), one fresh process per (block, precision) so that each
peak resident size (``resource.getrusage``) is that setting's own.

    python bench/adm_memory.py --out bench/results/cpu-2026-12-05-adm/feature_pass.md

The pass is the probe's (``evaluation.features.extract_features``: noise to t, run to the deepest requested
block, pool); a block early in the network stops there. No weights are downloaded.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from evaluation.features import extract_features  # noqa: E402
from model.models import build_diffusion, count_parameters, load_config  # noqa: E402


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "config" / "ADM_guided_256_uncond.yaml"))
    parser.add_argument("--blocks", default="input_4,output_5,output_17", help="comma-separated blocks, one run each")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes after one untimed pass")
    parser.add_argument("--timestep", type=int, default=11)
    parser.add_argument("--out", default=None, help="a markdown file for the table (default: print only)")
    parser.add_argument("--one", nargs=2, metavar=("BLOCK", "PRECISION"), help=argparse.SUPPRESS)
    return parser


def measure(args, block, precision):
    """One setting in this process: {"block", "precision", "s_per_image", "peak_rss_gib", "params"}."""
    torch.manual_seed(0)
    cfg = load_config(args.config)
    diffusion = build_diffusion(cfg).eval().requires_grad_(False)
    images = torch.rand(args.batch, *cfg.image_shape)
    extract_features(diffusion, images, args.timestep, [block], precision=precision)  # untimed
    start = time.perf_counter()
    for _ in range(args.repeats):
        extract_features(diffusion, images, args.timestep, [block], precision=precision)
    seconds = (time.perf_counter() - start) / (args.repeats * args.batch)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"block": block, "precision": precision, "s_per_image": seconds, "peak_rss_gib": peak_kib / 2 ** 20,
            "params": count_parameters(diffusion.nn_model)}


def main(args):
    if args.one:
        print(json.dumps(measure(args, *args.one)))
        return None
    rows = []
    for precision in args.precisions.split(","):
        for block in args.blocks.split(","):
            command = [sys.executable, __file__, "--config", args.config, "--batch", str(args.batch), "--repeats",
                       str(args.repeats), "--timestep", str(args.timestep), "--one", block, precision]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    lines = [f"ADM feature pass on the CPU ({os.cpu_count()} cores, shared), {Path(args.config).name}, "
             f"{rows[0]['params'] / 1e6:.1f}M values, random weights, batch {args.batch}, t = {args.timestep}, "
             f"{args.repeats} timed passes after one untimed; torch {torch.__version__}.", "",
             "    python bench/adm_memory.py " + " ".join(sys.argv[1:]), "",
             "| block (runs to) | precision | s / image | peak RSS (GiB) |", "|---|---|---|---|"]
    lines += [f"| {r['block']} | {r['precision']} | {r['s_per_image']:.2f} | {r['peak_rss_gib']:.2f} |" for r in rows]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main(build_parser().parse_args())
