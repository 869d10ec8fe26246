"""The throughput benchmark of the probe's feature pass (bench/benchmark.py), and `synchronize` for timing.

    images_per_second = feature_pass_throughput(diffusion, timesteps, blocks, (3, 32, 32), batch_size=1024)
"""
import time

import torch

from evaluation.features import extract_grid_features
from evaluation.frozen import to_device


def synchronize(device):
    """Wait for the queued work on ``device`` (for timing); nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def feature_pass_throughput(diffusion, timesteps, names, image_shape, batch_size=128, precision="bf16",
                            n_batches=20, warmup=3):
    """Images per second of the probe's feature pass (all ``timesteps``, blocks up to the deepest
    of ``names``) on random images, on the device the model is on.

    Args:
        diffusion: a frozen model, e.g. from ``prepare_frozen``.
        timesteps, names: the cells, as for ``extract_grid_features``.
        image_shape: (C, H, W) of one image.
        batch_size: images per batch (each goes through the network once per timestep).
        precision: autocast precision.
        n_batches, warmup: timed and untimed batches.

    Returns:
        images per second (each image counted once, whatever the number of timesteps).
    """
    device = next(diffusion.parameters()).device
    images, _ = to_device(torch.rand(batch_size, *image_shape), torch.zeros(0), device)
    for _ in range(warmup):
        extract_grid_features(diffusion, images, timesteps, names, precision=precision)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(n_batches):
        extract_grid_features(diffusion, images, timesteps, names, precision=precision)
    synchronize(device)
    return batch_size * n_batches / (time.perf_counter() - start)
