"""The VAE latent cache of a DiT evaluation: written once by encode_latents.py, read from disk by the probes.

    python encode_latents.py --config config/DiT_XL_2_cifar.yaml
    train_set, test_set = latent_datasets(cfg)   # a random cached copy of each training latent per read

Layout of ``latents.cache_dir``:

    train_{c}.npy                       (N, 4, 32, 32) latents of augmented copy c = 0 .. copies-1
    test.npy                            (M, 4, 32, 32) latents of the test split, not augmented
    train_labels.npy, test_labels.npy   int64 labels
    cache.json                          how the latents were made; a run with other settings stops

Every .npy is a plain NumPy file (float16 or float32) that the probes open memory-mapped, so memory
stays flat whatever the number of copies. A latent file appears only once complete: it is written
as ``{name}.partial.npy`` and renamed at the end, so a killed run resumes at the first missing file.
"""
import json
import os
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.atomic import atomic_path
from utils.config import LinearConfig, Settings, _TopLevel
from utils.data import image_seed
from utils.errors import UserError

CACHE_DTYPES = ("float16", "float32")
VAE_DOWNSAMPLING = 8  # the SD VAE's latents are 1/8 of the image side


@dataclass(kw_only=True)
class LatentSettings:
    """The ``latents`` section of a DiT config: the VAE latent cache a DiT is evaluated on."""

    vae: str = "pretrained/sd-vae-ft-mse"  # local folder of diffusers' AutoencoderKL
    cache_dir: str                  # one .npy per training copy plus the test split
    copies: int = 10                # augmented copies of the training split
    source_size: int = 32           # side of the dataset's images (CIFAR 32, Tiny ImageNet 64)
    crop_padding: int = 4           # RandomCrop(source_size, padding) of the training copies
    image_size: int = 256           # images are resized to this (bilinear) before encoding
    scale: float = 0.18215          # latent = scale * a draw from the VAE's posterior
    dtype: str = "float16"          # storage: float16 or float32
    batch_size: int = 64            # images per VAE call and process

    @staticmethod
    def check_settings(cfg, require):
        latents, input_size = cfg.latents, cfg.network.get("input_size")
        for key in ("copies", "source_size", "batch_size"):
            require(latents[key] >= 1, f"latents.{key}", f"must be at least 1, got {latents[key]}")
        require(latents.crop_padding >= 0, "latents.crop_padding", f"must be 0 or positive, got {latents.crop_padding}")
        require(latents.image_size == input_size * VAE_DOWNSAMPLING, "latents.image_size",
                f"must be {VAE_DOWNSAMPLING} x network.input_size ({input_size * VAE_DOWNSAMPLING}): the VAE's "
                f"latents are 1/{VAE_DOWNSAMPLING} of the image side; got {latents.image_size}")
        require(latents.scale > 0, "latents.scale", f"must be positive, got {latents.scale}")
        require(latents.dtype in CACHE_DTYPES, "latents.dtype",
                f"must be one of {', '.join(CACHE_DTYPES)}, got {latents.dtype!r}")
        for key in ("vae", "cache_dir"):
            require(latents[key] != "", f"latents.{key}", "must not be empty")
        require(cfg.ckpt != "", "ckpt", "must not be empty")

SETTINGS_FILE = "cache.json"
# Keys of cache.json that decide the bytes of the latents.
IDENTITY_KEYS = ("dataset", "n_train", "n_test", "seed", "source_size", "crop_padding", "image_size", "scale",
                 "dtype", "latent_shape", "vae_sha256", "precision")
COPY_STRIDE = 2 ** 24  # seeds of one copy: image indices below this never meet another copy's seeds
TEST_COPY = -1


@dataclass(kw_only=True)
class DiTConfig(_TopLevel):
    """``model_type: DiT``: a pre-trained DiT evaluated as a DDAE on cached VAE latents (SPEC §12); nothing is
    trained. Only the scripts that evaluate a DiT accept it (``load_config(..., allow_dit=True)``)."""

    WHAT: ClassVar[str] = "a pre-trained network evaluated on cached latents"
    SCRIPTS: ClassVar[str] = "linear.py, knn.py, export_features.py and encode_latents.py"

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


def split_name(copy):
    """File stem of a training copy (0, 1, ...) or of the test split (``TEST_COPY``)."""
    return "test" if copy == TEST_COPY else f"train_{copy}"


def latent_seed(seed, copy, index):
    """Generator seed of image ``index`` of training copy ``copy`` (``TEST_COPY``: the test split).

    Every (copy, index) of a run gets a distinct seed, also in the low 32 bits that a CPU generator
    uses, as long as index < 2^24 and fewer than 255 copies.
    """
    return image_seed(seed, (copy + 1) * COPY_STRIDE + index)


def save_array(array, path):
    """``np.save`` through a temporary file, so ``path`` is absent or complete."""
    with atomic_path(path, fix="set latents.cache_dir to a writable folder") as temporary:
        with open(temporary, "wb") as file:
            np.save(file, array)


