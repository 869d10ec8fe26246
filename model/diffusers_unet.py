"""A diffusers UNet2DModel (google/ddpm-cifar10-32, the other Hub DDPMs, your own) as a DDAE network.

    hf download google/ddpm-cifar10-32 --local-dir weights/ddpm-cifar10-32
    python linear.py --config config/DDPM_ddpm.yaml --ckpt weights/ddpm-cifar10-32 --grid

    diffusion = load_diffusers_folder(cfg, "weights/ddpm-cifar10-32")   # a DDPM around DiffusersUNet

A folder is read in either layout diffusers writes: a pipeline (``model_index.json``, ``unet/``,
``scheduler/``, as ``DDPMPipeline.save_pretrained``) or a bare UNet2DModel (``config.json`` and the
weights at its root, with ``scheduler_config.json`` beside them when the Hub repository has one).
Weights come from ``diffusion_pytorch_model.safetensors``, else ``.bin`` (diffusers reads it with
``torch.load(weights_only=True)``); nothing is downloaded. The folder's scheduler must describe the
config's diffusion section (same alphabar at every step) and predict epsilon.

Our DDPM calls its network with t / n_T for t in 1..n_T; UNet2DModel was trained on the index t - 1
of its ``alphas_cumprod``, which equals our alphabar at t. ``DiffusersUNet`` converts between the two,
and names its blocks as our UNet does: ``out_k`` is the k-th pair (residual block, then its attention
when the level has one) of the up path, counted from the deepest, before the level's upsampler.

diffusers is imported only when a folder is loaded.
"""
import json
import os

import torch
from torch import nn

from model.ddpm import DDPM
from utils.distributed import print0
from utils.errors import UserError, describe_error

HOW_TO_GET = ("get a model with `hf download google/ddpm-cifar10-32 --local-dir weights/ddpm-cifar10-32` "
              "(older huggingface_hub: `huggingface-cli download ...`) and pass that folder")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# The blocks whose internals DiffusersUNet knows (the up path is walked pair by pair to name out_k).
DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
MID_BLOCKS = ("UNetMidBlock2D", None)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SCHEDULE_TOLERANCE = 1e-4  # relative, on alphabar and 1 - alphabar; float32 rounding gives ~1e-6


