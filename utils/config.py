"""Typed YAML configs: load a file, apply ``--set`` overrides, check every key before any work starts.

Scripts use three calls::

    add_config_args(parser)                       # --config PATH, --set KEY=VALUE (repeatable)
    cfg = load_config(args.config, args.set)      # a checked Config, or a one-line UserError
    save_config(cfg, run_dir / "config.yaml")     # the resolved config next to the checkpoints

``UNet(**cfg.network)``, ``DDPM(nn_model, **cfg.diffusion)`` and ``EDM(nn_model, **cfg.diffusion)``
work directly: the network and diffusion sections unpack like dicts.

``model_type: DiT`` files (a pre-trained DiT evaluated on cached VAE latents, SPEC §12) load into a
``DiTConfig``: no training keys, a DiT ``network`` section, ``ckpt`` and a ``latents`` section. Only
the scripts that evaluate a DiT accept them (``load_config(..., allow_dit=True)``).
"""
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml

from utils.atomic import atomic_path
from utils.errors import UserError

MODEL_TYPES = ("DDPM", "EDM", "DiT")
NET_TYPES = ("UNet",)                 # of the trainable model types; DiT configs use the DiT network
DIT_SCRIPTS = "linear.py, knn.py, export_features.py and encode_latents.py"
CACHE_DTYPES = ("float16", "float32")
VAE_DOWNSAMPLING = 8                  # the SD VAE's latents are 1/8 of the image side
EDM_FEATURE_STEPS = 18                # an EDM linear.timestep indexes this many steps of its feature schedule
OPTIMIZERS = ("Adam", "AdamW")
AUGMENT_LABELS = 9  # labels per image produced by model.augment.AugmentPipe


class _Section:
    """A config section that unpacks like a dict: ``fn(**section)`` passes its fields as keywords."""

    def keys(self):
        return [f.name for f in dataclasses.fields(self)]

    def __getitem__(self, key):
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def to_kwargs(self):
        """Return the fields as a plain dict (lists copied)."""
        return dataclasses.asdict(self)


@dataclass(kw_only=True)
class DDPMConfig(_Section):
    """Variance-preserving diffusion with a linear beta schedule."""

    n_T: int = 1000                                             # diffusion steps
    betas: list[float] = field(default_factory=lambda: [1.0e-4, 0.02])  # [beta_1, beta_T]


@dataclass(kw_only=True)
class EDMConfig(_Section):
    """EDM preconditioning, training noise distribution and Heun sampler settings."""

    sigma_data: float = 0.5         # standard deviation of the data
    p_mean: float = -1.2            # mean of ln(sigma) during training
    p_std: float = 1.2              # standard deviation of ln(sigma) during training
    sigma_min: float = 0.002        # lowest noise level of the sampling schedule
    sigma_max: float = 80.0         # highest noise level of the sampling schedule
    rho: float = 7.0                # schedule curvature
    S_min: float = 0.01             # stochastic sampling acts on sigma in [S_min, S_max]
    S_max: float = 1.0
    S_noise: float = 1.007          # noise inflation of stochastic sampling
    augment_prob: float = 0.0       # probability of each geometric augmentation (0: off)


# DiT's own diffusion has DDPM's linear schedule (timesteps 0..n_T-1).
DIFFUSION_CONFIGS = {"DDPM": DDPMConfig, "EDM": EDMConfig, "DiT": DDPMConfig}


@dataclass(kw_only=True)
class NetworkConfig(_Section):
    """Keywords of ``model.unet.UNet``."""

    image_shape: list[int] = field(default_factory=lambda: [3, 32, 32])  # (C, H, W)
    n_channels: int = 128           # channels at the first resolution
    ch_mults: list[int]             # channel multiplier per resolution
    is_attn: list[bool]             # attention blocks per resolution
    dropout: float = 0.1
    n_blocks: int = 2               # residual blocks per resolution on the down path
    use_res_for_updown: bool = False  # BigGAN-style residual up/down sampling
    augment_dim: int = 0            # augmentation labels fed to the time embedding (0: none)

    @property
    def block_names(self):
        """Names of the up-path blocks whose features can be probed: out_1 .. out_N."""
        return [f"out_{k}" for k in range(1, (self.n_blocks + 1) * len(self.ch_mults) + 1)]


