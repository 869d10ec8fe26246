"""Mixed precision: autocast and the GradScaler for a precision of ``utils.cli.PRECISIONS``.

``--use_amp`` keeps the original's meaning (fp16 autocast with a GradScaler on CUDA);
``--precision bf16`` uses bfloat16 autocast, which needs no scaler and also runs on CPUs
(``utils.cli.add_amp_args`` and ``resolve_precision`` read the flags).
"""
import contextlib

import torch

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(device, precision):
    """Autocast context for ``precision`` on ``device``; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.amp.autocast(device_type=device.type, dtype=_DTYPES[precision])


def make_grad_scaler(device, precision):
    """A GradScaler that is active only for fp16 (bf16 and fp32 need no loss scaling)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def scaled_step(loss, optimizer, scaler):
    """One plain optimizer step on ``loss``: zero the gradients, backpropagate through ``scaler``
    (a no-op scale unless fp16), step (skipped by the scaler on inf/nan gradients) and update the scale."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
