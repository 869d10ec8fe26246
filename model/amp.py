"""Mixed precision: one switch shared by every script.

``--use_amp`` keeps the original's meaning (fp16 autocast with a GradScaler on CUDA);
``--precision bf16`` uses bfloat16 autocast, which needs no scaler and also runs on CPUs.
"""
import contextlib

import torch

from utils.distributed import print0

PRECISIONS = ("fp32", "fp16", "bf16")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


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


def autocast(device, precision):
    """Autocast context for ``precision`` on ``device``; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.amp.autocast(device_type=device.type, dtype=_DTYPES[precision])


def make_grad_scaler(device, precision):
    """A GradScaler that is active only for fp16 (bf16 and fp32 need no loss scaling)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
