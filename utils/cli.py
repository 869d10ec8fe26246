"""Command-line switches shared by the scripts, and the functions that read them.

    add_amp_args(parser); add_speed_args(parser); add_checkpoint_args(parser)
    precision = resolve_precision(args, device)     # "fp32", "fp16" or "bf16"
    configure_backends(args, device)                # --cudnn_benchmark, the --channels_last note
    path = checkpoint_from_args(cfg, args)          # --ckpt, else save_dir/ckpts/model_{--epoch}.pth

The maths in model/ takes the values these produce (a precision, a compile mode, a path), never ``args``.
"""
import os

import torch

from utils.checkpoint import pretrained_dit_path, resolve_checkpoint
from utils.distributed import print0
from utils.errors import UserError

PRECISIONS = ("fp32", "fp16", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
FEATURE_PASS = "torch.compile the feature pass (faster on GPUs after a slow first batch)"


def add_amp_args(parser):
    parser.add_argument("--use_amp", action="store_true",
                        help="fp16 autocast with a GradScaler (the original's AMP); CUDA only")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="autocast precision; overrides --use_amp (bf16 also works on CPU)")


def resolve_precision(args, device):
    """Turn ``--use_amp`` / ``--precision`` into one of PRECISIONS for ``device``."""
    precision = args.precision or ("fp16" if args.use_amp else "fp32")
    if precision == "fp16" and device.type != "cuda":
        print0(f"note: fp16 autocast needs CUDA; running in fp32 on {device.type} "
               "(pass --precision bf16 for bfloat16 autocast on CPU)")
        precision = "fp32"
    return precision


def add_speed_args(parser, compile_help=FEATURE_PASS):
    """``--compile [MODE]`` and ``--cudnn_benchmark``; ``compile_help`` says what gets compiled (by
    default the frozen network's feature pass, as in the evaluation scripts)."""
    parser.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                        metavar="MODE",
                        help=f"{compile_help}. MODE is one of {', '.join(COMPILE_MODES)}; --compile alone is "
                             f"default. reduce-overhead and max-autotune add CUDA graphs on GPUs")
    parser.add_argument("--cudnn_benchmark", action="store_true",
                        help="let cuDNN time its convolution algorithms on the first batch of each shape and "
                             "keep the fastest (GPU speed; results stop being bitwise repeatable between runs)")


def configure_backends(args, device):
    """Apply ``--cudnn_benchmark`` for this process (a no-op off CUDA), and warn about a
    ``--channels_last`` that will slow a CPU run down."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(getattr(args, "cudnn_benchmark", False))
    elif getattr(args, "channels_last", False):
        print0(f"note: --channels_last makes GroupNorm several times slower on {device.type} "
               f"(bench/README.md); it pays on GPUs only")


def add_checkpoint_args(parser):
    """``--epoch`` (the original's flag) and ``--ckpt`` (any checkpoint file) for evaluation scripts."""
    parser.add_argument("--epoch", type=int, default=-1,
                        help="use save_dir/ckpts/model_{epoch}.pth; -1 means n_epoch - 1")
    parser.add_argument("--ckpt", default=None,
                        help="checkpoint file to evaluate instead of --epoch (ours or the original code's), or a "
                             "diffusers UNet2DModel folder such as google/ddpm-cifar10-32 (README)")


def checkpoint_from_args(cfg, args):
    """Path of the checkpoint an evaluation script should read: ``--ckpt``, else ``--epoch`` (for a
    DiT config: its ``ckpt``, which must exist)."""
    if hasattr(cfg, "ckpt"):  # a utils.latents.DiTConfig
        return pretrained_dit_path(args.ckpt or cfg.ckpt)
    if args.ckpt:
        if os.path.isdir(args.ckpt):
            return os.path.normpath(args.ckpt)  # a diffusers folder, checked by its loader; no trailing "/"
        if not os.path.isfile(args.ckpt):
            raise UserError(f"--ckpt {args.ckpt}: file not found; pass an existing checkpoint file, or a diffusers "
                            f"folder (`hf download google/ddpm-cifar10-32 --local-dir weights/ddpm-cifar10-32` "
                            f"fetches the official DDPM CIFAR-10 one), or drop --ckpt to read "
                            f"save_dir/ckpts/model_{{epoch}}.pth by --epoch")
        return args.ckpt
    return resolve_checkpoint(cfg.save_dir, args.epoch, cfg.n_epoch)


FEATURE_LABELS = ("null", "true")


def add_feature_label_arg(parser):
    """``--feature_label null|true``: which label a conditional model's features are read with."""
    parser.add_argument("--feature_label", choices=FEATURE_LABELS, default="null",
                        help="conditional models (network.n_classes): read the features with the null label "
                             "('null', default: the model as an unconditional one, the DDAE protocol) or with each "
                             "image's true label ('true': the label is an input, so the probe sees it; for comparison)")
