"""The learning-rate schedule of finetune.py and the WRN baseline: linear warm-up, then a cosine to 0.

    lr = base_lr * lr_factor(step, total_steps, warm_steps)   # before optimizer step ``step`` (0-based)
"""
import math


def lr_factor(step, total_steps, warm_steps):
    """Learning-rate multiplier at optimizer step ``step`` (0-based): linear warm-up to 1 over
    ``warm_steps`` steps, then a cosine from 1 to 0 at ``total_steps`` (the WRN baseline and
    finetune.py)."""
    if step < warm_steps:
        return (step + 1) / warm_steps
    progress = (step - warm_steps) / max(1, total_steps - warm_steps)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
