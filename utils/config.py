"""Typed YAML configs, the generic part: YAML, ``--set``, the keys every model shares, the error text.

The ``network`` and ``diffusion`` sections belong to the classes that take them (their constructor's
keywords, checked by their ``check_settings``); ``model.models.load_config`` names those classes, and
scripts call it::

    add_config_args(parser)                       # --config PATH, --set KEY=VALUE (repeatable)
    cfg = load_config(args.config, args.set)      # model.models: a checked Config, or a one-line UserError
    save_config(cfg, run_dir / "config.yaml")     # the resolved config next to the checkpoints
"""
import copy
import dataclasses
import difflib
import importlib
import inspect
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml

from utils.atomic import atomic_path
from utils.errors import UserError

OPTIMIZERS = ("Adam", "AdamW")
REQUIRED = inspect.Parameter.empty    # a constructor parameter without a default: a required key
SCALARS = {int: "an int", float: "a number", bool: "True or False", str: "a string", dict: "a mapping"}


class MissingKey(UserError, AttributeError):
    """A key a check reads that the section's class does not take: one line (a UserError), and still an
    AttributeError, so that ``getattr(settings, key, default)`` gives the default."""


class Settings(dict):
    """A model part's checked section (``network``, ``diffusion``): a dict whose keys read as attributes.
    ``_owner`` is (file, section, class) when ``_build`` made it, for the message about a missing key."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            if key.startswith("__") or "_owner" not in self.__dict__:
                raise AttributeError(key) from None
            path, section, cls = self.__dict__["_owner"]
            raise MissingKey(f"{path}: key '{section + '.' if section else ''}{key}' is read by a settings check, but "
                             f"{cls.__module__}.{cls.__qualname__} takes no parameter {key!r}; add it to its "
                             f"__init__, or take **kwargs and pass them on to the class it extends") from None

    def to_kwargs(self):  # a plain dict, lists copied
        return copy.deepcopy(dict(self))


def settings_of(cls, skip=0):
    """The YAML keys of a class: ``{name: (type or None, default or REQUIRED)}`` from a dataclass's fields,
    or else from the keyword parameters after the first ``skip`` (a diffusion's network) of its ``from_settings``
    if it has one, else of its constructor. The type is the annotation, else the default's; None: any value."""
    build = getattr(cls, "from_settings", None)  # how the class is made from its keys, else its constructor
    try:
        hints = typing.get_type_hints(cls if dataclasses.is_dataclass(cls) else build or cls.__init__)
    except Exception:  # unresolvable annotations: fall back to the defaults' types
        hints = {}
    if dataclasses.is_dataclass(cls):
        return {f.name: (hints.get(f.name), f.default_factory() if f.default_factory is not dataclasses.MISSING
                         else REQUIRED if f.default is dataclasses.MISSING else f.default)
                for f in dataclasses.fields(cls)}
    spec, parameters = {}, list(inspect.signature(build or cls).parameters.values())
    for param in parameters[skip:]:
        if param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            spec[param.name] = (hints.get(param.name) or _type_of(param.default), param.default)
    parent = cls.__mro__[1] if isinstance(cls, type) and len(cls.__mro__) > 2 else None
    if build is None and parent is not None and any(p.kind == p.VAR_KEYWORD for p in parameters):
        # a subclass passing **kwargs on takes its parent's keys too, the ones the parent gains later included
        for name, entry in settings_of(parent, skip).items():
            spec.setdefault(name, entry)
    return spec


def import_class(name, registry, key, path, what="class", base=None):
    """The class ``name`` gives for ``key``: an entry of ``registry`` (a short name), or ``package.module.Class``
    imported from PYTHONPATH; a UserError naming ``path`` and ``key`` otherwise.

    Args:
        what: what the class is, for messages ("network class", "probe head class").
        base: a class it must derive from, or None.
    """
    cls = import_entry(name, registry, key, path, what)
    if base is not None and not (isinstance(cls, type) and issubclass(cls, base)):
        raise UserError(f"{path}: key '{key}' {name!r} is not a {what}")
    return cls


def import_entry(name, registry, key, path, what):
    """``registry[name]``, or the object ``package.module.name`` imported from PYTHONPATH (``import_class``)."""
    entry, problem = find_entry(name, registry, what)
    if problem is not None:
        raise UserError(f"{path}: key '{key}' {problem}")
    return entry


def find_entry(name, registry, what):
    """``(entry, None)`` for ``import_entry``'s ``name``, or ``(None, what is wrong)``: the end of a message
    after the key ("must be one of ...", "'x.y' cannot be imported ..."), for a ``require`` to finish."""
    if name in registry:
        return registry[name], None
    module_name, _, attribute = str(name).rpartition(".")
    if not module_name:
        close = difflib.get_close_matches(str(name), list(registry), n=1, cutoff=0.6)
        return None, (f"must be one of {', '.join(registry)} or the import path of a {what} "
                      f"(package.module.Name), got {name!r}{f'; did you mean {close[0]!r}?' if close else ''}")
    try:
        return getattr(importlib.import_module(module_name), attribute), None
    except (ImportError, AttributeError) as err:
        return None, f"{name!r} cannot be imported ({err}); put its package on PYTHONPATH or fix the path"


def _type_of(default):
    items = {type(v) for v in default} if isinstance(default, (list, tuple)) else set()
    return type(default) if type(default) in SCALARS else list[items.pop()] if len(items) == 1 else None


@dataclass(kw_only=True)
class LinearConfig:
    """Linear probing (and noise-conditional classifier) settings."""

    # head_args are the keyword parameters of the head class that ``head`` names (model.heads.HEADS).
    PARTS: ClassVar[dict] = {"head_args": "head"}

    n_epoch: int = 15
    batch_size: int = 128           # per process
    lrate: float = 1.0e-3           # multiplied by the world size
    timestep: int                   # in the diffusion's feature_timesteps (DDPM 0..n_T, EDM 1..18)
    blockname: str                  # one of the network's block_names
    head: str = "linear"            # linear.py's probe head: a name of model.heads.HEADS, or package.module.Class
    head_args: dict = field(default_factory=Settings)  # the head's settings; absent: its defaults


class _TopLevel:
    """What every whole config offers the scripts; ``model.models.load_config`` also sets ``image_shape``,
    the (C, H, W) the network takes (not a key: the network's attribute)."""

    # The model parts: section -> the key naming its class (model.models resolves the name).
    PARTS: ClassVar[dict] = {"diffusion": "model_type", "network": "net_type"}

    def network_kwargs(self):  # keywords of the network, a plain dict
        return self.network.to_kwargs()

    def diffusion_kwargs(self):  # keywords of the diffusion wrapper after the network, a plain dict
        return self.diffusion.to_kwargs()

    def to_dict(self):
        """The config as plain YAML-ready data, in the file's key order."""
        return _plain_data(dataclasses.asdict(self))


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


def _plain_data(value):
    """``value`` with every mapping (a ``Settings`` too, at any depth) turned into a plain dict."""
    if isinstance(value, dict):
        return {key: _plain_data(item) for key, item in value.items()}
    return [_plain_data(item) for item in value] if isinstance(value, list) else value


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


def load_config(path, overrides=(), flags=None, allow_dit=False, parts=None, check=None, kinds=None, fill=None):
    """Read a YAML config, apply ``KEY=VALUE`` overrides and check it; a ``Config`` (or one of ``kinds``),
    or a UserError naming the file and the key. Scripts call ``model.models.load_config``.

    Args:
        overrides: strings ``dotted.key=value``; values are parsed as YAML (``True``, ``1e-4``, ``[1,2]``).
        flags: ``{dotted.key: (flag, value)}`` for a script's own flags that set a config value, e.g.
            ``{"linear.timestep": ("--timestep", args.timestep)}``, applied after ``overrides`` (None
            values skipped); an error about the key names the flag.
        allow_dit: accept the ``kinds`` (``model_type: DiT``); other scripts reject such a file.
        parts: ``parts(section, name, path) -> (cls, skip)``: the class taking a section (``network`` for
            net_type ``name``, ...) and how many of its leading parameters are not keys.
        check: ``check(cfg, require)``: the model's own checks, after the generic ones.
        kinds: ``{model_type: top-level config class}`` for files that are not a training ``Config``.
        fill: ``fill(raw)``: sets keys the file and overrides left out whose defaults the named classes give.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: file not found; pass an existing YAML file such as config/DDPM_ddpm.yaml")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"{path}: {_describe_yaml_error(err, text)}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of keys (model_type: ..., network: ...), "
                        f"got {_type_name(raw)}")
    overrides = [(override, f"--set {override}") for override in overrides or ()]
    overrides += [(f"{key}={value}", f"{flag} {value}") for key, (flag, value) in (flags or {}).items()
                  if value is not None]
    for override, _ in overrides:
        _apply_override(raw, override, path)
    raw.setdefault("save_dir", default_save_dir(path))
    if fill is not None:
        fill(raw)
    cls = (kinds or {}).get(raw.get("model_type"), Config)
    if cls is not Config and not allow_dit:
        raise UserError(f"{path}: model_type {raw['model_type']} is {cls.WHAT}; use it with {cls.SCRIPTS}")

    def require(ok, key, message):
        if not ok:
            raise UserError(f"{path}: key '{key}' {message}")

    try:
        owners = []  # the classes of the sections, each checks its own values
        cfg = cls(**_build(cls, raw, path, parts=parts, owners=owners))
        _check(cfg, require)
        for owner in owners:
            if hasattr(owner, "check_settings"):
                owner.check_settings(cfg, require)
        if check is not None:
            check(cfg, require)
    except UserError as err:
        raise UserError(f"{err}{_override_note(str(err), overrides)}") from None
    # Where each value came from, for later messages: the file, and what the user typed for a key.
    cfg.origin = {"path": str(path), "typed": {override.partition("=")[0].strip(): typed
                                               for override, typed in overrides}}
    return cfg


def save_config(cfg, path):
    """Write the resolved config as YAML atomically (utils.atomic); loading the file gives back an equal Config."""
    with atomic_path(Path(path), what="the config ") as temporary:
        Path(temporary).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None))
    return Path(path)


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
    typed = [typed for override, typed in overrides if f"'{override.partition('=')[0].strip()}'" in message]
    return f" (from {typed[-1]})" if typed else ""


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


def _build(cls, raw, path, section="", what="", skip=0, parts=None, owners=None):
    """The checked ``Settings`` of ``cls`` (see ``settings_of``) from the mapping ``raw``; its ``SECTIONS``
    and ``PARTS`` (named by another key, resolved by ``parts``) are built in turn, their classes listed in
    ``owners``. ``section`` names it in messages, ``what`` says for which model part."""
    where = f"{section}." if section else ""
    if not isinstance(raw, dict):
        raise UserError(f"{path}: key '{section}' must be a section of keys, got {_type_name(raw)} {raw!r}")
    spec = settings_of(cls, skip)
    for key in raw:
        if key not in spec:
            raise UserError(f"{path}: unknown key '{where}{key}'{what}{_suggest(key, spec, where)}")
    values = Settings()
    values._owner = (path, section, cls)
    for name, (annotation, default) in spec.items():
        if name not in raw and default is REQUIRED:
            raise UserError(f"{path}: missing required key '{where}{name}'{what}; add it to the file "
                            f"or pass --set {where}{name}=VALUE")
        if name in getattr(cls, "PARTS", {}):
            kind = values[cls.PARTS[name]]
            part, part_skip = parts(where + name, kind, path)
            owners.append(part)
            values[name] = _build(part, raw.get(name, {}), path, where + name, f" for {where}{cls.PARTS[name]} {kind}",
                                  part_skip, parts, owners)
        elif name not in raw:
            values[name] = list(default) if isinstance(default, tuple) else copy.deepcopy(default)
        elif name in getattr(cls, "SECTIONS", {}):
            owners.append(cls.SECTIONS[name])
            values[name] = _build(cls.SECTIONS[name], raw[name], path, name, parts=parts, owners=owners)
        else:
            values[name] = _convert(raw[name], annotation, path, where + name) if _checkable(annotation) else raw[name]
    return values


def _checkable(annotation):
    return (typing.get_args(annotation) or [None])[0] in SCALARS if typing.get_origin(annotation) is list \
        else annotation in SCALARS


def _suggest(key, known, prefix):
    close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
    return f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(prefix + k for k in known)}"


def _type_name(value):
    return type(value).__name__


def _convert(value, annotation, path, key):
    """``value`` as ``annotation`` (one of SCALARS or a list of them), or a UserError naming the key."""
    is_list = typing.get_origin(annotation) is list
    kind = typing.get_args(annotation)[0] if is_list else annotation
    try:
        if is_list and not isinstance(value, (list, tuple)):
            raise TypeError(kind)
        return [_scalar(item, kind) for item in value] if is_list else _scalar(value, kind)
    except (TypeError, ValueError):
        hint = "; quote it" if kind is str and isinstance(value, (int, float, bool)) else \
            f"; write {int(value)}" if kind is int and isinstance(value, float) and value.is_integer() else ""
        described = f"a list of {kind.__name__}s" if is_list else SCALARS[kind]
        raise UserError(f"{path}: key '{key}' must be {described}, got {_type_name(value)} {value!r}{hint}") from None


def _scalar(value, kind):
    if isinstance(value, bool) == (kind is bool):  # YAML's True is no number, and 1 is no bool
        if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            if math.isfinite(number := float(value)):
                return number
        elif kind is float and isinstance(value, (int, float)):
            return float(value)
        elif kind is dict and isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
        elif kind in (bool, int, str) and isinstance(value, kind):
            return value
    raise TypeError(kind)


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
