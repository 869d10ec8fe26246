"""Typed YAML configs: load a file, apply ``--set`` overrides, check every key before any work starts.

This module is the generic part: YAML, ``--set``, the training keys every model shares and the error
text. The ``network`` and ``diffusion`` sections belong to the classes that take them: their keys are
the keyword parameters of the class's constructor (with its annotations and defaults), and the class
checks their values in ``check_settings``. ``model.models.load_config`` tells this module which classes
a file names; scripts call that one::

    add_config_args(parser)                       # --config PATH, --set KEY=VALUE (repeatable)
    cfg = load_config(args.config, args.set)      # model.models: a checked Config, or a one-line UserError
    save_config(cfg, run_dir / "config.yaml")     # the resolved config next to the checkpoints

``UNet(**cfg.network)`` and ``DDPM(nn_model, **cfg.diffusion)`` work directly: sections unpack like dicts.

``model_type: DiT`` files (a pre-trained DiT evaluated on cached VAE latents, SPEC §12) load into a
``DiTConfig``: no training keys, a DiT ``network`` section, ``ckpt`` and a ``latents`` section. Only
the scripts that evaluate a DiT accept them (``load_config(..., allow_dit=True)``).
"""
import copy
import dataclasses
import difflib
import inspect
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml

from utils.atomic import atomic_path
from utils.errors import UserError
from utils.latents import LatentSettings

DIT_SCRIPTS = "linear.py, knn.py, export_features.py and encode_latents.py"
OPTIMIZERS = ("Adam", "AdamW")
REQUIRED = inspect.Parameter.empty    # a constructor parameter without a default: a required key


class Settings(dict):
    """A model part's checked section (``network``, ``diffusion``): a dict whose keys read as attributes."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def to_kwargs(self):
        """Return the settings as a plain dict (lists copied)."""
        return copy.deepcopy(dict(self))


def settings_of(cls, skip=0):
    """The YAML keys of a model part: ``{name: (type or None, default or REQUIRED)}`` from the keyword
    parameters of ``cls``'s constructor after the first ``skip`` (a diffusion's network). The type is
    the annotation, else the default's; None accepts any YAML value."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations: fall back to the defaults' types
        hints = {}
    spec = {}
    for param in list(inspect.signature(cls).parameters.values())[skip:]:
        if param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            spec[param.name] = (hints.get(param.name) or _type_of(param.default), param.default)
    return spec


def _type_of(default):
    if isinstance(default, (bool, int, float, str, dict)):
        return type(default)
    if isinstance(default, (list, tuple)) and default and len({type(v) for v in default}) == 1 \
            and isinstance(default[0], (bool, int, float, str)):
        return list[type(default[0])]
    return None


@dataclass(kw_only=True)
class LinearConfig:
    """Linear probing (and noise-conditional classifier) settings."""

    n_epoch: int = 15
    batch_size: int = 128           # per process
    lrate: float = 1.0e-3           # multiplied by the world size
    timestep: int                   # in the diffusion's feature_timesteps (DDPM 0..n_T, EDM 1..18)
    blockname: str                  # one of the network's block_names


class _TopLevel:
    """What every whole config offers the scripts; ``model.models.load_config`` also sets ``image_shape``,
    the (C, H, W) the network takes (not a key: the network's attribute)."""

    # The model parts: section -> the key naming its class (model.models resolves the name).
    PARTS: ClassVar[dict] = {"diffusion": "model_type", "network": "net_type"}

    def network_kwargs(self):
        """Keywords for the network, as a plain dict."""
        return self.network.to_kwargs()

    def diffusion_kwargs(self):
        """Keywords for the diffusion wrapper (after the network), as a plain dict."""
        return self.diffusion.to_kwargs()

    def to_dict(self):
        """Return the config as plain YAML-ready data, in the file's key order."""
        return {key: dict(value) if isinstance(value, dict) else value
                for key, value in dataclasses.asdict(self).items()}


@dataclass(kw_only=True)
class Config(_TopLevel):
    """A whole experiment: model, training, testing and evaluation settings."""

    SECTIONS: ClassVar[dict] = {"linear": LinearConfig}

    model_type: str                 # a diffusion kind of model.models (DDPM, EDM)
    net_type: str = "UNet"          # a network of model.models, or package.module.Class
    diffusion: dict = field(default_factory=Settings)  # absent: the defaults of model_type
    network: dict
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


@dataclass(kw_only=True)
class DiTConfig(_TopLevel):
    """A pre-trained DiT evaluated as a DDAE on cached VAE latents; nothing is trained."""

    SECTIONS: ClassVar[dict] = {"latents": LatentSettings, "linear": LinearConfig}

    model_type: str                 # DiT
    net_type: str = "DiT"
    diffusion: dict = field(default_factory=Settings)  # DiT's linear schedule
    network: dict = field(default_factory=Settings)    # default: DiT-XL/2
    ckpt: str = "pretrained/DiT-XL-2-256x256.pt"  # facebookresearch/DiT's EMA weights (--ckpt overrides)
    latents: dict
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


