"""The one registry from config names to classes, and the one loader every script uses.

    cfg = load_config("config/DDPM_ddpm.yaml")        # the sections checked by the classes they name
    diffusion = load_diffusion(cfg, "model_1999.pth")  # built, EMA weights loaded, eval mode

``net_type`` is a name of NETWORKS or the dotted path of a class importable from PYTHONPATH
(``mypackage.nets.MyNet``): its constructor's keyword parameters are the ``network`` keys. A class
may also define ``check_settings(cfg, require)`` (cross-key checks at load time) and ``from_settings``
(how it is built from its settings, e.g. from a folder of weights). ``model_type`` names a diffusion kind
of DIFFUSIONS. What differs by kind (probe grids, samplers, timestep ranges) are methods of those classes.
"""
import contextlib
import json
import os

import torch

from model.adm import ADM
from model.ddpm import DDPM
from model.diffusers_unet import DiffusersUNet, folder_network
from model.dit import DiT, DiTDiffusion
from model.edm import EDM
from model.heads import head_class
from model.unet import UNet
from model.uvit import UViT
from utils import config
from utils.checkpoint import load_checkpoint, strip_module_prefix
from utils.config import settings_of
from utils.errors import UserError
from utils.latents import DiTConfig

DIFFUSIONS = {"DDPM": DDPM, "EDM": EDM, "DiT": DiTDiffusion}
NETWORKS = {"UNet": UNet, "DiT": DiT, "UNet2DModel": DiffusersUNet, "ADM": ADM, "UViT": UViT}


def network_class(net_type, path="net_type"):
    """The network class ``net_type`` names: one of NETWORKS, or ``package.module.Class``."""
    return config.import_class(net_type, NETWORKS, "net_type", path, "network class (a torch.nn.Module)",
                               base=torch.nn.Module)


def diffusion_class(model_type, path="model_type"):
    """The diffusion class ``model_type`` names: one of DIFFUSIONS, or ``package.module.Class``."""
    return config.import_class(model_type, DIFFUSIONS, "model_type", path, "diffusion class (a torch.nn.Module)",
                               base=torch.nn.Module)


def _parts(section, name, path):
    """``utils.config.load_config``'s ``parts``: the class taking a section, and its non-key parameters."""
    if section == "network":
        return network_class(name, path), 0
    if section == "linear.head_args":
        return head_class(name, path), 2  # a head's first parameters are its channels and classes
    return diffusion_class(name, path), 1  # the first parameter is the network


def _check_probe(cfg, require):
    """The probe's timestep and block, which the diffusion kind and the network decide; sets
    ``cfg.image_shape``, the (C, H, W) the network takes."""
    cfg.image_shape = _meta_network(cfg)[2]
    low, top, what = diffusion_class(cfg.model_type).feature_timesteps(cfg.diffusion)
    require(low <= cfg.linear.timestep <= top, "linear.timestep",
            f"must be in {low}..{top} ({what}), got {cfg.linear.timestep}")
    blocks = block_names(cfg)
    require(cfg.linear.blockname in blocks, "linear.blockname",
            f"must name a block of this network ({', '.join(blocks)}), got {cfg.linear.blockname!r}")


def load_config(path, overrides=(), flags=None, allow_dit=False):
    """``utils.config.load_config`` (same arguments) with the ``network`` and ``diffusion`` sections
    checked against the classes that ``net_type`` and ``model_type`` name."""
    return config.load_config(path, overrides, flags, allow_dit, parts=_parts, check=_check_probe,
                              kinds={"DiT": DiTConfig}, fill=_fill_probe)


def _fill_probe(raw):
    """The probe cell of a file that names none (FutureXiang/Diffusion's configs have no ``linear`` section):
    ``linear.timestep`` / ``linear.blockname`` from the network class's ``probe_defaults(network)``, if it has
    one (a registered class; the config's checks then see the values as if the file gave them)."""
    cls = NETWORKS.get(raw.get("net_type")) if isinstance(raw.get("net_type"), str) else None
    network, linear = raw.get("network"), raw.get("linear", {})
    if hasattr(cls, "probe_defaults") and isinstance(network, dict) and isinstance(linear, dict):
        for key, value in cls.probe_defaults(network).items():
            raw.setdefault("linear", linear).setdefault(key, value)


