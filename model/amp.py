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


def autocast_off(device):
    """A context in which an enclosing autocast on ``device`` is off (a no-op where autocast does not exist)."""
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.amp.autocast(device_type=device.type, enabled=False)


@contextlib.contextmanager
def network_only(device):
    """Turn off an enclosing autocast for the code inside; yields a function that returns a context
    re-entering that autocast, for the network's call alone (a no-op when there was none).

    EDM's training step, as the original's: the augmentation, the preconditioning and the loss stay in
    float32 whatever precision the network runs in.
    """
    if not torch.amp.is_autocast_available(device.type) or not torch.is_autocast_enabled(device.type):
        yield contextlib.nullcontext
        return
    dtype = torch.get_autocast_dtype(device.type)
    with autocast_off(device):
        yield lambda: torch.amp.autocast(device_type=device.type, dtype=dtype)


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
