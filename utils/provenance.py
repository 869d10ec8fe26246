"""What produced a result: the weights by content hash, the config, the command, the code and the machine.

    record = provenance(checkpoint, cfg, device, seed)   # one dict, stored under "provenance" in every result
    data, digest = read_hashed(path)                     # a file's bytes and their SHA-256, from one read
    tag = f"{stem}_{short_digest(checkpoint)}"           # "sha1a2b3c4d": a result name that differs per model

A checkpoint is a file (ours, the original's, a DiT release) or a diffusers folder. A file's identity is the
SHA-256 of its bytes (``sha256sum FILE``); a folder's is the SHA-256 of what ``sha256sum`` prints for the
files that define the model (the UNet's config.json and weights, the scheduler's config), by sorted name
(``folder_check`` gives the command). The model loaders hash the very bytes they load, from one read
(``model.models.load_weights``, ``model.diffusers_unet.read_folder``) and ``remember`` the identity, so a
file replaced or deleted while the run works changes neither the record nor its end: every later question
about that checkpoint in this process (``weights_identity``, ``short_digest``, ``provenance``) gets what was
loaded, and nothing reads the file again. A checkpoint not loaded in this process is hashed when asked, never
from a cache of its size and time (a rewrite can keep both).
"""
import functools
import hashlib
import os
import shlex
import subprocess
import sys

import torch

from utils.distributed import get_world_size
from utils.errors import UserError

# A diffusers folder's weights, in the order diffusers prefers them (model/diffusers_unet.py reads them).
DIFFUSERS_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SHORT_DIGEST = 8  # hex digits of the hash in file and folder names: collisions need ~65,000 models
CHUNK = 1 << 20
_loaded = {}  # absolute checkpoint path -> the weights_identity of what this process last loaded from it


def weights_file(checkpoint):
    """The file whose bytes are the weights of ``checkpoint``: the file itself, or a diffusers folder's
    ``diffusion_pytorch_model.*`` (in ``unet/`` for a pipeline folder, else at its root)."""
    if not os.path.isdir(checkpoint):
        return checkpoint
    for folder in (os.path.join(checkpoint, "unet"), checkpoint):
        for name in DIFFUSERS_WEIGHT_FILES:
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
    raise UserError(f"diffusers folder {checkpoint} has no {DIFFUSERS_WEIGHT_FILES[0]} (nor .bin) in it or in "
                    f"its unet/; pass a complete folder")


def folder_files(folder):
    """The files, relative to ``folder``, that define a diffusers folder's model: the UNet's config.json and
    weights file, and the scheduler's config when the folder has one (sorted)."""
    weights = os.path.relpath(weights_file(folder), folder)
    unet = os.path.dirname(weights)
    names = [os.path.join(unet, "config.json"), weights]
    scheduler = os.path.join("scheduler", "scheduler_config.json") if unet else "scheduler_config.json"
    if os.path.isfile(os.path.join(folder, scheduler)):
        names.append(scheduler)
    return sorted(names)


def read_hashed(path):
    """``(bytes, hex SHA-256)`` of the file at ``path``, from one read: load from these bytes, and the hash is
    the loaded bytes'."""
    with open(path, "rb") as file:
        data = file.read()
    return data, hashlib.sha256(data).hexdigest()


def file_sha256(path):
    """Hex SHA-256 of the file at ``path`` as it is now, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(functools.partial(file.read, CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_identity(path, sha256):
    """The ``weights_identity`` of a checkpoint file whose bytes hash to ``sha256``."""
    return {"path": os.path.abspath(path), "file": os.path.abspath(path), "sha256": sha256}


def folder_identity(folder, digests):
    """The ``weights_identity`` of a diffusers folder from ``digests``, ``{name: sha256}`` of its ``folder_files``:
    ``sha256`` hashes the lines ``sha256sum`` prints for them (``HEX  NAME``) in sorted order, which
    ``check`` (the command) prints too."""
    names = sorted(digests)
    listing = "".join(f"{digests[name]}  {name}\n" for name in names)
    return {"path": os.path.abspath(folder), "file": os.path.abspath(weights_file(folder)),
            "sha256": hashlib.sha256(listing.encode()).hexdigest(), "files": {name: digests[name] for name in names},
            "check": folder_check(folder, names)}


def folder_check(folder, names):
    """The command that prints a diffusers folder's identity: ``cd FOLDER && sha256sum NAMES | sha256sum``."""
    return f"cd {shlex.quote(os.path.abspath(folder))} && sha256sum {' '.join(map(shlex.quote, names))} | sha256sum"


def remember(checkpoint, identity):
    """Record that this process loaded ``identity`` (a ``weights_identity``) from ``checkpoint``: later
    questions about ``checkpoint`` get it, whatever happens to the file since."""
    _loaded[os.path.abspath(checkpoint)] = identity
    return identity


