"""Checkpoint files: atomic writes, safe loads, RNG state, and finding ``save_dir/ckpts/model_{epoch}.pth``.

Everything stored is a tensor or a plain Python value, so every file loads with
``torch.load(..., weights_only=True)``; that includes the RNG states (see ``capture_rng_state``).
"""
import errno
import hashlib
import io
import os
import random
import re

import numpy as np
import torch

from utils.atomic import atomic_path
from utils.errors import UserError, describe_error

CHECKPOINT_NAME = re.compile(r"^model_(\d+)\.pth$")
# How torch.save's zip writer reports a write that failed (a full disk, a quota).
TORCH_WRITE_FAILURES = ("inline_container.cc", "PytorchStreamWriter failed")
# The first bytes of a torch.save file: a zip archive (torch >= 1.6) or a pickle (the legacy format).
TORCH_FILE_MAGIC = (b"PK\x03\x04", b"\x80")
# The time and signal checkpoint of train.py, replaced at each write; evaluation scripts never list it.
LATEST_NAME = "latest.pth"
TEMPORARY_NAME = re.compile(r"^\..+\.pth\.\d+\.tmp$")  # utils.atomic's name while a checkpoint is written
DIT_URL = "https://dl.fbaipublicfiles.com/DiT/models/"


def save_checkpoint(obj, path, what="checkpoint"):
    """Write ``obj`` to ``path`` with ``torch.save`` through ``utils.atomic``: a crash never leaves a partial file.
    ``what`` names the file in messages (a probe's resume state is no checkpoint of a model)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the {what} folder {folder} ({describe_error(err)}); "
                        f"choose a writable save_dir") from None
    with atomic_path(path, what=f"{what} ", fix="free disk space or set save_dir to a disk with room",
                     durable=True) as temporary:
        with open(temporary, "wb") as file:
            try:
                torch.save(obj, file)
            except RuntimeError as err:
                failure = write_failure(err)
                if failure is err:
                    raise
                raise failure from None


def write_failure(err):
    """``err``, a RuntimeError of ``torch.save``, as the OSError behind it when it is a failed write (torch
    reports a full disk as "[enforce fail at inline_container.cc:...] . unexpected pos N vs M"); any
    other RuntimeError unchanged."""
    message = str(err)
    if not any(mark in message for mark in TORCH_WRITE_FAILURES):
        return err
    if isinstance(err.__context__, OSError):  # the file object's own error, e.g. ENOSPC
        return err.__context__
    return OSError(errno.EIO, f"torch.save could not write the file: {message.splitlines()[0][:120]}")


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint dict written by ``save_checkpoint`` or by the original code; a UserError for a file that is
    missing, truncated, not a PyTorch file, holds arbitrary Python objects, or is not a dict."""
    return read_checkpoint(path, map_location, hashed=False)[0]


def read_checkpoint(path, map_location="cpu", hashed=True):
    """``(checkpoint dict, hex SHA-256 of the bytes it was loaded from)``: one read of the file serves both, so
    the hash is the loaded weights' even when the file is replaced meanwhile (``hashed=False``: no hash, None).
    The errors of ``load_checkpoint``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found; check save_dir and --epoch, or train first")
    try:
        if hashed:
            with open(path, "rb") as file:
                data = file.read()
            digest = hashlib.sha256(data).hexdigest()
            source = io.BytesIO(data)
        else:
            data, digest, source = None, None, path
        checkpoint = torch.load(source, map_location=map_location, weights_only=True)
    except OSError as err:
        raise UserError(f"checkpoint {path} cannot be read ({describe_error(err)}); check the file") from None
    except Exception as err:  # torch.load signals a damaged file with many exception types
        unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if unsupported:
            raise UserError(f"checkpoint {path} holds a Python object ({unsupported.group(1)}) "
                            f"besides tensors and plain values; re-save it with tensors and plain "
                            f"values only") from None
        head = data[:4] if data is not None else _head(path)
        if not head.startswith(TORCH_FILE_MAGIC):  # not damaged: simply some other kind of file
            raise UserError(f"{path} is not a PyTorch checkpoint (torch.save writes a zip or pickle file); "
                            f"pass a model_{{epoch}}.pth written by train.py") from None
        fix = "delete it and use another epoch" if CHECKPOINT_NAME.match(os.path.basename(path)) else \
            "download or copy it again"  # a file from elsewhere (a publisher's .pt): no other epoch to use
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({describe_error(err)}); it is "
                        f"truncated or damaged: {fix}") from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict; "
                        f"pass a model_{{epoch}}.pth file written by training")
    return checkpoint, digest


def _head(path):
    with open(path, "rb") as file:
        return file.read(4)


def weights_digest(module):
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes): which weights made an output."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def seed_everything(seed):
    """Seed torch, numpy's global generator and Python's ``random``: the generators ``capture_rng_state`` saves."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def capture_rng_state():
    """The state of torch's (CPU, this process's CUDA device), numpy's global and Python's ``random`` generators,
    as tensors and plain values: numpy's and ``random``'s str, ndarray and tuple, which ``weights_only``
    loading rejects, are stored as int64 tensors and numbers."""
    _, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    python_version, python_words, python_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(numpy_keys.astype(np.int64)), "pos": int(numpy_pos),
                  "has_gauss": int(numpy_has_gauss), "cached_gaussian": float(numpy_gauss)},
        "python": {"version": python_version, "state": torch.tensor(python_words, dtype=torch.int64),
                   "gauss_next": python_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This process's device only: touching every GPU would open a CUDA context on each of them
        # from every rank. Each rank saves and restores its own state.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state):
    """Put back the generators saved by ``capture_rng_state`` (CUDA's on this process's current device)."""
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"],
                         numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"].tolist()),
                     python_state["gauss_next"]))


