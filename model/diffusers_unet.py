"""A diffusers UNet2DModel (google/ddpm-cifar10-32, the other Hub DDPMs, your own) as a DDAE network.

    hf download google/ddpm-cifar10-32 --local-dir weights/ddpm-cifar10-32
    python linear.py --config config/DDPM_ddpm.yaml --ckpt weights/ddpm-cifar10-32 --grid

A folder as ``--ckpt`` replaces the config's network (``model.models.load_diffusion``, checked by
``folder_network``); a config can also name one as its network, ``net_type: UNet2DModel`` with
``network: {folder: weights/ddpm-cifar10-32}`` (``DiffusersUNet.from_settings``).

A folder is read in either layout diffusers writes: a pipeline (``model_index.json``, ``unet/``,
``scheduler/``, as ``DDPMPipeline.save_pretrained``) or a bare UNet2DModel (``config.json`` and the
weights at its root, with ``scheduler_config.json`` beside them when the Hub repository has one).
Weights come from ``diffusion_pytorch_model.safetensors``, else ``.bin`` (diffusers reads it with
``torch.load(weights_only=True)``); nothing is downloaded. The folder's scheduler must be the config's
diffusion section (its beta_schedule the same ``diffusion.schedule``, the same alphabar at every step)
and predict epsilon.

Our DDPM calls its network with t / n_T for t in 1..n_T; UNet2DModel was trained on the index t - 1
of its ``alphas_cumprod``, which equals our alphabar at t. ``DiffusersUNet`` converts between the two,
and names its blocks as our UNet does (``in_k``, ``mid``, ``out_k``).

diffusers is imported only when a folder is read.
"""
import json
import os

import torch
from torch import nn

from model.blocks import BlockRecorder
from model.diffusers_sampling import SchedulerSampler
from model.schedules import make_schedule, published_index
from utils.distributed import print0
from utils.errors import UserError, describe_error
from utils.provenance import DIFFUSERS_WEIGHT_FILES

HOW_TO_GET = ("get a model with `hf download google/ddpm-cifar10-32 --local-dir weights/ddpm-cifar10-32` "
              "(older huggingface_hub: `huggingface-cli download ...`) and pass that folder")
WEIGHT_FILES = DIFFUSERS_WEIGHT_FILES
# The blocks whose internals DiffusersUNet knows (both paths are walked pair by pair to name in_k and out_k).
DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
MID_BLOCKS = ("UNetMidBlock2D", None)
# diffusers' beta_schedule -> our diffusion.schedule (model/schedules.py).
SCHEDULE_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
SCHEDULE_SETTINGS = ("betas", "n_T", "schedule")  # the diffusion keys a scheduler's schedule is compared with
SCHEDULE_TOLERANCE = 1e-4  # relative, on alphabar and 1 - alphabar (see check_scheduler)