def on_latents(cfg):
    """Whether ``cfg``'s diffusion kind works on cached VAE latents (``utils.latents.latent_datasets``)."""
    return getattr(diffusion_class(cfg.model_type), "on_latents", False)


def build_network(cfg):
    """The denoising network of ``cfg`` (``net_type`` with the ``network`` section as keywords)."""
    cls = network_class(cfg.net_type)
    return cls.from_settings(**cfg.network_kwargs()) if hasattr(cls, "from_settings") else cls(**cfg.network_kwargs())


def build_diffusion(cfg, network=None):
    """The diffusion wrapper of ``cfg`` (``model_type``) around ``network``, by default ``build_network(cfg)``."""
    network = build_network(cfg) if network is None else network
    return diffusion_class(cfg.model_type)(network, **cfg.diffusion_kwargs())


def block_names(cfg, grid=False):
    """The probe-able block names of ``cfg``'s network (``grid``: those ``--grid`` probes by default, the
    network's ``grid_blocks`` if it has them), read from one built on the meta device (no memory)."""
    return _meta_network(cfg)[1 if grid else 0]


def _meta_network(cfg):
    """(block_names, grid_blocks, image_shape) of ``cfg``'s network, built once on the meta device."""
    key = (cfg.net_type, json.dumps(cfg.network, sort_keys=True, default=str))
    if key not in _META_NETWORKS:
        with torch.device("meta"):
            net = build_network(cfg)
        for name in ("block_names", "image_shape", "feature_axis"):
            if not hasattr(net, name):
                raise UserError(f"net_type {cfg.net_type}: the network has no attribute {name!r}; give it the "
                                f"network contract of docs/DESIGN.md (forward_features, block_names, feature_axis, "
                                f"image_shape)")
        _META_NETWORKS[key] = (list(net.block_names), list(getattr(net, "grid_blocks", net.block_names)),
                             tuple(net.image_shape))
    return _META_NETWORKS[key]


_META_NETWORKS = {}


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


# A key only each kind of network has, and how to evaluate a checkpoint of that kind.
NETWORK_MARKS = {
    "DiT": ("x_embedder.proj.weight", "a config with model_type: DiT (e.g. config/DiT_XL_2_cifar.yaml), in "
                                      "linear.py, knn.py or export_features.py"),
    "UNet": ("image_proj.weight", "the DDPM or EDM config it was trained with (e.g. config/DDPM_ddpm.yaml)"),
    "ADM": ("input_blocks.0.0.weight", "an ADM config with the file's flags, e.g. config/ADM_improved_cifar10.yaml "
                                       "for cifar10_uncond_50M_500K.pt, config/ADM_guided_256_uncond.yaml for "
                                       "256x256_diffusion_uncond.pt"),
    "UViT": ("mid_block.norm1.weight", "a UViT config, e.g. config/cifar_unconditional_vit.yaml"),
}


def network_kind(keys):
    """"DiT" or "UNet" when ``keys`` (a state dict's, with or without "nn_model."/"module." prefixes) hold
    that network's mark, else None."""
    names = {key.removeprefix("module.").removeprefix("ema_model.").removeprefix("nn_model.") for key in keys}
    return next((kind for kind, (mark, _) in NETWORK_MARKS.items() if mark in names), None)


def refuse_other_network(checkpoint, expected, path):
    """Raise a UserError when the checkpoint holds the other kind of network than the state dict ``expected``."""
    state = checkpoint.get("EMA") or checkpoint.get("MODEL") or checkpoint
    held, wanted = network_kind(state), network_kind(expected)
    if held and wanted and held != wanted:
        raise UserError(f"{path} holds {held} weights, but the config describes a {wanted} network; evaluate it "
                        f"with {NETWORK_MARKS[held][1]}")


