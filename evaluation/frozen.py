"""A frozen diffusion model on its device: eval mode, no gradients, the fastest memory layout, and
optionally a compiled feature pass; batches moved to it in the same layout.

    diffusion = prepare_frozen(load_diffusion(cfg, path), device, compile=args.compile)
    images, labels = to_device(images, labels, device)
"""
import torch

from model.speed import compile_function


def use_channels_last(device):
    """Channels-last speeds up convolutions on GPUs; on CPUs it slows this network's GroupNorms down."""
    return device.type == "cuda"


def prepare_frozen(diffusion, device, compile=None):
    """Move a frozen diffusion model to ``device`` in eval mode, without gradients, in the memory
    layout that is fastest there (``use_channels_last``).

    Args:
        compile: None, or a ``utils.cli.COMPILE_MODES`` mode (True means "default") for the network's
            ``forward_features`` (what ``get_feature`` calls); the first batches then take a while
            longer (minutes on a CPU).
    """
    diffusion = diffusion.to(device).eval().requires_grad_(False)
    if use_channels_last(device):
        diffusion = diffusion.to(memory_format=torch.channels_last)
    if compile:
        net = diffusion.nn_model
        net.forward_features = compile_function(net.forward_features, "default" if compile is True else compile)
    return diffusion


def to_device(images, labels, device):
    """Move a batch to ``device`` without waiting (from pinned host memory), images in the layout
    of ``prepare_frozen``."""
    images = images.to(device, non_blocking=True)
    if use_channels_last(device):
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)