class DiffusersUNet(nn.Module):
    """A ``diffusers.UNet2DModel`` behind our network contract (docs/DESIGN.md).

    Args:
        unet: the UNet2DModel (epsilon prediction, positional time embedding, no class labels).
        n_T: the diffusion's number of steps; ``forward`` gets t / n_T and feeds the network t - 1.

    ``block_names`` are ``out_1 .. out_N``, N = (layers_per_block + 1) x the number of up blocks.
    """

    feature_axis = 1  # the channels of a (B, C, H, W) activation

    def __init__(self, unet, n_T):
        super().__init__()
        self.unet = unet
        self.n_T = int(n_T)
        self.block_names = [f"out_{k}" for k in range(1, sum(len(b.resnets) for b in unet.up_blocks) + 1)]

    def timestep_index(self, t, batch_size):
        """The UNet2DModel timestep (B,) long of our t / n_T: round(t * n_T) - 1, so that t = 1 is 0."""
        index = torch.round(t.float() * self.n_T).long() - 1
        return index.expand(batch_size) if index.dim() == 0 else index

    def _up_pairs(self, block):
        """The (resnet, attention or None) pairs of an up block, then its upsamplers."""
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        return list(zip(block.resnets, attentions)), list(block.upsamplers or [])

    def _run(self, x, t, aug, wanted):
        """UNet2DModel.forward, with the up path run pair by pair; ``wanted`` as in model/unet.py."""
        if aug is not None:
            raise ValueError("a diffusers UNet2DModel takes no augmentation labels")
        unet = self.unet
        emb = unet.time_embedding(unet.time_proj(self.timestep_index(t, x.shape[0])).to(unet.dtype))  # (B, D)
        h = unet.conv_in(x)
        skips = [h]
        for block in unet.down_blocks:
            h, outputs = block(hidden_states=h, temb=emb)
            skips.extend(outputs)
        if unet.mid_block is not None:
            h = unet.mid_block(h, emb)

        activations = {}
        last_needed = None if wanted is None else max(self.block_names.index(n) for n in wanted)
        index = 0
        for block in unet.up_blocks:
            pairs, upsamplers = self._up_pairs(block)
            for resnet, attention in pairs:
                h = resnet(torch.cat([h, skips.pop()], dim=1), emb)
                if attention is not None:
                    h = attention(h)
                name = self.block_names[index]
                if wanted is None or name in wanted:
                    activations[name] = h  # (B, C, H, W)
                if index == last_needed:
                    return None, activations
                index += 1
            for upsampler in upsamplers:
                h = upsampler(h, temb=emb) if getattr(block, "upsample_type", None) == "resnet" else upsampler(h)
        out = unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
        return out, activations

    def forward(self, x, t, aug=None, ret_activation=False):
        out, activations = self._run(x, t, aug, None)
        return (out, activations) if ret_activation else out

    def forward_features(self, x, t, names, aug=None):
        """Return ``{name: (B, C, H, W)}`` for the requested blocks; later blocks are not run."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.block_names]
        if unknown:
            raise ValueError(f"unknown block {unknown[0]!r}; this network has "
                             f"{self.block_names[0]}..{self.block_names[-1]}")
        return self._run(x, t, aug, set(names))[1]

    def stages(self, block):
        """The modules that compute ``block``, in running order, for finetune.py's layer decay:
        ``[(name, [modules])]`` with "embedding", "down.i", "middle", then "up.i" for every up-path
        pair and upsampler up to ``block``."""
        unet = self.unet
        stages = [("embedding", [unet.conv_in, unet.time_embedding])]
        stages += [(f"down.{i}", [module]) for i, module in enumerate(unet.down_blocks)]
        if unet.mid_block is not None:
            stages.append(("middle", [unet.mid_block]))
        blocks_left = self.block_names.index(block) + 1
        for up_block in unet.up_blocks:
            pairs, upsamplers = self._up_pairs(up_block)
            for resnet, attention in pairs:
                stages.append((f"up.{len(stages)}", [m for m in (resnet, attention) if m is not None]))
                blocks_left -= 1
                if blocks_left == 0:
                    return stages
            stages += [(f"up.{len(stages)}", [upsampler]) for upsampler in upsamplers]
        return stages


def _read_json(path):
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot be read ({describe_error(err)}); {HOW_TO_GET}") from None


def locate(folder):
    """``(unet_folder, scheduler_config_path or None)`` of a pipeline or bare UNet folder.

    Raises:
        UserError: the folder, its UNet's config.json or its weights are missing (saying how to get them).
    """
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


def check_scheduler(config, path, diffusion, cfg):
    """Refuse a scheduler whose prediction or alphabar differ from the diffusion built from ``cfg``."""
    prediction = config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise UserError(f"{path}: prediction_type {prediction!r} is not supported; DDAE's DDPM predicts the "
                        f"noise (epsilon)")
    beta_schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None or beta_schedule not in BETA_SCHEDULES:
        what = "trained_betas" if config.get("trained_betas") is not None else f"beta_schedule {beta_schedule!r}"
        raise UserError(f"{path}: {what} is not supported; use a folder whose beta_schedule is one of "
                        f"{', '.join(BETA_SCHEDULES)}")
    steps = config.get("num_train_timesteps", 1000)
    described = (f"{beta_schedule} betas {config.get('beta_start', 1e-4)} .. {config.get('beta_end', 0.02)} "
                 f"over {steps} steps")
    fix = (f"use a config whose diffusion section describes the folder's schedule (the config gives "
           f"{cfg.diffusion_kwargs()})")
    if steps != diffusion.n_T:
        raise UserError(f"{path}: the folder's schedule ({described}) has {steps} steps but diffusion.n_T is "
                        f"{diffusion.n_T}; {fix}")
    from diffusers import DDPMScheduler

    theirs = DDPMScheduler.from_config(config).alphas_cumprod.float()  # index t - 1 is our t
    ours = diffusion.ddpm_alphabar_t[1:].float().cpu()
    error = (ours - theirs).abs() / torch.minimum(theirs, 1 - theirs)
    worst = int(error.argmax())
    if error[worst] > SCHEDULE_TOLERANCE:
        raise UserError(f"{path}: the folder's schedule ({described}) differs from the config's diffusion "
                        f"section: alphabar at t = {worst + 1} is {theirs[worst]:.6g} there but {ours[worst]:.6g} "
                        f"here; {fix}")


def load_diffusers_folder(cfg, folder):
    """The config's DDPM around the UNet2DModel saved in ``folder``, checked against the config.

    The config's ``network`` section is not built: it must name the same image shape and the same
    probe blocks (out_1 .. out_N) as the folder's UNet, so that its probe settings mean what they say.

    Raises:
        UserError: a missing file, an unsupported UNet or scheduler, or a config that does not fit.
    """
    if cfg.model_type != "DDPM":
        raise UserError(f"--ckpt {folder}: a diffusers UNet2DModel folder loads with a DDPM config (model_type: "
                        f"DDPM), not {cfg.model_type}")
    unet_folder, scheduler_path = locate(folder)
    config_path = os.path.join(unet_folder, "config.json")
    check_unet_config(_read_json(config_path), config_path)
    try:
        from diffusers import UNet2DModel
        from diffusers.utils import logging as diffusers_logging
    except ImportError:
        raise UserError("a diffusers folder as --ckpt needs diffusers: pip install diffusers") from None
    diffusers_logging.set_verbosity_error()  # a problem is our one-line error, not its log lines
    safetensors = os.path.isfile(os.path.join(unet_folder, WEIGHT_FILES[0]))
    try:
        unet = UNet2DModel.from_pretrained(unet_folder, local_files_only=True, use_safetensors=safetensors,
                                           low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"diffusers folder {unet_folder} is incomplete or damaged ({describe_error(err)}); "
                        f"{HOW_TO_GET}") from None
    network = DiffusersUNet(unet, cfg.diffusion.n_T)
    image_shape = [unet.config.in_channels, unet.config.sample_size, unet.config.sample_size]
    if list(cfg.network.image_shape) != image_shape:
        raise UserError(f"{config_path}: the UNet takes images of shape {image_shape} but the config's "
                        f"network.image_shape is {list(cfg.network.image_shape)}; use a config with that image shape")
    if list(cfg.network.block_names) != network.block_names:
        raise UserError(f"{config_path}: the UNet has probe blocks {network.block_names[0]}..{network.block_names[-1]} "
                        f"but the config's network has {cfg.network.block_names[0]}..{cfg.network.block_names[-1]}; "
                        f"use a config with n_blocks = layers_per_block ({unet.config.layers_per_block}) and "
                        f"{len(unet.up_blocks)} entries in ch_mults and is_attn")
    diffusion = DDPM(network, **cfg.diffusion_kwargs())
    if scheduler_path is None:
        print0(f"note: {folder} holds no scheduler_config.json; assuming the config's diffusion section "
               f"{cfg.diffusion_kwargs()}")
    else:
        check_scheduler(_read_json(scheduler_path), scheduler_path, diffusion, cfg)
    return diffusion
