"""Helpers that several test modules share: tiny configs, checkpoints, datasets and readers.

Test modules import these from here, never from one another (the fixtures live in conftest.py).
"""
import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import torch
import yaml
from torch import nn

import train
from model.ema import make_ema
from model.models import build_diffusion, load_config
from tests.launch import REPO
from utils.checkpoint import checkpoint_path, save_checkpoint
from utils.data import SyntheticImages, probe_train_transform

CPU = torch.device("cpu")
# Where the device-generic tests run: DDAE_TEST_DEVICE (cpu by default; cuda on a GPU machine, see conftest.py).
DEVICE = torch.device(os.environ.get("DDAE_TEST_DEVICE", "cpu"))

# train.py on tiny synthetic runs (test_train, test_preemption, test_progress, test_tensorboard).
IMAGES = 128      # synthetic training images: 8 steps of 16 per epoch
N_SAMPLE = 10     # one grid row of samples above one row of real images
TINY = {
    "model_type": "DDPM",
    "diffusion": {"n_T": 20, "betas": [1.0e-4, 0.02]},  # 20 DDIM steps per sample grid
    "network": {"image_shape": [3, 16, 16], "n_channels": 32, "ch_mults": [1, 2], "is_attn": [False, True],
                "dropout": 0.1, "n_blocks": 1},
    "dataset": "synthetic", "batch_size": 16, "n_epoch": 2, "lrate": 1.0e-3, "warm_epoch": 2, "ema": 0.99,
    "num_workers": 0, "n_sample": N_SAMPLE, "save_dir": "unset",
    "linear": {"timestep": 11, "blockname": "out_2"},
}


def small_synthetic(name, root, train, transform=None, image_size=None):
    """build_dataset, shrunk to IMAGES images so that an epoch takes a second."""
    return SyntheticImages(n=IMAGES, image_size=image_size, train=train, transform=transform)


def write_config(folder, **changes):
    config = {**TINY, **changes}
    path = Path(folder) / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def parse(config, save_dir, *flags, **overrides):
    sets = [f"save_dir={save_dir}"] + [f"{key}={value}" for key, value in overrides.items()]
    argv = ["--config", str(config), "--device", DEVICE.type, *flags]
    for override in sets:
        argv += ["--set", override]
    args = train.parse_args(argv)
    return load_config(args.config, args.set), args


def run(config, save_dir, *flags, **overrides):
    return train.train(*parse(config, save_dir, *flags, **overrides))


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].cpu(), b[key].cpu()), key


# The probes on 8x8 images (test_linear, test_contrastive, test_preemption).
TINY_CONFIG = """\
model_type: {model_type}
network:
  image_shape: [3, 8, 8]
  n_channels: 32
  ch_mults: [1, 1]
  is_attn: [False, True]
  dropout: 0.1
  n_blocks: 1
dataset: synthetic
batch_size: 32
n_epoch: 4
lrate: 1.0e-4
warm_epoch: 1
ema: 0.999
num_workers: 0
linear:
  n_epoch: 2
  batch_size: 32
  lrate: 1.0e-3
  timestep: {timestep}
  blockname: out_2
"""


def make_config(folder, model_type="DDPM", timestep=None, overrides=()):
    """A tiny config (8x8 images, 4 probe blocks) whose save_dir is ``folder/run``."""
    timestep = timestep if timestep is not None else (11 if model_type == "DDPM" else 4)
    path = Path(folder) / f"tiny_{model_type}.yaml"
    path.write_text(TINY_CONFIG.format(model_type=model_type, timestep=timestep))
    return load_config(path, [f"save_dir={Path(folder) / 'run'}", *overrides]), path


def make_checkpoint(cfg, epoch, seed=0):
    """save_dir/ckpts/model_{epoch}.pth in the training layout, with freshly initialised weights."""
    torch.manual_seed(seed)
    diffusion = build_diffusion(cfg)
    ema = make_ema(diffusion, cfg.ema)
    path = checkpoint_path(cfg.save_dir, epoch)
    save_checkpoint({"MODEL": diffusion.state_dict(), "EMA": ema.state_dict(), "epoch": epoch}, path)
    return path


def small_sets(n_train=128, n_test=64):
    return (SyntheticImages(n_train, image_size=8, seed=1, transform=probe_train_transform(8)),
            SyntheticImages(n_test, image_size=8, seed=1, train=False))


# config/demo.yaml at 16x16 (test_knn, test_export_features, test_finetune).
TINY_OVERRIDES = ["network.image_shape=[3,16,16]", "linear.blockname=out_2", "linear.batch_size=8",
                  "num_workers=0"]


def tiny_config(save_dir, extra=()):
    """config/demo.yaml shrunk to 16x16 images (4 blocks: out_1, out_2 at 8x8; out_3, out_4 at 16x16)."""
    return load_config(REPO / "config" / "demo.yaml", TINY_OVERRIDES + [f"save_dir={save_dir}", *extra])


