"""The one registry from config names to classes, and the one loader every script uses."""
import contextlib
import os

import torch

from model.ddpm import DDPM
from model.diffusers_unet import load_diffusers_folder
from model.dit import DiT, DiTDiffusion
from model.edm import EDM
from model.unet import UNet
from utils.checkpoint import load_checkpoint, strip_module_prefix
from utils.errors import UserError

MODEL_TYPES = {"DDPM": DDPM, "EDM": EDM, "DiT": DiTDiffusion}
NET_TYPES = {"UNet": UNet, "DiT": DiT}


def build_network(cfg):
    """The denoising network of ``cfg`` (``net_type`` with the ``network`` section as keywords)."""
    return NET_TYPES[cfg.net_type](**cfg.network_kwargs())


def build_diffusion(cfg):
    """The diffusion wrapper of ``cfg`` (``model_type``) around a freshly initialised network."""
    return MODEL_TYPES[cfg.model_type](build_network(cfg), **cfg.diffusion_kwargs())


def diffusion_state_dict(checkpoint, weights="ema", network_keys=()):
    """Pick the diffusion module's state dict (keys ``nn_model.*``) out of a checkpoint.

    Reads our checkpoints, the original code's ({'MODEL': DDP keys 'module.nn_model.*',
    'EMA': ema-pytorch state}) and a bare network state dict such as facebookresearch/DiT's
    released files (their EMA weights), recognised by sharing a key with ``network_keys``.
    ``weights`` is "ema" or "online".
    """
    if weights not in ("ema", "online"):
        raise ValueError(f"weights must be 'ema' or 'online', got {weights!r}")
    if weights == "ema" and "EMA" in checkpoint:
        prefix = "ema_model."
        return {k[len(prefix):]: v for k, v in checkpoint["EMA"].items() if k.startswith(prefix)}
    if "MODEL" in checkpoint:
        return strip_module_prefix(checkpoint["MODEL"])
    if any(k.startswith(("nn_model.", "module.nn_model.")) for k in checkpoint):
        return strip_module_prefix(checkpoint)  # a bare diffusion state dict
    if all(torch.is_tensor(v) for v in checkpoint.values()) and not set(checkpoint).isdisjoint(network_keys):
        return {f"nn_model.{k}": v for k, v in checkpoint.items()}  # a bare network state dict
    raise KeyError("EMA" if weights == "ema" else "MODEL")


def load_weights(diffusion, path, weights="ema", checkpoint=None):
    """Load ``weights`` from the checkpoint at ``path`` into ``diffusion``, or raise a UserError
    naming the file and the first key that does not fit."""
    checkpoint = load_checkpoint(path) if checkpoint is None else checkpoint
    expected = diffusion.state_dict()
    network_keys = {key.removeprefix("nn_model.") for key in expected}
    try:
        state = diffusion_state_dict(checkpoint, weights, network_keys)
    except KeyError as missing:
        raise UserError(f"{path}: no {missing} entry; expected a checkpoint written by train.py "
                        f"(top-level keys MODEL / EMA / opt) or the network's state dict, found keys "
                        f"{sorted(checkpoint)[:6]}") from None
    for key, value in expected.items():
        if key not in state:
            raise UserError(f"{path}: key {key!r} is missing; the checkpoint was made for another "
                            "network than the config describes (check --config)")
        if tuple(state[key].shape) != tuple(value.shape):
            raise UserError(f"{path}: key {key!r} has shape {tuple(state[key].shape)} in the checkpoint "
                            f"but {tuple(value.shape)} in the config's network (check --config)")
    extra = [k for k in state if k not in expected]
    if extra:
        raise UserError(f"{path}: unexpected key {extra[0]!r}; the checkpoint was made for another "
                        "network than the config describes (check --config)")
    check_schedule(diffusion, checkpoint, path)
    diffusion.load_state_dict(state, strict=True)
    return diffusion


def _plain(value):
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else float(value)


def check_schedule(diffusion, checkpoint, path):
    """Refuse a diffusion section (n_T, betas, sigmas ...) other than the one the checkpoint was trained
    with: the weights fit, but the schedule they learnt would silently change (e.g. --set diffusion.n_T=100
    on a 1000-step model). Checkpoints without a config (the original code's) are not checked."""
    saved = (checkpoint.get("config") or {}).get("diffusion") or {}
    for key, trained in saved.items():
        current = getattr(diffusion, key, None)
        if current is None or isinstance(trained, (str, bool, dict)):
            continue
        if _plain(current) != _plain(trained):
            raise UserError(f"{path} was trained with diffusion.{key} = {trained}, but the config gives "
                            f"{current}; the model only knows its training schedule: drop the --set "
                            f"diffusion.{key} override, or use that run's config")


def load_diffusion(cfg, path, weights="ema", device="cpu"):
    """Build the model of ``cfg``, load ``weights`` from ``path``, move it to ``device``, eval mode.
    A folder ``path`` is a diffusers UNet2DModel (model/diffusers_unet.py; its one set of weights)."""
    if os.path.isdir(path):
        diffusion = load_diffusers_folder(cfg, path)
    else:
        diffusion = load_weights(build_diffusion(cfg), path, weights)
    return diffusion.to(device).eval().requires_grad_(False)


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def feature_dims(diffusion, image_shape):
    """Channel count of every block (UNet ``out_k``, DiT ``layer-k``), found with one tiny forward pass.

    The pass runs eagerly even when the network was compiled, so that its batch of one costs no
    compilation of its own and does not make the compiled graph's batch size dynamic.
    """
    net = diffusion.nn_model
    device = next(net.parameters()).device
    x = torch.zeros(1, *image_shape, device=device)
    eager = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") \
        else contextlib.nullcontext()  # torch < 2.6 has no stances
    with torch.no_grad(), eager:
        feats = net.forward_features(x, torch.zeros(1, device=device), net.block_names)
    return {name: f.shape[net.feature_axis] for name, f in feats.items()}
