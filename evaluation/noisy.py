"""The model side of the noise-conditional classifiers: noising images at a level, and test accuracy
per level (the levels, result files and plots: ``utils/noisy.py``).

    noiser = ImageNoiser("DDPM", device)
    x_t, condition = noiser.training_batch(x)            # x in [-1, 1], a random level per image
    accuracy, total = accuracy_per_level(classify, test_loader, noiser.levels, device)
"""
import torch
from torch import nn

from evaluation.accuracy import AccuracyCounter
from evaluation.frozen import to_device
from model.edm import EDM, karras_schedule
from model.schedules import make_schedule
from utils.noisy import EDM_STEPS, MODES, eval_levels
from utils.progress import batches


def edm_sigmas(steps=EDM_STEPS):
    """(steps + 1,) float32 noise levels of EDM's default schedule reversed: index 0 is 0 (no
    noise), 1 is sigma_min and ``steps`` is sigma_max, as EDM.get_feature indexes them."""
    return karras_schedule(steps).flip(0).to(torch.float32)


class ImageNoiser:
    """Noise [-1, 1] images for the WRN baseline and give the network's conditioning value.

    DDPM: x_t = sqrt(alphabar_t) x + sqrt(1 - alphabar_t) eps with the "DDPM" schedule of
    model/ddpm.py (betas linear in [1e-4, 0.02], n_T = 1000); conditioning t / n_T. Training draws
    t ~ U{1..n_T} per image.
    EDM: x + sigma eps; conditioning ln(sigma). Training draws ln(sigma) ~ N(p_mean, p_std^2) with
    EDM's defaults (-1.2, 1.2); testing uses the reversed 18-step schedule (``edm_sigmas``).

    Args:
        mode: "DDPM" or "EDM".
        device: where the schedule lives (that of the images).
    """

    def __init__(self, mode, device="cpu"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.levels = eval_levels(mode)
        if mode == "DDPM":
            self.n_T = 1000
            schedule = make_schedule(1e-4, 0.02, self.n_T, leading_zero=True)
            self.sqrtab = schedule["sqrtab"].to(device)  # (n_T + 1,)
            self.sqrtmab = schedule["sqrtmab"].to(device)
        else:
            edm = EDM(nn.Identity())
            self.p_mean, self.p_std = edm.p_mean, edm.p_std
            self.sigmas = edm_sigmas().to(device)  # (19,)

    def noise_ddpm(self, x, t, noise):
        """(x_t, t / n_T) for (B,) integer timesteps ``t``."""
        x_t = self.sqrtab[t].view(-1, 1, 1, 1) * x + self.sqrtmab[t].view(-1, 1, 1, 1) * noise
        return x_t, t.float() / self.n_T

    @staticmethod
    def noise_edm(x, sigma, noise):
        """(x + sigma noise, ln sigma) for (B,) noise levels ``sigma``."""
        return x + sigma.view(-1, 1, 1, 1) * noise, sigma.log()

    def training_batch(self, x, noise=None, rnd=None):
        """Noise every image at its own random level.

        Args:
            x: (B, C, H, W) images in [-1, 1].
            noise: (B, C, H, W) standard-normal noise; fresh when None.
            rnd: the per-image draw behind the level, (B,): DDPM integer timesteps, EDM standard
                normals behind ln(sigma); fresh when None.

        Returns:
            (noisy images (B, C, H, W), conditioning (B,)).
        """
        noise = torch.randn_like(x) if noise is None else noise
        batch_size = x.shape[0]
        if self.mode == "DDPM":
            t = torch.randint(1, self.n_T + 1, (batch_size,), device=x.device) if rnd is None else rnd
            return self.noise_ddpm(x, t, noise)
        rnd = torch.randn(batch_size, device=x.device) if rnd is None else rnd
        return self.noise_edm(x, (rnd * self.p_std + self.p_mean).exp(), noise)

    def test_batch(self, x, level, noise=None):
        """Noise every image at the reported level ``level`` (a DDPM timestep or an EDM index).

        Returns:
            (noisy images (B, C, H, W), conditioning (B,)).
        """
        noise = torch.randn_like(x) if noise is None else noise
        index = torch.full((x.shape[0],), level, dtype=torch.long, device=x.device)
        if self.mode == "DDPM":
            return self.noise_ddpm(x, index, noise)
        return self.noise_edm(x, self.sigmas[index], noise)


@torch.no_grad()
def accuracy_per_level(classify, loader, levels, device):
    """Test accuracy at each noise level, every test image counted exactly once over all processes.

    The loader is read once; each batch is classified at every level, with fresh noise each time.

    Args:
        classify: ``classify(images, level) -> logits (B, classes)`` for images (B, C, H, W) in
            [0, 1] on ``device`` and one reported level (int).
        loader: this process's shard of the test set (``build_loader(..., train=False)``).
        levels: the reported levels.
        device: where the images and counts go.

    Returns:
        (accuracies in percent, one per level; the number of test images counted).
    """
    counter = AccuracyCounter(len(levels), device)
    for images, labels in batches(loader, f"testing at {len(levels)} noise levels"):
        images, labels = to_device(images, labels, device)
        counter.update(torch.stack([classify(images, level) for level in levels]), labels)  # (L, B, classes)
    return counter.reduce()