def checkpoint_path(save_dir, epoch):
    """``save_dir/ckpts/model_{epoch}.pth``, the original's naming."""
    return os.path.join(save_dir, "ckpts", f"model_{epoch}.pth")


def list_checkpoints(save_dir):
    """``{epoch: path}`` of the checkpoints in ``save_dir/ckpts``, by increasing epoch."""
    folder = os.path.join(save_dir, "ckpts")
    if not os.path.isdir(folder):
        return {}
    found = {}
    for name in os.listdir(folder):
        match = CHECKPOINT_NAME.match(name)
        if match:
            found[int(match.group(1))] = os.path.join(folder, name)
    return dict(sorted(found.items()))


def latest_checkpoint(save_dir):
    """Path of the highest-epoch checkpoint in ``save_dir``, or None when there is none."""
    checkpoints = list_checkpoints(save_dir)
    return checkpoints[max(checkpoints)] if checkpoints else None


def latest_path(save_dir):
    """``save_dir/ckpts/latest.pth``, train.py's checkpoint by time and on signals (possibly mid-epoch)."""
    return os.path.join(save_dir, "ckpts", LATEST_NAME)


def checkpoint_position(path):
    """How far the training checkpoint at ``path`` got: ``(epoch, batch, step)``, where epoch is the last
    finished one (from the file, else its name model_{epoch}.pth), batch the batches of the next epoch
    already trained (mid-epoch latest.pth; else 0) and step the optimizer steps (-1 when not stored)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # an older (non-zip) file, or a damaged one: the full load says which
        checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict):
        checkpoint = load_checkpoint(path)  # raises the one-line error
    return checkpoint_epoch(checkpoint, path), int(checkpoint.get("batch", 0)), int(checkpoint.get("step", -1))


def resume_checkpoint(save_dir):
    """Where training continues from: latest.pth or the highest-epoch model_{epoch}.pth, whichever got
    further by what it stores (epoch, then batch within the next epoch, then step), never by file times,
    which a copy without ``cp -p`` resets. None when there is neither."""
    candidates = [path for path in (latest_path(save_dir), latest_checkpoint(save_dir))
                  if path is not None and os.path.isfile(path)]
    if len(candidates) < 2:
        return candidates[0] if candidates else None
    return max(candidates, key=checkpoint_position)  # a tie keeps latest.pth: the same training state


def remove_stale_temporaries(save_dir):
    """Delete the hidden temporaries (``.name.PID.tmp``) that checkpoint writes killed midway left in
    ``save_dir/ckpts``; each can be as large as a checkpoint. Call it before this run writes any. Returns
    the paths removed."""
    folder = os.path.join(save_dir, "ckpts")
    stale = [os.path.join(folder, name) for name in (os.listdir(folder) if os.path.isdir(folder) else [])
             if TEMPORARY_NAME.match(name)]
    for path in stale:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
    return stale


def find_resume_checkpoint(cfg, resume, config_path):
    """The checkpoint a training run continues from, or None for a fresh run.

    ``resume`` is train.py's ``--resume``: None, True (the flag alone), "auto" or a path; ``config_path``
    names the YAML file in the error about its ``load_epoch``. True and "auto" take latest.pth or the
    highest model_{epoch}.pth, whichever got further (``resume_checkpoint``); with nothing there, "auto"
    starts fresh.
    """
    folder = os.path.join(cfg.save_dir, "ckpts")
    if resume is True or resume == "auto":
        path = resume_checkpoint(cfg.save_dir)
        if path is None and resume is True:
            raise UserError(f"--resume: no checkpoint to resume in {folder}; start without --resume, "
                            f"use --resume auto to start fresh when there is none, or pass --resume PATH "
                            f"to a checkpoint file")
        return path
    if resume:
        if not os.path.isfile(resume):
            raise UserError(f"--resume {resume}: file not found; pass a checkpoint such as "
                            f"{checkpoint_path(cfg.save_dir, 0)}, or --resume alone for the latest in save_dir")
        return resume
    saved = list_checkpoints(cfg.save_dir)
    if cfg.load_epoch != -1:
        if cfg.load_epoch not in saved:
            found = ", ".join(map(str, saved)) or "none"
            raise UserError(f"{config_path}: key 'load_epoch' is {cfg.load_epoch}, but {folder} has no "
                            f"model_{cfg.load_epoch}.pth (saved epochs: {found}); set load_epoch to one "
                            f"of them or -1")
        return saved[cfg.load_epoch]
    newest = resume_checkpoint(cfg.save_dir)
    if newest is not None:
        raise UserError(f"save_dir {cfg.save_dir} already holds checkpoints (the newest is {newest}); "
                        f"pass --resume to continue that run, or choose another folder with --set save_dir=DIR")
    return None


def checkpoint_epoch(checkpoint, path):
    """The epoch a checkpoint ends: its ``epoch`` entry, else the N of its name model_N.pth."""
    if "epoch" in checkpoint:
        return int(checkpoint["epoch"])
    match = CHECKPOINT_NAME.match(os.path.basename(path))
    if match is None:
        raise UserError(f"{path}: no 'epoch' entry and the name is not model_{{epoch}}.pth; rename it "
                        f"to model_{{epoch}}.pth after the epoch it ends")
    return int(match.group(1))


def epoch_settings(world_size, batch_size, accum, drop_last):
    """The settings that decide which images each batch of an epoch holds: a mid-epoch latest.pth
    continues only with the same ones (a model_{epoch}.pth with any)."""
    return {"processes": world_size, "batch_size": batch_size, "accum": accum, "drop_last": bool(drop_last)}


def setting_fix(key, saved):
    """How to run with the setting ``key`` a mid-epoch checkpoint was ``saved`` with."""
    if key == "processes":
        return f"launch {saved} process(es) in all (python -m utils.launch --nproc_per_node x --nnodes)"
    if key == "batch_size":
        return f"pass --set batch_size={saved}"
    if key == "accum":
        return f"pass --accum {saved}"
    return "pass --drop_last" if saved else "leave out --drop_last"


def check_mid_epoch_settings(checkpoint, path, settings):
    """Refuse, before any work, to continue a mid-epoch checkpoint with other ``epoch_settings``: the
    epoch's remaining batches would not be the ones it left (None: a fresh run). Files written before the
    checkpoint recorded its settings are checked on what they hold (processes, the config's batch_size)."""
    if not (checkpoint or {}).get("batch"):
        return
    saved = checkpoint.get("settings")
    if saved is None:
        saved = {"processes": len(checkpoint.get("epoch_loss", ())) or None,
                 "batch_size": (checkpoint.get("config") or {}).get("batch_size")}
    position = f"batch {checkpoint['batch']} of epoch {int(checkpoint.get('epoch', -1)) + 1}"
    for key, wanted in settings.items():
        if saved.get(key) is not None and saved[key] != wanted:
            raise UserError(f"{path} stopped mid-epoch ({position}) with {key} {saved[key]}, and this run has "
                            f"{key} {wanted}: the rest of that epoch would not be the batches it left; "
                            f"{setting_fix(key, saved[key])}, or continue from a model_{{epoch}}.pth with "
                            f"--resume PATH")


def resolve_checkpoint(save_dir, epoch, n_epoch=None):
    """Path of the checkpoint of ``epoch``, which must exist.

    Args:
        epoch: an epoch number, or -1 for the final epoch ``n_epoch - 1`` (the original's
            ``load_epoch: -1``); with ``n_epoch`` None, -1 means the latest saved checkpoint.
        n_epoch: the number of training epochs of the run.
    """
    checkpoints = list_checkpoints(save_dir)
    folder = os.path.join(save_dir, "ckpts")
    if epoch < -1:
        raise UserError(f"epoch {epoch} is not valid; pass an epoch number or -1 for the last one")
    if not checkpoints:
        raise UserError(f"no checkpoints in {folder}; train first or point save_dir at a run folder")
    saved = ", ".join(str(e) for e in checkpoints)
    if epoch == -1:
        if n_epoch is None:
            return checkpoints[max(checkpoints)]
        epoch = n_epoch - 1
        if epoch not in checkpoints:
            raise UserError(f"epoch -1 means the final epoch {epoch} (n_epoch {n_epoch}), which has "
                            f"no checkpoint in {folder}; saved epochs: {saved}; pass --epoch with "
                            f"one of them")
    if epoch not in checkpoints:
        raise UserError(f"no checkpoint for epoch {epoch} in {folder}; saved epochs: {saved}; "
                        f"pass --epoch with one of them")
    return checkpoints[epoch]


def pretrained_dit_path(path):
    """``path`` if the DiT checkpoint is there, else a UserError saying where to get it and put it."""
    if not os.path.isfile(path):
        raise UserError(f"DiT checkpoint {path} not found; download {DIT_URL}DiT-XL-2-256x256.pt (or another "
                        f"DiT release) and put it at {path}, or pass --ckpt PATH")
    return path


def strip_module_prefix(state_dict):
    """A copy of ``state_dict`` with the leading ``module.`` of DistributedDataParallel keys removed."""
    return {key.removeprefix("module."): value for key, value in state_dict.items()}