@dataclass(kw_only=True)
class DiTNetworkConfig(_Section):
    """Keywords of ``model.dit.DiT``; the defaults are DiT-XL/2 for 256x256 images."""

    input_size: int = 32            # latent side
    patch_size: int = 2
    in_channels: int = 4            # latent channels
    hidden_size: int = 1152         # token width
    depth: int = 28                 # transformer blocks
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1  # > 0: the label table has the null class
    num_classes: int = 1000
    learn_sigma: bool = True

    @property
    def image_shape(self):
        """(C, H, W) of the network's input: a latent."""
        return [self.in_channels, self.input_size, self.input_size]

    @property
    def block_names(self):
        """Names of the blocks whose features can be probed: layer-0 .. layer-(depth-1)."""
        return [f"layer-{k}" for k in range(self.depth)]


@dataclass(kw_only=True)
class LatentConfig(_Section):
    """The VAE latent cache a DiT is evaluated on (written by encode_latents.py)."""

    vae: str = "pretrained/sd-vae-ft-mse"  # local folder of diffusers' AutoencoderKL
    cache_dir: str                  # one .npy per training copy plus the test split
    copies: int = 10                # augmented copies of the training split
    source_size: int = 32           # side of the dataset's images (CIFAR 32, Tiny ImageNet 64)
    crop_padding: int = 4           # RandomCrop(source_size, padding) of the training copies
    image_size: int = 256           # images are resized to this (bilinear) before encoding
    scale: float = 0.18215          # latent = scale * a draw from the VAE's posterior
    dtype: str = "float16"          # storage: float16 or float32
    batch_size: int = 64            # images per VAE call and process


@dataclass(kw_only=True)
class LinearConfig(_Section):
    """Linear probing (and noise-conditional classifier) settings."""

    n_epoch: int = 15
    batch_size: int = 128           # per process
    lrate: float = 1.0e-3           # multiplied by the world size
    timestep: int                   # DDPM: t in 0..n_T; EDM: index into the 18-step schedule
    blockname: str                  # out_k


class _TopLevel:
    """What every whole config offers the scripts."""

    def network_kwargs(self):
        """Keywords for the network (``UNet`` or ``DiT``), as a plain dict."""
        return self.network.to_kwargs()

    def diffusion_kwargs(self):
        """Keywords for the diffusion wrapper (after the network), as a plain dict."""
        return self.diffusion.to_kwargs()

    def to_dict(self):
        """Return the config as plain YAML-ready data, in the file's key order."""
        return dataclasses.asdict(self)


@dataclass(kw_only=True)
class Config(_TopLevel):
    """A whole experiment: model, training, testing and evaluation settings."""

    SECTIONS: ClassVar[dict] = {"network": NetworkConfig, "linear": LinearConfig}

    model_type: str                 # DDPM or EDM
    net_type: str = "UNet"
    diffusion: DDPMConfig | EDMConfig | None = None  # None: the defaults of model_type
    network: NetworkConfig
    # training
    dataset: str = "cifar"
    classes: int = 10
    batch_size: int                 # per process
    n_epoch: int
    lrate: float                    # multiplied by the world size
    warm_epoch: int                 # linear learning-rate warm-up, in epochs
    load_epoch: int = -1            # the original's resume switch; -1: start fresh
    flip: bool = True               # random horizontal flips
    ema: float                      # EMA decay
    optim: str = "Adam"             # Adam or AdamW
    optim_args: dict = field(default_factory=dict)  # extra optimizer keywords
    ckpt_interval: int = 100        # epochs between checkpoints and sample grids
    seed: int = 1337
    num_workers: int = -1           # data-loader workers per loader; -1: from the CPUs (utils.data)
    # testing
    n_sample: int = 30              # images in each sample grid
    save_dir: str                   # default ./output_<config name>, set by load_config
    save_model: bool = True
    # evaluation
    linear: LinearConfig

    def __post_init__(self):
        if self.diffusion is None and self.model_type in DIFFUSION_CONFIGS:
            self.diffusion = DIFFUSION_CONFIGS[self.model_type]()