class DiffusersUNet(nn.Module):
    """A ``diffusers.UNet2DModel`` behind our network contract (docs/DESIGN.md); ``net_type: UNet2DModel``.

    Args:
        unet: the UNet2DModel (epsilon prediction, positional time embedding, no class labels).
        n_T: the steps it was trained over (its scheduler's num_train_timesteps); ``forward`` gets t / n_T
            and feeds the network t - 1.

    ``block_names`` as our UNet's, at the places docs/DESIGN.md's Network contract gives.
    """

    feature_axis = 1  # the channels of a (B, C, H, W) activation

    def __init__(self, unet, n_T=1000, scheduler=None, scheduler_path=None):
        super().__init__()
        self.unet = unet
        self.n_T = int(n_T)
        self.scheduler = scheduler  # the folder's scheduler_config.json as a dict, or None
        self.scheduler_path = scheduler_path
        size = unet.config.sample_size
        self.image_shape = (unet.config.in_channels, *((size, size) if isinstance(size, int) else size))
        self.grid_blocks = [f"out_{k}" for k in range(1, sum(len(b.resnets) for b in unet.up_blocks) + 1)]
        self.block_names = [f"in_{k}" for k in range(1, sum(len(b.resnets) for b in unet.down_blocks) + 1)]
        self.block_names += (["mid"] if unet.mid_block is not None else []) + self.grid_blocks

    @classmethod
    def from_settings(cls, folder: str):
        """The UNet2DModel saved in ``folder`` (either layout), its weights loaded; only its config.json is
        read when built on the meta device (``model.models.block_names``)."""
        unet_folder, scheduler_path = locate(folder)
        scheduler = None if scheduler_path is None else _read_json(scheduler_path)
        steps = 1000 if scheduler is None else scheduler.get("num_train_timesteps", 1000)
        return cls(read_unet(unet_folder, weights=torch.get_default_device().type != "meta"), steps, scheduler,
                   scheduler_path or folder)

    def published_sampler(self, n_T, betas, schedule):
        """The folder's own samplers (``model.diffusers_sampling.SchedulerSampler``): DDIM and ancestral sampling
        as diffusers runs them from its scheduler config; a folder without one has the DDPM's settings
        (``n_T``, ``betas``, ``schedule``) in diffusers' names."""
        config = self.scheduler
        if config is None:
            beta_schedule = next(name for name, ours in SCHEDULE_NAMES.items() if ours == schedule)
            config = {"num_train_timesteps": n_T, "beta_start": betas[0], "beta_end": betas[1],
                      "beta_schedule": beta_schedule}
        return SchedulerSampler(config, self.scheduler_path)

    @staticmethod
    def check_settings(cfg, require):
        """``network.folder`` is a diffusers folder whose UNet and scheduler fit the config."""
        require(os.path.isdir(cfg.network.folder), "network.folder",
                f"must be a diffusers UNet2DModel folder, got {cfg.network.folder!r} (no such folder); {HOW_TO_GET}")
        check_folder(cfg, cfg.network.folder)

    def timestep_index(self, t, batch_size):
        """The UNet2DModel timestep (B,) long of our t / n_T: round(t * n_T) - 1, so that t = 1 is 0."""
        return published_index(t, self.n_T, batch_size).long()

    @staticmethod
    def _pairs(block):
        """The (resnet, attention or None) pairs of a down or up block, its resamplers, and whether they
        take ``temb`` (``downsample_type`` / ``upsample_type`` "resnet")."""
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        resamplers = getattr(block, "downsamplers", None) or getattr(block, "upsamplers", None) or []
        residual = "resnet" in (getattr(block, "downsample_type", None), getattr(block, "upsample_type", None))
        return list(zip(block.resnets, attentions)), list(resamplers), residual

    def _run(self, x, t, aug, wanted):
        """UNet2DModel.forward run pair by pair; ``wanted`` as in model/unet.py (None: the out_k)."""
        recorder = BlockRecorder(self.block_names, wanted, self.grid_blocks)
        keep, activations = recorder.keep, recorder.activations  # activations: {name: (B, C, H, W)}
        if aug is not None:
            raise ValueError("a diffusers UNet2DModel takes no augmentation labels")
        unet = self.unet
        emb = unet.time_embedding(unet.time_proj(self.timestep_index(t, x.shape[0])).to(unet.dtype))  # (B, D)
        h = unet.conv_in(x)
        skips = [h]
        for block in unet.down_blocks:
            pairs, downsamplers, resnet_type = self._pairs(block)
            for resnet, attention in pairs:
                h = resnet(h, emb)
                h = h if attention is None else attention(h)
                skips.append(h)
                if keep(h):
                    return None, activations
            for downsampler in downsamplers:
                h = downsampler(h, temb=emb) if resnet_type else downsampler(h)
            skips += [h] if downsamplers else []
        if unet.mid_block is not None and keep(h := unet.mid_block(h, emb)):
            return None, activations
        for block in unet.up_blocks:
            pairs, upsamplers, resnet_type = self._pairs(block)
            for resnet, attention in pairs:
                h = resnet(torch.cat([h, skips.pop()], dim=1), emb)
                if keep(h if attention is None else (h := attention(h))):
                    return None, activations
            for upsampler in upsamplers:
                h = upsampler(h, temb=emb) if resnet_type else upsampler(h)
        out = unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
        return out, activations

    def forward(self, x, t, aug=None, ret_activation=False):
        out, activations = self._run(x, t, aug, None)
        return (out, activations) if ret_activation else out

    def forward_features(self, x, t, names, aug=None):
        """Return ``{name: (B, C, H, W)}`` for the requested blocks; later blocks are not run."""
        return self._run(x, t, aug, names)[1]

    def stages(self, block):
        """The modules that compute ``block``, in running order, for finetune.py's layer decay:
        ``[(name, [modules])]``: "embedding", then one stage per pair, resampler and the middle block
        ("down.i", "middle", "up.i") as far as ``block`` needs."""
        unet = self.unet
        modules = [("embedding", [unet.conv_in, unet.time_embedding], False)]
        for path, blocks in (("down", unet.down_blocks), ("up", unet.up_blocks)):
            for module in blocks:
                pairs, resamplers, _ = self._pairs(module)
                modules += [(path, [m for m in pair if m is not None], True) for pair in pairs]
                modules += [(path, [resampler], False) for resampler in resamplers]
            if path == "down" and unet.mid_block is not None:
                modules.append(("middle", [unet.mid_block], True))
        blocks_left, stages = self.block_names.index(block) + 1, []
        for index, (name, group, is_block) in enumerate(modules):
            stages.append((name if name in ("embedding", "middle") else f"{name}.{index}", group))
            blocks_left -= is_block
            if blocks_left == 0:
                break
        return stages