def weights_identity(checkpoint):
    """``{"path", "file", "sha256"}`` (a folder's also ``"files"`` and ``"check"``) of a checkpoint file or
    diffusers folder (absolute paths): what this process loaded from it, else what it holds now."""
    loaded = _loaded.get(os.path.abspath(checkpoint))
    if loaded is not None:
        return loaded
    if os.path.isdir(checkpoint):
        return folder_identity(checkpoint, {name: file_sha256(os.path.join(checkpoint, name))
                                            for name in folder_files(checkpoint)})
    return file_identity(checkpoint, file_sha256(checkpoint))


def short_digest(checkpoint):
    """``sha`` and the first hex digits of the weights' hash, e.g. ``sha1a2b3c4d``: the part of a result's
    name that keeps two models of one file name apart."""
    return f"sha{weights_identity(checkpoint)['sha256'][:SHORT_DIGEST]}"


def refuse_unkeyed_state(old_path, new_path, checkpoint, what="state"):
    """Stop when ``old_path``, a resume state named before names held the weights' hash, exists and
    ``new_path`` (its name now) does not: it may belong to another model of the same file name. The fix
    names both files, so the user who knows it is this model's keeps it by renaming."""
    if old_path != new_path and os.path.isfile(old_path) and not os.path.exists(new_path):
        raise UserError(f"{old_path} is a {what} from before results were named by the weights' hash, so it may be "
                        f"another model's; if it is {checkpoint}'s, rename it to {new_path} to resume it, "
                        f"else delete it (or move it away) to start over")


def check_same_weights(state_path, recorded, identity, fix):
    """Refuse the state at ``state_path`` unless it records (``recorded``, a ``weights_identity`` or None)
    the weights of ``identity``: one line naming both models, ending in ``fix``."""
    if recorded is None:
        raise UserError(f"{state_path} records no hash of the weights it was made with, so it may be another "
                        f"model's than {identity['path']}; {fix}")
    if recorded["sha256"] != identity["sha256"]:
        raise UserError(f"{state_path} was made with {recorded['path']} (sha256 {recorded['sha256'][:12]}...), not "
                        f"{identity['path']} (sha256 {identity['sha256'][:12]}...); {fix}")


LAUNCHERS = ("torchrun", "torch.distributed.run", "torch.distributed.launch", "utils.launch")


def command():
    """The command line that produced this process: ``sys.argv``; under ``torchrun`` or ``python -m
    utils.launch`` (a worker whose environment holds torchrun's TORCHELASTIC_RUN_ID) the launcher's, with its
    options and the script's, read from its process, this worker's parent (``/proc/PPID/cmdline``, Linux).
    Where that cannot be read, the worker's ``sys.argv``."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return list(sys.argv)
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as file:
            parts = file.read().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return list(sys.argv)
    if len(parts) > 1 and os.path.basename(parts[1]) == "torchrun":  # the torchrun script, run by its shebang
        parts = ["torchrun", *parts[2:]]
    if not any(part in LAUNCHERS or os.path.basename(part) in LAUNCHERS for part in parts[:3]):
        return list(sys.argv)
    return parts


@functools.cache
def code_version():
    """The git commit of this checkout, with ``+dirty`` when tracked files differ from it; "unknown (not
    a git checkout)" when there is no git or no repository."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*arguments):
        return subprocess.run(["git", "-C", root, *arguments], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return commit + ("+dirty" if dirty else "")


def provenance(checkpoint=None, cfg=None, device=None, seed=None, **extra):
    """The record of what produced a result, stored under ``"provenance"`` in every result file.

    Args:
        checkpoint: the evaluated weights: a path (file or diffusers folder), a list of paths (one per
            measured checkpoint), or None (a network trained by the script itself: pass its file later).
        cfg: the resolved config (a ``utils.config.Config`` / ``DiTConfig``, or a plain dict of flags).
        device: where it ran (``torch.device`` or str).
        seed: the run's seed.
        extra: further entries (e.g. ``config_file``).

    Returns:
        ``{"weights", "config", "command", "version", "torch", "device", "processes", "seed", ...}``;
        ``weights`` is ``weights_identity`` (a list of them for a list of paths): what this process loaded
        from the path, so ask after the load; ``command`` is ``command()``.
    """
    if isinstance(checkpoint, (list, tuple)):
        weights = [weights_identity(path) for path in checkpoint]
    else:
        weights = None if checkpoint is None else weights_identity(checkpoint)
    config = cfg.to_dict() if hasattr(cfg, "to_dict") else cfg
    return {"weights": weights, "config": config, "command": command(),
            "version": code_version(), "torch": str(torch.__version__),
            "device": None if device is None else str(device), "processes": get_world_size(), "seed": seed,
            **extra}