@dataclass(kw_only=True)
class DiTConfig(_TopLevel):
    """A pre-trained DiT evaluated as a DDAE on cached VAE latents; nothing is trained."""

    SECTIONS: ClassVar[dict] = {"network": DiTNetworkConfig, "latents": LatentConfig, "linear": LinearConfig}

    model_type: str                 # DiT
    net_type: str = "DiT"
    diffusion: DDPMConfig = field(default_factory=DDPMConfig)  # DiT's linear schedule
    network: DiTNetworkConfig = field(default_factory=DiTNetworkConfig)
    ckpt: str = "pretrained/DiT-XL-2-256x256.pt"  # facebookresearch/DiT's EMA weights (--ckpt overrides)
    latents: LatentConfig
    dataset: str = "cifar"
    classes: int = 10
    seed: int = 1337
    num_workers: int = -1           # data-loader workers per loader; -1: from the CPUs (utils.data)
    save_dir: str                   # default ./output_<config name>, set by load_config
    linear: LinearConfig


def config_name(path):
    """Return the name of a config file: its stem (``config/EDM_ddpm.yaml`` -> ``EDM_ddpm``)."""
    return Path(path).stem


def default_save_dir(path):
    """Return the output folder used when a config has no save_dir: ``./output_<config name>``."""
    return f"./output_{config_name(path)}"


def add_config_args(parser):
    """Add ``--config PATH`` (required) and ``--set KEY=VALUE`` (repeatable) to an argparse parser."""
    parser.add_argument("--config", required=True, help="YAML config file, e.g. config/DDPM_ddpm.yaml")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, dotted for nesting (e.g. --set linear.n_epoch=1 "
             "--set network.ch_mults=[1,2]); values are read as YAML",
    )
    return parser