def _read_json(path):
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot be read ({describe_error(err)}); {HOW_TO_GET}") from None


def locate(folder):
    """``(unet_folder, scheduler_config_path or None)`` of a pipeline or bare UNet folder (a UserError when the
    folder, its UNet's config.json or its weights are missing)."""
    if not os.path.isdir(folder):
        raise UserError(f"--ckpt {folder}: no such folder; {HOW_TO_GET}")
    if os.path.isfile(os.path.join(folder, "unet", "config.json")):  # DDPMPipeline.save_pretrained
        unet_folder = os.path.join(folder, "unet")
        scheduler = os.path.join(folder, "scheduler", "scheduler_config.json")
        if not os.path.isfile(scheduler):
            raise UserError(f"diffusers folder {folder} has unet/ but no scheduler/scheduler_config.json; {HOW_TO_GET}")
    elif os.path.isfile(os.path.join(folder, "config.json")):  # a bare UNet2DModel (older Hub repositories)
        unet_folder, scheduler = folder, os.path.join(folder, "scheduler_config.json")
        scheduler = scheduler if os.path.isfile(scheduler) else None
    elif os.path.isfile(os.path.join(folder, "model_index.json")):
        raise UserError(f"diffusers folder {folder} has model_index.json but no unet/config.json; {HOW_TO_GET}")
    else:
        raise UserError(f"--ckpt {folder}: a folder without model_index.json or config.json is no diffusers "
                        f"model; {HOW_TO_GET}")
    if not any(os.path.isfile(os.path.join(unet_folder, name)) for name in WEIGHT_FILES):
        raise UserError(f"diffusers folder {unet_folder} has no {WEIGHT_FILES[0]} (nor .bin); {HOW_TO_GET}")
    return unet_folder, scheduler


def check_unet_config(config, path):
    """Refuse a UNet that DiffusersUNet cannot run as the DDPM's network, naming the key."""
    def refuse(key, value, fix):
        raise UserError(f"{path}: {key} {value!r} is not supported by DDAE's diffusers wrapper; {fix}")

    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        refuse("_class_name", config["_class_name"], "only unconditional UNet2DModel folders load")
    for key, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        for block_type in config.get(key, ()):
            if block_type not in allowed:
                refuse(key[:-1], block_type, f"{key} may hold {', '.join(allowed)}")
    if config.get("mid_block_type", "UNetMidBlock2D") not in MID_BLOCKS:
        refuse("mid_block_type", config["mid_block_type"], "use UNetMidBlock2D")
    if config.get("time_embedding_type", "positional") != "positional":
        refuse("time_embedding_type", config["time_embedding_type"], "DDPM networks use 'positional'")
    for key in ("class_embed_type", "num_class_embeds"):
        if config.get(key) is not None:
            refuse(key, config[key], "class-conditional UNets are not supported")
    if config.get("out_channels", 3) != config.get("in_channels", 3):
        refuse("out_channels", config["out_channels"], "the network must predict only the noise (as many "
               "channels as in_channels)")
    if config.get("center_input_sample"):
        refuse("center_input_sample", True, "our DDPM already gives the network images in [-1, 1]")


def check_scheduler(config, path, settings):
    """Refuse a scheduler whose prediction or alphabar differ from the DDPM ``settings`` (a diffusion section)."""
    prediction = config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise UserError(f"{path}: prediction_type {prediction!r} is not supported; DDAE's DDPM predicts the "
                        f"noise (epsilon)")
    beta_schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None or beta_schedule not in SCHEDULE_NAMES:
        what = "trained_betas" if config.get("trained_betas") is not None else f"beta_schedule {beta_schedule!r}"
        raise UserError(f"{path}: {what} is not supported; use a folder whose beta_schedule is one of "
                        f"{', '.join(SCHEDULE_NAMES)}, or add the schedule to model/schedules.py")
    schedule = SCHEDULE_NAMES[beta_schedule]
    if settings.schedule != schedule:
        raise UserError(f"{path}: the folder's beta_schedule {beta_schedule!r} is diffusion.schedule {schedule!r}, "
                        f"but the config gives {settings.schedule!r}; set diffusion.schedule: {schedule} (or --set "
                        f"diffusion.schedule={schedule})")
    steps = config.get("num_train_timesteps", 1000)
    described = (f"{beta_schedule} betas {config.get('beta_start', 1e-4)} .. {config.get('beta_end', 0.02)} "
                 f"over {steps} steps")
    given = {key: settings[key] for key in SCHEDULE_SETTINGS}
    fix = f"use a config whose diffusion section describes the folder's schedule (the config gives {given})"
    if steps != settings.n_T:
        raise UserError(f"{path}: the folder's schedule ({described}) has {steps} steps but diffusion.n_T is "
                        f"{settings.n_T}; {fix}")
    from diffusers import DDPMScheduler

    theirs = DDPMScheduler.from_config(config).alphas_cumprod.float()  # index t - 1 is our t
    ours = make_schedule(*settings.betas, settings.n_T, True, settings.schedule)["alphabar_t"][1:]
    # Relative to alphabar and 1 - alphabar, but no finer than float32 resolves alphabar near 1 (~1e-7).
    error = (ours - theirs).abs() / torch.minimum(theirs, 1 - theirs).clamp(min=1e-2)
    worst = int(error.argmax())
    if error[worst] > SCHEDULE_TOLERANCE:
        raise UserError(f"{path}: the folder's schedule ({described}) differs from the config's diffusion "
                        f"section: alphabar at t = {worst + 1} is {theirs[worst]:.6g} there but {ours[worst]:.6g} "
                        f"here; {fix}")


