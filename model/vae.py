"""The Stable Diffusion VAE that turns images into DiT latents (diffusers' AutoencoderKL), from a local folder.

    vae = load_vae("pretrained/sd-vae-ft-mse")
    latents = encode_images(vae, images, seeds, scale=0.18215, image_size=256, padding=4)

diffusers is needed for this file only.
"""
import os

import torch
import torch.nn.functional as F

from model.amp import autocast
from utils.errors import UserError, describe_error

VAE_REPO = "stabilityai/sd-vae-ft-mse"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _where_to_get(folder):
    return (f"download {VAE_REPO} (huggingface-cli download {VAE_REPO} --local-dir {folder}, or the files of "
            f"https://huggingface.co/{VAE_REPO}) and put it at {folder}, or set latents.vae")


def check_vae_folder(folder):
    """Raise a UserError saying where to get the VAE when ``folder`` lacks config.json or the weights."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise UserError(f"VAE folder {folder} not found (it holds config.json and {WEIGHT_FILES[0]}); "
                        f"{_where_to_get(folder)}")
    if not any(os.path.isfile(os.path.join(folder, name)) for name in WEIGHT_FILES):
        raise UserError(f"VAE folder {folder} has no {WEIGHT_FILES[0]}; {_where_to_get(folder)}")


def load_vae(folder, device="cpu"):
    """diffusers' AutoencoderKL saved in ``folder`` (config.json and the weights), in eval mode.

    Raises:
        UserError: the folder or its files are missing (saying where to get them), or diffusers is not installed.
    """
    check_vae_folder(folder)
    try:
        from diffusers import AutoencoderKL
        from diffusers.utils import logging as diffusers_logging
    except ImportError:
        raise UserError("encoding latents needs diffusers: pip install diffusers") from None
    diffusers_logging.set_verbosity_error()  # a missing file is our one-line error, not its log lines
    try:
        vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError) as err:
        raise UserError(f"VAE folder {folder} is incomplete or damaged ({describe_error(err)}); "
                        f"{_where_to_get(folder)}") from None
    return vae.to(device).eval().requires_grad_(False)


def augment(image, generator, padding):
    """Random horizontal flip, then RandomCrop back to the image's size from a zero padding of
    ``padding`` pixels; every draw from ``generator``. ``image`` (C, H, W)."""
    height, width = image.shape[1:]
    if torch.rand((), generator=generator) < 0.5:
        image = image.flip(-1)
    top, left = torch.randint(0, 2 * padding + 1, (2,), generator=generator).tolist()
    padded = F.pad(image, (padding, padding, padding, padding))
    return padded[:, top:top + height, left:left + width]


@torch.no_grad()
def encode_images(vae, images, seeds, scale, image_size, padding=None, precision="fp32"):
    """Latents ``scale * z`` with z drawn from the VAE's posterior, each image from its own generator.

    Args:
        vae: an AutoencoderKL (see ``load_vae``) on the device to encode on.
        images: (B, 3, h, w) float images in [0, 1] on the CPU.
        seeds: one generator seed per image; its draws are the augmentation (when ``padding`` is
            not None) and then the posterior sample's noise, so a latent depends on its seed alone.
        scale: latent scale (0.18215 for the SD VAE).
        image_size: the images are resized (bilinear) to image_size x image_size first.
        padding: None for no augmentation, else the flip and the crop of ``augment``.
        precision: autocast precision of the VAE.

    Returns:
        (B, 4, image_size / 8, image_size / 8) float32 latents on the CPU.
    """
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    if padding is not None:
        images = torch.stack([augment(image, generator, padding) for image, generator in zip(images, generators)])
    device = next(vae.parameters()).device
    x = F.interpolate(images.to(device, torch.float32), size=(image_size, image_size), mode="bilinear",
                      align_corners=False, antialias=True)
    with autocast(device, precision):
        posterior = vae.encode(2 * x - 1).latent_dist
    mean, std = posterior.mean.float(), posterior.std.float()
    noise = torch.stack([torch.randn(tuple(mean.shape[1:]), generator=generator) for generator in generators])
    return (scale * (mean + std * noise.to(device))).cpu()