def prepare_cache(cache_dir, settings, copies, train_labels, test_labels):
    """Check ``cache_dir`` against ``settings``, record them and the labels, and list what is missing.

    Returns:
        the copies still to encode, in order (``TEST_COPY`` for the test split).
    """
    settings_path = os.path.join(cache_dir, SETTINGS_FILE)
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {cache_dir} ({err.strerror}); set latents.cache_dir to a writable "
                        f"folder") from None
    if os.path.isfile(settings_path):
        recorded = read_settings(cache_dir)
        wanted = json.loads(json.dumps({key: settings[key] for key in IDENTITY_KEYS}))
        differing = [key for key in IDENTITY_KEYS if recorded.get(key) != wanted[key]]
        if differing:
            before = ", ".join(f"{key}={recorded.get(key)}" for key in differing)
            now = ", ".join(f"{key}={wanted[key]}" for key in differing)
            raise UserError(f"{cache_dir} holds latents made with {before}, but this run has {now}; set "
                            f"latents.cache_dir to another folder, or delete that one to start over")
    elif any(name.endswith(".npy") for name in os.listdir(cache_dir)):
        raise UserError(f"{cache_dir} holds .npy files but no {SETTINGS_FILE} says how they were made; set "
                        f"latents.cache_dir to a new folder, or delete that one")
    with atomic_path(settings_path, fix="set latents.cache_dir to a writable folder") as temporary:
        with open(temporary, "w") as file:
            json.dump(settings, file, indent=1)
    for split, labels in (("train", train_labels), ("test", test_labels)):
        save_array(np.asarray(labels, dtype=np.int64), os.path.join(cache_dir, f"{split}_labels.npy"))
    return [copy for copy in [*range(copies), TEST_COPY]
            if not os.path.isfile(os.path.join(cache_dir, f"{split_name(copy)}.npy"))]


def read_settings(cache_dir):
    path = os.path.join(cache_dir, SETTINGS_FILE)
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is unreadable ({err}); delete the folder {cache_dir} and encode again") from None


def partial_path(cache_dir, copy):
    return os.path.join(cache_dir, f"{split_name(copy)}.partial.npy")


def create_partial(cache_dir, copy, n_images, latent_shape, dtype):
    """An empty (n_images, *latent_shape) array file for one copy, replacing a stale partial one."""
    path = partial_path(cache_dir, copy)
    try:
        np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=(n_images, *latent_shape)).flush()
    except OSError as err:
        raise UserError(f"cannot write {path} ({err.strerror or err}); free disk space or set latents.cache_dir "
                        f"to a writable folder (a rerun keeps the copies already finished)") from None


def finish_partial(cache_dir, copy):
    """Give a completely written copy its final name."""
    os.replace(partial_path(cache_dir, copy), os.path.join(cache_dir, f"{split_name(copy)}.npy"))


class LatentCache(Dataset):
    """Cached latents of one split, read from disk one item at a time: ``(latent (C, H, W) float32, label)``.

    Args:
        cache_dir: the folder encode_latents.py wrote.
        split: "train" or "test".
        copies: training copies to read (train_0 .. train_{copies-1}).
        copy: None: each read picks one of the copies at random (torch's generator); an int: that copy.

    The arrays are opened memory-mapped, lazily in each process that reads (data-loader workers
    included), and are never pickled; nothing but the labels is held in memory.
    """

    def __init__(self, cache_dir, split, copies=1, copy=None):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        names = [f"train_{c}" for c in range(copies)] if split == "train" else ["test"]
        if split == "train" and copy is not None:
            names = [names[copy]]
        self.paths = [os.path.join(cache_dir, f"{name}.npy") for name in names]
        for path in self.paths + [os.path.join(cache_dir, f"{split}_labels.npy")]:
            if not os.path.isfile(path):
                raise UserError(f"latent cache file {path} not found; encode the latents first: "
                                f"python encode_latents.py --config <this config>")
        settings = read_settings(cache_dir)
        self.targets = np.load(os.path.join(cache_dir, f"{split}_labels.npy")).tolist()
        self.classes = list(settings.get("classes", []))
        self.num_classes = settings.get("num_classes", len(self.classes))
        self._arrays = None
        for array in self._open():
            if array.shape[0] != len(self.targets):
                raise UserError(f"{self.paths[0]}: {array.shape[0]} latents but {len(self.targets)} labels; "
                                f"delete {cache_dir} and encode again")
        self.latent_shape = tuple(self._open()[0].shape[1:])

    def _open(self):
        if self._arrays is None:
            self._arrays = [np.load(path, mmap_mode="r") for path in self.paths]
        return self._arrays

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"] = None  # a memmap would pickle its whole content
        return state

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        arrays = self._open()
        which = int(torch.randint(len(arrays), ())) if len(arrays) > 1 else 0
        return torch.from_numpy(np.array(arrays[which][index], dtype=np.float32)), self.targets[index]


def latent_datasets(cfg, train_copy=None):
    """(training split, test split) of the latent cache of a DiT config.

    Args:
        cfg: a ``DiTConfig`` (``latents`` and ``image_shape`` are read).
        train_copy: None: every read of a training latent picks one of the cached copies at random
            (the linear probe); an int: that copy (k-NN, feature export).
    """
    cache_dir = cfg.latents.cache_dir
    if train_copy is not None and not 0 <= train_copy < cfg.latents.copies:
        raise UserError(f"training copy {train_copy}: the cache has copies 0..{cfg.latents.copies - 1}")
    train = LatentCache(cache_dir, "train", cfg.latents.copies, train_copy)
    test = LatentCache(cache_dir, "test")
    expected = tuple(cfg.image_shape)
    if train.latent_shape != expected:
        raise UserError(f"{cache_dir} holds latents of shape {train.latent_shape}, but the network takes "
                        f"{expected}; encode with latents.image_size = 8 x network.input_size")
    return train, test