def tiny_diffusion(cfg, seed=0):
    torch.manual_seed(seed)
    return build_diffusion(cfg).eval().requires_grad_(False)


def read_events(folder):
    """The EventAccumulator of the event files in ``folder``, loaded."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def read_scalars(folder):
    """``{tag: [(step, value), ...]}`` of every scalar written into ``folder``."""
    events = read_events(folder)
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


# The golden tiny DiT (test_dit, test_latents).
DIT_GOLDEN = REPO / "tests" / "golden" / "dit_tiny.pt"
# The golden DiT, as a DiT config; latents of 8x8 come from 64x64 images.
TINY_DIT_CONFIG = """\
model_type: DiT
network: {{input_size: 8, patch_size: 2, in_channels: 4, hidden_size: 64, depth: 3, num_heads: 4}}
ckpt: {ckpt}
latents:
  vae: {vae}
  cache_dir: {cache_dir}
  copies: 2
  source_size: 16
  image_size: 64
  dtype: {dtype}
  batch_size: 16
dataset: synthetic
classes: 10
num_workers: 0
save_dir: {save_dir}
linear: {{n_epoch: 2, batch_size: 32, timestep: 121, blockname: layer-1}}
"""


def golden_dit():
    return torch.load(DIT_GOLDEN, weights_only=True)


def write_tiny_config(folder, ckpt=None, vae=None, cache_dir=None, dtype="float16", name="tiny_dit.yaml"):
    """A DiT config of the golden network's shape whose files all live under ``folder``."""
    folder = Path(folder)
    path = folder / name
    path.write_text(TINY_DIT_CONFIG.format(ckpt=ckpt or folder / "dit.pt", vae=vae or folder / "vae",
                                           cache_dir=cache_dir or folder / "cache", dtype=dtype,
                                           save_dir=folder / "run"))
    return path


def save_golden_weights(path):
    """The golden state dict as a plain file, the layout of facebookresearch/DiT's releases."""
    torch.save(golden_dit()["state_dict"], path)
    return path


FID_DIMS = 16


class RandomFeatures(nn.Module):
    """A fixed random conv net standing in for Inception: (B, 3, H, W) in [0, 1] -> (B, FID_DIMS)."""

    fid_tag = "random test network"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, FID_DIMS, 3, stride=2), nn.Tanh(), nn.AdaptiveAvgPool2d(1))
        self.images_seen = 0

    def forward(self, images):
        self.images_seen += images.shape[0]
        return self.net(images).flatten(1)  # (B, FID_DIMS)


# The golden ADM networks (test_adm; recorded by bench/adm_golden.py with OpenAI's code).
ADM_GOLDEN = {layout: REPO / "tests" / "golden" / f"adm_{layout}.pt" for layout in ("improved", "guided", "new_order")}
# The golden conditional networks and diffusions (test_guide; recorded by bench/guide_golden.py with the sister
# codebase's code).
GUIDE_GOLDEN = {layout: REPO / "tests" / "golden" / f"guide_{layout}.pt" for layout in ("ddpm", "edm")}
# The golden U-ViT networks (test_uvit; recorded by bench/uvit_golden.py with FutureXiang/Diffusion's code).
UVIT_GOLDEN = REPO / "tests" / "golden" / "uvit_tiny.pt"
# FutureXiang/Diffusion's config/*.yaml at 4eefaf6, byte for byte: its files must load here unchanged.
SISTER_CONFIGS = REPO / "tests" / "golden" / "sister_configs"


def sister_config(folder, name):
    """A copy of the sister codebase's config file ``name`` in ``folder`` (its save_dir is relative); its path."""
    path = Path(folder) / name
    shutil.copyfile(SISTER_CONFIGS / name, path)
    return path


def seeded_weights(shapes, seed):
    """Random values for a state dict's ``{name: shape}``: N(0, 0.1^2) drawn in sorted-name order from one
    generator seeded with ``seed``, so the golden ADM weights are rebuilt from their seed (no file)."""
    generator = torch.Generator().manual_seed(seed)
    return {name: 0.1 * torch.randn(tuple(shapes[name]), generator=generator) for name in sorted(shapes)}


def interrupt_on_call(monkeypatch, module, name, call=2):
    """Make ``module.name`` raise KeyboardInterrupt at its ``call``-th call, as if the run were killed there
    (``train_one_epoch`` at call 2: during the second epoch, after the first one's state was saved).
    Returns the original function, to put back for the resumed run."""
    original, calls = getattr(module, name), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupted)
    return original


@contextlib.contextmanager
def tmpfs(folder, size):
    """``folder`` (created) as a tmpfs of ``size`` bytes, a small real disk that fills up (root only, as in CI;
    the test is skipped where mounting is not permitted)."""
    import pytest

    os.makedirs(folder, exist_ok=True)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                 capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield Path(folder)
    finally:
        subprocess.run(["umount", str(folder)], check=True)