def load_weights(diffusion, path, weights="ema", checkpoint=None, origin=None, resume=False):
    """Load ``weights`` from the checkpoint at ``path`` into ``diffusion``, or raise a UserError
    naming the file and the first key that does not fit (``origin``, ``resume``: see ``check_schedule``)."""
    checkpoint = load_checkpoint(path) if checkpoint is None else checkpoint
    expected = diffusion.state_dict()
    network_keys = {key.removeprefix("nn_model.") for key in expected}
    refuse_other_network(checkpoint, expected, path)
    try:
        state = diffusion_state_dict(checkpoint, weights, network_keys)
    except KeyError as missing:
        raise UserError(f"{path}: no {missing} entry; expected a checkpoint written by train.py "
                        f"(top-level keys MODEL / EMA / opt) or the network's state dict, found keys "
                        f"{sorted(checkpoint)[:6]}") from None
    held = network_kind(state)
    fix = f"check --config; a {held} file takes {NETWORK_MARKS[held][1]}" if held else "check --config"
    for key, value in expected.items():
        if key not in state:
            raise UserError(f"{path}: key {key!r} is missing; the checkpoint was made for another "
                            f"network than the config describes ({fix})")
        if tuple(state[key].shape) != tuple(value.shape):
            raise UserError(f"{path}: key {key!r} has shape {tuple(state[key].shape)} in the checkpoint "
                            f"but {tuple(value.shape)} in the config's network ({fix})")
    extra = [k for k in state if k not in expected]
    if extra:
        raise UserError(f"{path}: unexpected key {extra[0]!r}; the checkpoint was made for another "
                        f"network than the config describes ({fix})")
    check_schedule(diffusion, checkpoint, path, origin, resume)
    diffusion.load_state_dict(state, strict=True)
    return diffusion


def _plain(value):
    if isinstance(value, (str, dict)):
        return value
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else float(value)


# What a refused training key is, in check_schedule's message (default: the schedule).
KEY_MEANINGS = {"prediction": "the network outputs its training prediction target"}


def check_schedule(diffusion, checkpoint, path, origin=None, resume=False):
    """Refuse a training setting of the ``diffusion`` section (those its class lists in ``TRAINING_KEYS``,
    e.g. DDPM's schedule, n_T, betas and prediction target; every key when it lists none) other than the one the
    checkpoint was trained with: the weights fit, but what they learnt would silently change (e.g. --set
    diffusion.n_T=100 on a 1000-step model). Sampler-only keys are free. With ``resume`` (train.py continuing
    the run) the ``TRAINING_ONLY_KEYS`` (loss weighting, timestep distribution) are refused too; sampling and
    probing ignore them. A key the saved config lacks had its default (the schedule of files older than that
    key: linear). Checkpoints without a config (the original code's) are not checked.
    ``origin`` is the config's (``cfg.origin``): the fix names the --set that gave the value, else the file."""
    saved = (checkpoint.get("config") or {}).get("diffusion")
    if not saved:
        return
    keys = getattr(type(diffusion), "TRAINING_KEYS", None)
    training_only = getattr(type(diffusion), "TRAINING_ONLY_KEYS", ()) if resume else ()
    for key, (_, default) in settings_of(type(diffusion), skip=1).items():
        if keys is not None and key not in keys and key not in training_only:
            continue
        trained, current = saved.get(key, default), getattr(diffusion, key, None)
        if current is None or isinstance(trained, bool) or trained is config.REQUIRED:
            continue
        if isinstance(trained, dict) != isinstance(current, dict) or _plain(current) != _plain(trained):
            typed = (origin or {}).get("typed", {}).get(f"diffusion.{key}")
            fix = f"drop the {typed.partition(' ')[0]} diffusion.{key} override" if typed else \
                f"set diffusion.{key}: {trained} in {origin['path']}" if origin else f"give diffusion.{key} = {trained}"
            if key in training_only:
                raise UserError(f"{path} was trained with diffusion.{key} = {trained}, but the config gives "
                                f"{current}; a resumed run keeps its training objective: {fix}, or start a new run "
                                f"in another save_dir")
            meaning = KEY_MEANINGS.get(key, "the model only knows its training schedule")
            raise UserError(f"{path} was trained with diffusion.{key} = {trained}, but the config gives "
                            f"{current}; {meaning}: {fix}, or use that run's config")


def load_diffusion(cfg, path, weights="ema", device="cpu"):
    """Build the model of ``cfg``, load ``weights`` from ``path``, move it to ``device``, eval mode.
    A folder ``path`` is a diffusers UNet2DModel that replaces the config's network (its one set of
    weights), after checks that it fits the config (model/diffusers_unet.py)."""
    if os.path.isdir(path):
        diffusion = build_diffusion(cfg, folder_network(cfg, path, block_names(cfg)))
    else:
        diffusion = load_weights(build_diffusion(cfg), path, weights, origin=getattr(cfg, "origin", None))
    return diffusion.to(device).eval().requires_grad_(False)


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def feature_dims(diffusion, image_shape):
    """Channel count of every block of ``block_names``, found with one tiny forward pass.

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
