"""What produced a result: the weights by content hash, the config, the command, the code and the machine.

    record = provenance(checkpoint, cfg, device, seed)   # one dict, stored under "provenance" in every result
    digest = file_sha256(path)                           # a file's SHA-256, read once per process
    tag = f"{stem}_{short_digest(checkpoint)}"           # "sha1a2b3c4d": a result name that differs per model

A checkpoint is a file (ours, the original's, a DiT release) or a diffusers folder; its identity is the
SHA-256 of its weights file (``weights_file``). Hashing streams the file in chunks (about 1.5 GB/s on
one core when the file is in the page cache, so a 2 GB DiT file adds about 1.5 s) and remembers the
answer per (path, size, modification time), so one run hashes each file once however many cells,
epochs or records ask.
"""
import functools
import hashlib
import os
import subprocess
import sys

import torch

from utils.distributed import get_world_size
from utils.errors import UserError

# A diffusers folder's weights, in the order diffusers prefers them (model/diffusers_unet.py reads them).
DIFFUSERS_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SHORT_DIGEST = 8  # hex digits of the hash in file and folder names: collisions need ~65,000 models
CHUNK = 1 << 20
_digests = {}  # (real path, size, mtime_ns) -> hex digest, for this process


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


def file_sha256(path):
    """Hex SHA-256 of the file at ``path``, streamed; computed once per process for each version of the file."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            for chunk in iter(functools.partial(file.read, CHUNK), b""):
                digest.update(chunk)
        _digests[key] = digest.hexdigest()
    return _digests[key]


def weights_identity(checkpoint):
    """``{"path", "file", "sha256"}`` of a checkpoint file or diffusers folder (absolute paths)."""
    file = weights_file(checkpoint)
    return {"path": os.path.abspath(checkpoint), "file": os.path.abspath(file), "sha256": file_sha256(file)}


def short_digest(checkpoint):
    """``sha`` and the first hex digits of the weights' hash, e.g. ``sha1a2b3c4d``: the part of a result's
    name that keeps two models of one file name apart."""
    return f"sha{file_sha256(weights_file(checkpoint))[:SHORT_DIGEST]}"


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
        ``weights`` is ``weights_identity`` (a list of them for a list of paths).
    """
    if isinstance(checkpoint, (list, tuple)):
        weights = [weights_identity(path) for path in checkpoint]
    else:
        weights = None if checkpoint is None else weights_identity(checkpoint)
    config = cfg.to_dict() if hasattr(cfg, "to_dict") else cfg
    return {"weights": weights, "config": config, "command": list(sys.argv),
            "version": code_version(), "torch": torch.__version__,
            "device": None if device is None else str(device), "processes": get_world_size(), "seed": seed,
            **extra}