def check_folder(cfg, folder):
    """Refuse a diffusers folder that misses a file, holds a UNet DiffusersUNet cannot run, or whose
    scheduler is not ``cfg``'s DDPM diffusion section (a folder without one is taken to have 1000 steps).
    Returns the UNet's config.json path."""
    if cfg.model_type != "DDPM":
        raise UserError(f"{folder}: a diffusers UNet2DModel folder loads with a DDPM config (model_type: "
                        f"DDPM), not {cfg.model_type}")
    unet_folder, scheduler_path = locate(folder)
    config_path = os.path.join(unet_folder, "config.json")
    check_unet_config(_read_json(config_path), config_path)
    if scheduler_path is not None:
        check_scheduler(_read_json(scheduler_path), scheduler_path, cfg.diffusion)
    elif cfg.diffusion.n_T != 1000:
        raise UserError(f"{folder} holds no scheduler_config.json, so its UNet is taken to have diffusers' "
                        f"default 1000 steps, but diffusion.n_T is {cfg.diffusion.n_T}; use n_T: 1000")
    else:
        print0(f"note: {folder} holds no scheduler_config.json; assuming the config's diffusion section "
               f"{ {key: cfg.diffusion[key] for key in SCHEDULE_SETTINGS} }")
    return config_path


def read_unet(unet_folder, weights=True):
    """The UNet2DModel of ``unet_folder`` (``weights``: loaded, else only built from its config.json)."""
    try:
        from diffusers import UNet2DModel
        from diffusers.utils import logging as diffusers_logging
    except ImportError:
        raise UserError("a diffusers folder needs diffusers: pip install diffusers") from None
    diffusers_logging.set_verbosity_error()  # a problem is our one-line error, not its log lines
    if not weights:
        return UNet2DModel.from_config(_read_json(os.path.join(unet_folder, "config.json")))
    safetensors = os.path.isfile(os.path.join(unet_folder, WEIGHT_FILES[0]))
    try:
        return UNet2DModel.from_pretrained(unet_folder, local_files_only=True, use_safetensors=safetensors,
                                           low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"diffusers folder {unet_folder} is incomplete or damaged ({describe_error(err)}); "
                        f"{HOW_TO_GET}") from None


def folder_network(cfg, folder, blocks):
    """The UNet2DModel of ``folder`` as ``cfg``'s network (a folder as ``--ckpt``), checked against
    ``cfg``: its diffusion section (``check_folder``), its image shape and its probe ``blocks``, so that
    the config's probe settings mean what they say."""
    where = check_folder(cfg, folder)
    network = DiffusersUNet.from_settings(folder)
    if tuple(cfg.image_shape) != network.image_shape:
        raise UserError(f"{where}: the UNet takes images of shape {list(network.image_shape)} but the config's "
                        f"network takes {list(cfg.image_shape)}; use a config with that image shape")
    if list(blocks) != network.block_names:
        raise UserError(f"{where}: the UNet has blocks {span(network.block_names)} but the config's network has "
                        f"{span(blocks)}; use a config with n_blocks = layers_per_block "
                        f"({network.unet.config.layers_per_block}) and {len(network.unet.up_blocks)} entries in "
                        f"ch_mults and is_attn")
    return network


def span(names):
    """``in_1..in_8, mid, out_1..out_12`` for a list of block names."""
    groups = {}
    for name in names:
        groups.setdefault(name.rstrip("0123456789"), []).append(name)
    return ", ".join(group[0] if len(group) == 1 else f"{group[0]}..{group[-1]}" for group in groups.values())