def load_config(path, overrides=(), flags=None, allow_dit=False):
    """Read a YAML config, apply ``KEY=VALUE`` overrides and check it.

    Args:
        path: the YAML file.
        overrides: strings ``dotted.key=value``; values are parsed as YAML (``True``, ``1e-4``, ``[1,2]``).
        flags: ``{dotted.key: (flag, value)}`` for a script's own flags that set a config value, e.g.
            ``{"linear.timestep": ("--timestep", args.timestep)}``; applied after ``overrides``
            (entries whose value is None are skipped), and an error about the key names the flag.
        allow_dit: accept ``model_type: DiT`` (a ``DiTConfig``); scripts that cannot evaluate a DiT
            leave it False and reject such a file with a one-line error.

    Returns:
        A checked ``Config`` (or ``DiTConfig``).

    Raises:
        UserError: naming the file and the key at fault.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: file not found; pass an existing YAML file such as config/DDPM_ddpm.yaml")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"{path}: {_describe_yaml_error(err, text)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of keys (model_type: ..., network: ...), "
                        f"got {_type_name(raw)}")
    overrides = [(override, f"--set {override}") for override in overrides or ()]
    overrides += [(f"{key}={value}", f"{flag} {value}") for key, (flag, value) in (flags or {}).items()
                  if value is not None]
    for override, _ in overrides:
        _apply_override(raw, override, path)
    raw.setdefault("save_dir", default_save_dir(path))
    cls = Config
    if raw.get("model_type") == "DiT":
        if not allow_dit:
            raise UserError(f"{path}: model_type DiT is a pre-trained network evaluated on cached latents; "
                            f"use it with {DIT_SCRIPTS}")
        cls = DiTConfig
    try:
        cfg = _build(cls, raw, path, prefix="")
        _check(cfg, path)
    except UserError as err:
        raise UserError(f"{err}{_override_note(str(err), overrides)}") from None
    return cfg


def save_config(cfg, path):
    """Write the resolved config as YAML, never leaving a partial file (see utils.atomic);
    ``load_config`` of the file gives back an equal Config."""
    path = Path(path)
    with atomic_path(path, what="the config ") as temporary:
        Path(temporary).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None))
    return path


def _describe_yaml_error(err, text):
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and context_mark is not None and mark is not None and context_mark.line != mark.line:
        problem += f", {context} started on line {context_mark.line + 1}"
    if mark is None:
        return f"malformed YAML ({problem}); fix the syntax"
    lines = text.splitlines()
    line_text = lines[mark.line].strip() if mark.line < len(lines) else ""
    return f"line {mark.line + 1}: malformed YAML ({problem}) near '{line_text}'; fix the syntax on that line"


def _override_note(message, overrides):
    """Point at the flag (``--set`` or a script's own) behind a key named in ``message``, if there is one;
    ``overrides`` are (KEY=VALUE, what the user typed) pairs, the last one of a key wins."""
    for override, typed in reversed(overrides):
        key = override.partition("=")[0].strip()
        if f"'{key}'" in message:
            return f" (from {typed})"
    return ""


def _apply_override(raw, override, path):
    key, sep, value_text = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"{path}: --set '{override}': expected KEY=VALUE with a dotted key, "
                        f"e.g. --set linear.n_epoch=1")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or "unreadable value"
        raise UserError(f"{path}: --set {key}: value '{value_text}' is not valid YAML ({problem}); "
                        f"write e.g. [1, 2], True, 1.0e-4 or a plain word") from None
    *parents, leaf = key.split(".")
    node = raw
    for depth, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parents[: depth + 1])
            raise UserError(f"{path}: --set {key}: '{where}' is a single value, not a section; "
                            f"set '{where}' itself")
        node = child
    node[leaf] = value


def _build(cls, raw, path, prefix):
    """Make a ``cls`` from the mapping ``raw``, checking keys and types; ``prefix`` names its section."""
    if not isinstance(raw, dict):
        raise UserError(f"{path}: key '{prefix.rstrip('.')}' must be a section of keys, got {_type_name(raw)} "
                        f"{raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise UserError(f"{path}: unknown key '{prefix}{key}'{_suggest(key, fields, prefix)}")
    values = {}
    for name, fld in fields.items():
        if name not in raw:
            if fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
                raise UserError(f"{path}: missing required key '{prefix}{name}'; add it to the file "
                                f"or pass --set {prefix}{name}=VALUE")
            continue
        if name == "diffusion":
            values[name] = _build_diffusion(raw, path)
        elif name in getattr(cls, "SECTIONS", {}):
            values[name] = _build(cls.SECTIONS[name], raw[name], path, prefix=f"{name}.")
        else:
            values[name] = _convert(raw[name], fld.type, path, f"{prefix}{name}")
    return cls(**values)


def _build_diffusion(raw, path):
    model_type = raw.get("model_type")
    if model_type not in DIFFUSION_CONFIGS:
        raise UserError(f"{path}: key 'model_type' must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    section = raw["diffusion"]
    cls = DIFFUSION_CONFIGS[model_type]
    if isinstance(section, dict):
        known = [f.name for f in dataclasses.fields(cls)]
        for key in section:
            if key not in known:
                raise UserError(f"{path}: unknown key 'diffusion.{key}' for model_type {model_type}"
                                f"{_suggest(key, known, 'diffusion.')}")
    return _build(cls, section, path, prefix="diffusion.")


def _suggest(key, known, prefix):
    close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; known keys: {', '.join(prefix + k for k in known)}"


def _type_name(value):
    return type(value).__name__


def _describe_type(annotation):
    origin = typing.get_origin(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return f"a list of {item.__name__}s"
    return {int: "an int", float: "a number", bool: "True or False", str: "a string", dict: "a mapping"}[annotation]


def _convert(value, annotation, path, key):
    """Return ``value`` as ``annotation`` (int, float, bool, str, dict or list of those), or raise."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise _type_error(path, key, annotation, value)
        try:
            return [_convert_scalar(item, item_type) for item in value]
        except (TypeError, ValueError):
            raise _type_error(path, key, annotation, value) from None
    try:
        return _convert_scalar(value, annotation)
    except (TypeError, ValueError):
        raise _type_error(path, key, annotation, value) from None


def _convert_scalar(value, annotation):
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads 1e-4 (no dot) as a string; it still means a number here.
            number = float(value)
            if math.isfinite(number):
                return number
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
    raise TypeError(annotation)


def _type_error(path, key, annotation, value):
    hint = ""
    if annotation is str and isinstance(value, (int, float, bool)):
        hint = "; quote it"
    elif annotation is int and isinstance(value, float) and value.is_integer():
        hint = f"; write {int(value)}"
    return UserError(f"{path}: key '{key}' must be {_describe_type(annotation)}, got {_type_name(value)} "
                     f"{value!r}{hint}")


def _check(cfg, path):
    """Cross-field and range checks that types alone do not catch."""

    def require(ok, key, message):
        if not ok:
            raise UserError(f"{path}: key '{key}' {message}")

    if isinstance(cfg, DiTConfig):
        return _check_dit(cfg, require)
    require(cfg.model_type in MODEL_TYPES, "model_type", f"must be one of {', '.join(MODEL_TYPES)}, "
                                                         f"got {cfg.model_type!r}")
    require(cfg.net_type in NET_TYPES, "net_type", f"must be one of {', '.join(NET_TYPES)}, got {cfg.net_type!r}")

    net = cfg.network
    require(len(net.image_shape) == 3 and all(n > 0 for n in net.image_shape), "network.image_shape",
            f"must be [channels, height, width] of positive ints, got {net.image_shape}")
    require(len(net.ch_mults) > 0 and all(m > 0 for m in net.ch_mults), "network.ch_mults",
            f"must be a non-empty list of positive ints, got {net.ch_mults}")
    require(len(net.is_attn) == len(net.ch_mults), "network.is_attn",
            f"must have one entry per resolution, as many as network.ch_mults ({len(net.ch_mults)}), "
            f"got {len(net.is_attn)}")
    require(net.n_channels > 0 and all(net.n_channels * m % 32 == 0 for m in net.ch_mults), "network.n_channels",
            f"times every network.ch_mults entry must be a positive multiple of 32 (GroupNorm of 32 groups), "
            f"got {net.n_channels}")
    scale = 2 ** (len(net.ch_mults) - 1)
    require(all(size % scale == 0 for size in net.image_shape[1:]), "network.image_shape",
            f"height and width must be divisible by {scale} for {len(net.ch_mults)} resolutions, "
            f"got {net.image_shape}")
    require(0.0 <= net.dropout < 1.0, "network.dropout", f"must be in [0, 1), got {net.dropout}")
    require(net.n_blocks >= 1, "network.n_blocks", f"must be at least 1, got {net.n_blocks}")
    require(net.augment_dim >= 0, "network.augment_dim", f"must be 0 or positive, got {net.augment_dim}")

    diffusion = cfg.diffusion
    if cfg.model_type == "DDPM":
        _check_linear_schedule(diffusion, require)
    else:
        for key in ("sigma_data", "sigma_min", "sigma_max", "rho", "p_std"):
            require(getattr(diffusion, key) > 0, f"diffusion.{key}", f"must be positive, got {getattr(diffusion, key)}")
        require(diffusion.sigma_min < diffusion.sigma_max, "diffusion.sigma_min",
                f"must be below diffusion.sigma_max ({diffusion.sigma_max}), got {diffusion.sigma_min}")
        require(0.0 <= diffusion.augment_prob <= 1.0, "diffusion.augment_prob",
                f"must be in [0, 1], got {diffusion.augment_prob}")
        require(diffusion.augment_prob == 0 or net.augment_dim == AUGMENT_LABELS, "network.augment_dim",
                f"must be {AUGMENT_LABELS} when diffusion.augment_prob > 0 (the network gets "
                f"{AUGMENT_LABELS} augmentation labels), got {net.augment_dim}")

    for key in ("classes", "batch_size", "n_epoch", "warm_epoch", "n_sample", "ckpt_interval"):
        require(getattr(cfg, key) >= 1, key, f"must be at least 1, got {getattr(cfg, key)}")
    require(cfg.lrate > 0, "lrate", f"must be positive, got {cfg.lrate}")
    require(0.0 < cfg.ema < 1.0, "ema", f"must be in (0, 1), got {cfg.ema}")
    require(cfg.load_epoch >= -1, "load_epoch", f"must be -1 (start fresh) or an epoch, got {cfg.load_epoch}")
    _check_num_workers(cfg, require)
    require(cfg.optim in OPTIMIZERS, "optim", f"must be one of {', '.join(OPTIMIZERS)}, got {cfg.optim!r}")
    require(cfg.save_dir != "", "save_dir", "must not be empty")
    _check_linear(cfg, require, top=diffusion.n_T if cfg.model_type == "DDPM" else None)


def _check_num_workers(cfg, require):
    require(cfg.num_workers >= -1, "num_workers", f"must be 0 or positive, or -1 for a number chosen from the "
                                                  f"CPUs, got {cfg.num_workers}")


def _check_linear_schedule(diffusion, require):
    require(diffusion.n_T >= 1, "diffusion.n_T", f"must be at least 1, got {diffusion.n_T}")
    require(len(diffusion.betas) == 2 and 0.0 < diffusion.betas[0] <= diffusion.betas[1] < 1.0,
            "diffusion.betas", f"must be [beta_1, beta_T] with 0 < beta_1 <= beta_T < 1, got {diffusion.betas}")


def _check_linear(cfg, require, top):
    """The probe settings; ``top`` is the largest timestep (None: checked later, per model type)."""
    linear = cfg.linear
    for key in ("n_epoch", "batch_size"):
        require(getattr(linear, key) >= 1, f"linear.{key}", f"must be at least 1, got {getattr(linear, key)}")
    require(linear.lrate > 0, "linear.lrate", f"must be positive, got {linear.lrate}")
    require(linear.timestep >= 0, "linear.timestep", f"must be 0 or positive, got {linear.timestep}")
    if top is not None:
        require(linear.timestep <= top, "linear.timestep",
                f"must be at most diffusion.n_T{' - 1' if cfg.model_type == 'DiT' else ''} ({top}), "
                f"got {linear.timestep}")
    blocks = cfg.network.block_names
    kind = "a block" if cfg.model_type == "DiT" else "an up-path block"
    require(linear.blockname in blocks, "linear.blockname",
            f"must name {kind} of this network, {blocks[0]} .. {blocks[-1]}, got {linear.blockname!r}")


def _check_dit(cfg, require):
    """Checks of a DiTConfig: the network, the latent cache and the probe."""
    require(cfg.net_type == "DiT", "net_type", f"must be DiT for model_type DiT, got {cfg.net_type!r}")
    net = cfg.network
    for key in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
        require(getattr(net, key) >= 1, f"network.{key}", f"must be at least 1, got {getattr(net, key)}")
    require(net.input_size % net.patch_size == 0, "network.input_size",
            f"must be a multiple of network.patch_size ({net.patch_size}), got {net.input_size}")
    require(net.hidden_size % net.num_heads == 0, "network.hidden_size",
            f"must be a multiple of network.num_heads ({net.num_heads}), got {net.hidden_size}")
    require(net.mlp_ratio > 0, "network.mlp_ratio", f"must be positive, got {net.mlp_ratio}")
    require(0.0 <= net.class_dropout_prob < 1.0, "network.class_dropout_prob",
            f"must be in [0, 1), got {net.class_dropout_prob}")
    _check_linear_schedule(cfg.diffusion, require)

    latents = cfg.latents
    for key in ("copies", "source_size", "batch_size"):
        require(getattr(latents, key) >= 1, f"latents.{key}", f"must be at least 1, got {getattr(latents, key)}")
    require(latents.crop_padding >= 0, "latents.crop_padding", f"must be 0 or positive, got {latents.crop_padding}")
    require(latents.image_size == net.input_size * VAE_DOWNSAMPLING, "latents.image_size",
            f"must be {VAE_DOWNSAMPLING} x network.input_size ({net.input_size * VAE_DOWNSAMPLING}): the VAE's "
            f"latents are 1/{VAE_DOWNSAMPLING} of the image side; got {latents.image_size}")
    require(latents.scale > 0, "latents.scale", f"must be positive, got {latents.scale}")
    require(latents.dtype in CACHE_DTYPES, "latents.dtype",
            f"must be one of {', '.join(CACHE_DTYPES)}, got {latents.dtype!r}")
    for key in ("vae", "cache_dir"):
        require(getattr(latents, key) != "", f"latents.{key}", "must not be empty")
    require(cfg.ckpt != "", "ckpt", "must not be empty")

    require(cfg.classes >= 1, "classes", f"must be at least 1, got {cfg.classes}")
    _check_num_workers(cfg, require)
    require(cfg.save_dir != "", "save_dir", "must not be empty")
    _check_linear(cfg, require, top=cfg.diffusion.n_T - 1)