def load_config(path, overrides=(), flags=None, allow_dit=False, parts=None, check=None):
    """Read a YAML config, apply ``KEY=VALUE`` overrides and check it (scripts call
    ``model.models.load_config``, which supplies ``parts`` and ``check``).

    Args:
        path: the YAML file.
        overrides: strings ``dotted.key=value``; values are parsed as YAML (``True``, ``1e-4``, ``[1,2]``).
        flags: ``{dotted.key: (flag, value)}`` for a script's own flags that set a config value, e.g.
            ``{"linear.timestep": ("--timestep", args.timestep)}``; applied after ``overrides``
            (entries whose value is None are skipped), and an error about the key names the flag.
        allow_dit: accept ``model_type: DiT`` (a ``DiTConfig``); scripts that cannot evaluate a DiT
            leave it False and reject such a file with a one-line error.
        parts: ``parts(section, name, path) -> (cls, skip)``: the class whose constructor takes the
            section (``network`` for net_type ``name``, ...) and how many leading parameters are not keys.
        check: ``check(cfg, require)``: the model parts' own checks, run after the generic ones.

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

    def require(ok, key, message):
        if not ok:
            raise UserError(f"{path}: key '{key}' {message}")

    try:
        owners = []  # the classes of the sections, each checks its own values
        cfg = _build(cls, raw, path, prefix="", parts=parts, owners=owners)
        _check(cfg, require)
        for owner in owners:
            if hasattr(owner, "check_settings"):
                owner.check_settings(cfg, require)
        if check is not None:
            check(cfg, require)
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


def _build(cls, raw, path, prefix, parts=None, owners=None):
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
        if name in getattr(cls, "PARTS", {}) and (name in raw or fld.default_factory is not dataclasses.MISSING):
            kind_key = cls.PARTS[name]
            kind = values.get(kind_key, fields[kind_key].default)
            part, skip = parts(name, kind, path)
            owners.append(part)
            values[name] = _build_part(part, raw.get(name, {}), path, name, f" for {kind_key} {kind}", skip)
        elif name not in raw:
            if fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
                raise UserError(f"{path}: missing required key '{prefix}{name}'; add it to the file "
                                f"or pass --set {prefix}{name}=VALUE")
        elif name in getattr(cls, "SECTIONS", {}):
            owners.append(cls.SECTIONS[name])
            values[name] = _build_part(cls.SECTIONS[name], raw[name], path, name, "", 0)
        else:
            values[name] = _convert(raw[name], fld.type, path, f"{prefix}{name}")
    return cls(**values)


def _build_part(cls, raw, path, section, what, skip):
    """The ``Settings`` of section ``section`` for the model part ``cls`` (see ``settings_of``)."""
    if not isinstance(raw, dict):
        raise UserError(f"{path}: key '{section}' must be a section of keys, got {_type_name(raw)} {raw!r}")
    spec = settings_of(cls, skip)
    for key in raw:
        if key not in spec:
            raise UserError(f"{path}: unknown key '{section}.{key}'{what}{_suggest(key, spec, section + '.')}")
    values = Settings()
    for name, (annotation, default) in spec.items():
        if name in raw:
            values[name] = _convert(raw[name], annotation, path, f"{section}.{name}") \
                if _checkable(annotation) else raw[name]
        elif default is REQUIRED:
            raise UserError(f"{path}: missing required key '{section}.{name}'{what}; add it to the file "
                            f"or pass --set {section}.{name}=VALUE")
        else:
            values[name] = list(default) if isinstance(default, tuple) else copy.deepcopy(default)
    return values


def _checkable(annotation):
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0] in (int, float, bool, str)
    return annotation in (int, float, bool, str, dict)


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


def _check(cfg, require):
    """The keys every model shares: training (a Config), the probe and the data."""
    if isinstance(cfg, Config):
        for key in ("batch_size", "n_epoch", "warm_epoch", "n_sample", "ckpt_interval"):
            require(getattr(cfg, key) >= 1, key, f"must be at least 1, got {getattr(cfg, key)}")
        require(cfg.lrate > 0, "lrate", f"must be positive, got {cfg.lrate}")
        require(0.0 < cfg.ema < 1.0, "ema", f"must be in (0, 1), got {cfg.ema}")
        require(cfg.load_epoch >= -1, "load_epoch", f"must be -1 (start fresh) or an epoch, got {cfg.load_epoch}")
        require(cfg.optim in OPTIMIZERS, "optim", f"must be one of {', '.join(OPTIMIZERS)}, got {cfg.optim!r}")
    require(cfg.classes >= 1, "classes", f"must be at least 1, got {cfg.classes}")
    require(cfg.num_workers >= -1, "num_workers", f"must be 0 or positive, or -1 for a number chosen from the "
                                                  f"CPUs, got {cfg.num_workers}")
    require(cfg.save_dir != "", "save_dir", "must not be empty")
    linear = cfg.linear
    for key in ("n_epoch", "batch_size"):
        require(getattr(linear, key) >= 1, f"linear.{key}", f"must be at least 1, got {getattr(linear, key)}")
    require(linear.lrate > 0, "linear.lrate", f"must be positive, got {linear.lrate}")
    require(linear.timestep >= 0, "linear.timestep", f"must be 0 or positive, got {linear.timestep}")
