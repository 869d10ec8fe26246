"""Shared pieces of every evaluation on frozen DDAE features: feature passes, the probe grid,
linear heads, and test accuracy that counts each test image exactly once over all processes.

    timesteps, blocks = probe_cells(cfg, grid=True)
    features = extract_grid_features(diffusion, x0, timesteps, blocks, precision="bf16")
    heads = ProbeHeads(feature_dims(diffusion, cfg.network.image_shape), timesteps, blocks, cfg.classes)
    logits = heads([features[cell] for cell in heads.cells])   # (n_cells, B, classes)

Used by linear.py, contrastive.py, knn.py, finetune.py, export_features.py and the noise-conditional
DDAE classifier.
"""
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from model.amp import autocast
from model.models import feature_dims
from model.noise import PerImageNoise
from model.speed import compile_function
from utils.atomic import atomic_path
from utils.distributed import all_reduce_sum, is_main
from utils.errors import UserError
from utils.logging import plot_heatmap
from utils.progress import iterate

# The original's --grid: DDPM timesteps out of n_T, EDM indices into the 18-step schedule. DiT (our
# choice, around its probe defaults t = 81 and 121): timesteps out of 0..999.
GRID_TIMESTEPS = {"DDPM": (1, 11, 21), "EDM": (3, 4, 5), "DiT": (41, 81, 121, 161, 201)}
EDM_FEATURE_STEPS = 18


def probe_cells(cfg, grid=False, timestep_flag=None):
    """The timesteps and blocks to probe: the grid (every block) or cfg.linear.timestep / blockname.

    ``timestep_flag`` names the flag that set linear.timestep (e.g. "--timestep") in error messages.

    Returns:
        (timesteps, blocks): a list of ints and a list of block names (``out_k``, DiT ``layer-k``);
        the probed cells are every (timestep, block) pair.

    Raises:
        UserError: a timestep that the diffusion model of ``cfg`` cannot noise to.
    """
    blocks = cfg.network.block_names if grid else [cfg.linear.blockname]
    timesteps = list(GRID_TIMESTEPS[cfg.model_type]) if grid else [cfg.linear.timestep]
    if cfg.model_type == "DDPM":
        top, what = cfg.diffusion.n_T, "diffusion.n_T"
        low = 0
    elif cfg.model_type == "DiT":
        top, what = cfg.diffusion.n_T - 1, "DiT's timesteps, below diffusion.n_T"
        low = 0
    else:
        top, what = EDM_FEATURE_STEPS, f"the EDM feature schedule of {EDM_FEATURE_STEPS} steps"
        low = 1
    for t in timesteps:
        if not low <= t <= top:
            source = "--grid" if grid else timestep_flag or "linear.timestep"
            raise UserError(f"{source}: timestep {t} is outside {low}..{top} ({what}); "
                            f"{'raise diffusion.n_T' if grid else f'set {source} in {low}..{top}'}")
    return timesteps, blocks


def cell_label(t, block):
    """The printed name of a probed cell, e.g. ``11/out_6``."""
    return f"{t}/{block}"


def use_channels_last(device):
    """Channels-last speeds up convolutions on GPUs; on CPUs it slows this network's GroupNorms down."""
    return device.type == "cuda"


def prepare_frozen(diffusion, device, compile=None):
    """Move a frozen diffusion model to ``device`` in eval mode, without gradients, in the memory
    layout that is fastest there (``use_channels_last``).

    Args:
        compile: None, or a ``model.speed`` compile mode (True means "default") for the network's
            ``forward_features`` (what ``get_feature`` calls); the first batches then take a while
            longer (minutes on a CPU).
    """
    diffusion = diffusion.to(device).eval().requires_grad_(False)
    if use_channels_last(device):
        diffusion = diffusion.to(memory_format=torch.channels_last)
    if compile:
        net = diffusion.nn_model
        net.forward_features = compile_function(net.forward_features, "default" if compile is True else compile)
    return diffusion


@torch.no_grad()
def extract_features(diffusion, x0, t, names, norm=False, precision="fp32", noise=None):
    """Average-pooled features of the requested blocks from one forward pass at timestep ``t``.

    The network stops after the deepest requested block.

    Args:
        diffusion: a DDPM or EDM model (EDM's ``t`` indexes its 18-step schedule).
        x0: (B, C, H, W) clean images in [0, 1].
        t: int, or (B,) integer tensor of per-image timesteps.
        names: block names (``out_k``); one string is allowed.
        norm: L2-normalise each feature vector.
        precision: "fp32", "bf16" or "fp16" autocast for the network.
        noise: (B, C, H, W) noise to use, or None for a fresh draw.

    Returns:
        ``{name: (B, C)}`` float32 tensors.
    """
    names = [names] if isinstance(names, str) else list(names)
    with autocast(x0.device, precision):
        features = diffusion.get_feature(x0, t, name=names, norm=norm, noise=noise)
    return {name: feature.float() for name, feature in features.items()}


@torch.no_grad()
def extract_grid_features(diffusion, x0, timesteps, names, norm=False, precision="fp32", noise=None):
    """Features of every (timestep, block) cell, all timesteps in one batched forward pass.

    The images are repeated once per timestep and each copy is noised to its own timestep, so a
    batch of B images becomes one network call of ``len(timesteps) * B`` (larger batches use a GPU
    better than several small ones); the network stops after the deepest requested block.

    Args:
        diffusion, x0, names, norm, precision: as for ``extract_features``.
        timesteps: ints.
        noise: (B, C, H, W) noise used at every timestep, or None for fresh draws everywhere.

    Returns:
        ``{(t, name): (B, C)}`` float32 tensors.
    """
    timesteps = list(timesteps)
    names = [names] if isinstance(names, str) else list(names)
    batch = x0.shape[0]
    if len(timesteps) == 1:
        features = extract_features(diffusion, x0, timesteps[0], names, norm, precision, noise)
        return {(timesteps[0], name): feature for name, feature in features.items()}
    memory_format = torch.channels_last if _is_channels_last(x0) else torch.contiguous_format
    repeated = x0.repeat(len(timesteps), 1, 1, 1).contiguous(memory_format=memory_format)  # (T*B, C, H, W)
    # Filled on the device: building it from a Python list would be a host-to-device copy, which
    # waits for the GPU to finish its queued work.
    per_image_t = torch.cat([torch.full((batch,), t, device=x0.device) for t in timesteps])  # (T*B,)
    if noise is not None:
        noise = noise.repeat(len(timesteps), 1, 1, 1)
    features = extract_features(diffusion, repeated, per_image_t, names, norm, precision, noise)
    return {(t, name): features[name][i * batch:(i + 1) * batch]
            for i, t in enumerate(timesteps) for name in names}


def _is_channels_last(x):
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class ProbeHeads(nn.Module):
    """One linear classifier per probed (timestep, block) cell, trained together.

    Args:
        dims: ``{block: channels}`` (see ``model.models.feature_dims``).
        timesteps, blocks: the probed cells are every (timestep, block) pair, in that order.
        num_classes: outputs of each head.

    ``cells`` lists the (t, block) pairs in the order of the heads; ``forward`` takes one (B, C)
    feature per cell in that order and returns (n_cells, B, num_classes) logits.
    """

    def __init__(self, dims, timesteps, blocks, num_classes):
        super().__init__()
        self.timesteps = [int(t) for t in timesteps]
        self.blocks = list(blocks)
        self.cells = [(t, block) for t in self.timesteps for block in self.blocks]
        self.num_classes = num_classes
        self.heads = nn.ModuleList(nn.Linear(dims[block], num_classes) for _, block in self.cells)

    @property
    def labels(self):
        return [cell_label(t, block) for t, block in self.cells]

    def forward(self, features):
        return torch.stack([head(feature) for head, feature in zip(self.heads, features)])

    def losses(self, logits, labels):
        """Cross-entropy of every head: (n_cells, B, classes) logits and (B,) labels -> (n_cells,)."""
        n_cells, batch = logits.shape[:2]
        per_image = F.cross_entropy(logits.flatten(0, 1), labels.repeat(n_cells), reduction="none")
        return per_image.view(n_cells, batch).mean(dim=1)


def count_correct(logits, labels):
    """Correct predictions of every head, (n_cells,) int64, left on the device (no sync)."""
    return (logits.argmax(dim=2) == labels).sum(dim=1)


class AccuracyCounter:
    """Correct / total counts kept on the device; ``reduce`` sums them over processes once.

    With a sampler that gives each process a disjoint shard (``utils.data.EvalShardSampler``), the
    reduced total is exactly the test-set size and every image counts once.
    """

    def __init__(self, n_cells, device):
        self.correct = torch.zeros(n_cells, dtype=torch.int64, device=device)
        self.total = 0

    def update(self, logits, labels):
        self.correct += count_correct(logits, labels)
        self.total += labels.shape[0]

    def reduce(self):
        """Sum over processes; returns (per-cell accuracy in percent as a list, total images)."""
        counts = torch.cat([self.correct, torch.tensor([self.total], device=self.correct.device)])
        counts = all_reduce_sum(counts).cpu()
        total = int(counts[-1])
        accuracy = (counts[:-1].double() * 100 / max(total, 1)).tolist()
        return accuracy, total


@torch.no_grad()
def evaluate_heads(diffusion, heads, loader, device, precision="fp32"):
    """Test accuracy of every head, over all processes, each test image counted once.

    Args:
        diffusion: the frozen model the features come from (fresh noise per batch).
        heads: a ``ProbeHeads`` (not the DDP wrapper).
        loader: this process's shard of the test set (``utils.data.build_loader(train=False)``).

    Returns:
        (accuracy list in percent, one per cell; number of test images counted over all processes).
    """
    was_training = heads.training
    heads.eval()
    counter = AccuracyCounter(len(heads.cells), device)
    for images, labels in loader:
        images, labels = to_device(images, labels, device)
        features = extract_grid_features(diffusion, images, heads.timesteps, heads.blocks, precision=precision)
        counter.update(heads([features[cell] for cell in heads.cells]), labels)
    heads.train(was_training)
    return counter.reduce()


@torch.no_grad()
def extract_dataset_features(diffusion, loader, timesteps, names, device, norm=False, precision="fp32",
                             seed=None, desc=None):
    """Features of every image a loader visits, for every (timestep, block) cell, in the loader's order.

    Args:
        diffusion: a frozen model (see ``prepare_frozen``).
        loader: a loader that does not shuffle, e.g. this process's shard from
            ``utils.data.build_loader(train=False)``.
        timesteps, names, norm, precision: as for ``extract_grid_features``.
        device: where the images go and the features stay.
        seed: None for fresh noise from the global generator; else the image of dataset index i is
            noised with its own generator seeded ``seed + i`` (the same draw at every timestep), so
            the features depend neither on the batch size nor on the number of processes.
        desc: show the pass's progress under this name (``utils.progress``) on the main process.

    Returns:
        (``{(t, name): (N, C)}`` float32 features, (N,) int64 labels), on ``device``; N is the
        number of images the loader visits, possibly 0.
    """
    indices = list(loader.sampler) if seed is not None else None
    chunks, labels = {}, []
    done = 0
    for images, batch_labels in iterate(loader, desc=desc, unit="batch", disable=desc is None or not is_main()):
        images, batch_labels = to_device(images, batch_labels, device)
        noise = None
        if seed is not None:
            seeds = [seed + index for index in indices[done:done + len(batch_labels)]]
            noise = PerImageNoise(seeds, device)(tuple(images.shape[1:]))  # (B, C, H, W)
        features = extract_grid_features(diffusion, images, timesteps, names, norm, precision, noise)
        for cell, feature in features.items():
            chunks.setdefault(cell, []).append(feature)
        labels.append(batch_labels)
        done += len(batch_labels)
    if not labels:  # a process whose shard is empty still returns every cell, with 0 rows
        dims = feature_dims(diffusion, tuple(loader.dataset[0][0].shape))
        empty = {(t, name): torch.zeros(0, dims[name], device=device) for t in timesteps for name in names}
        return empty, torch.zeros(0, dtype=torch.long, device=device)
    return {cell: torch.cat(parts) for cell, parts in chunks.items()}, torch.cat(labels)


def probe_tag(checkpoint, timesteps, blocks, grid):
    """Name of a probe's outputs: the checkpoint's file stem and the cells, e.g. ``model_1999_grid``."""
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    return f"{stem}_grid" if grid else f"{stem}_t{timesteps[0]}_{blocks[0]}"


def best_line(best, test_images, details=""):
    """The one format of the final ``best:`` line of linear.py and knn.py, e.g.
    ``best: 11/out_6 88.23% (10000 test images)``."""
    return f"best: {cell_label(best['timestep'], best['block'])} {best['accuracy']:.2f}% ({test_images} test images" \
           f"{'; ' + details if details else ''})"


def linear_tag(cfg, checkpoint, timesteps, blocks, grid):
    """Default name of linear.py's files: checkpoint, cells and the settings a sweep varies, so that
    probes of one checkpoint with other settings never meet, e.g. ``model_1999_grid_ep15_lr0.001_bs128``."""
    settings = f"ep{cfg.linear.n_epoch}_lr{cfg.linear.lrate:g}_bs{cfg.linear.batch_size}"
    return f"{probe_tag(checkpoint, timesteps, blocks, grid)}_{settings}"


def accuracy_table(cells, accuracy):
    """Per-cell accuracies as a table and the best cell.

    Args:
        cells: (t, block) pairs.
        accuracy: one value per cell, in the order of ``cells``.

    Returns:
        (``{str(t): {block: accuracy}}``, ``{"timestep", "block", "accuracy"}`` of the best cell).
    """
    table = {}
    for (t, block), value in zip(cells, accuracy):
        table.setdefault(str(t), {})[block] = value
    best = max(range(len(cells)), key=lambda i: accuracy[i])
    return table, {"timestep": cells[best][0], "block": cells[best][1], "accuracy": accuracy[best]}


def format_accuracy_table(table, timesteps, blocks):
    """An ``accuracy_table`` as text: one row per timestep, one column per block."""
    width = max(6, *(len(block) for block in blocks))
    lines = ["t \\ block " + " ".join(f"{block:>{width}}" for block in blocks)]
    for t in timesteps:
        lines.append(f"{t:<10}" + " ".join(f"{table[str(t)][block]:>{width}.2f}" for block in blocks))
    return "\n".join(lines)


def plot_accuracy_heatmap(table, timesteps, blocks, path, title):
    """An ``accuracy_table`` as a timestep x block heatmap PNG, the best cell outlined."""
    matrix = [[table[str(t)][block] for block in blocks] for t in timesteps]
    plot_heatmap(matrix, [f"t={t}" for t in timesteps], blocks, path, title=title, xlabel="block", ylabel="timestep")


def to_device(images, labels, device):
    """Move a batch to ``device`` without waiting (from pinned host memory), images in the layout
    of ``prepare_frozen``."""
    images = images.to(device, non_blocking=True)
    if use_channels_last(device):
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def synchronize(device):
    """Wait for the queued work on ``device`` (for timing); nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def feature_pass_throughput(diffusion, timesteps, names, image_shape, batch_size=128, precision="bf16",
                            n_batches=20, warmup=3):
    """Images per second of the probe's feature pass (all ``timesteps``, blocks up to the deepest
    of ``names``) on random images, on the device the model is on.

    Args:
        diffusion: a frozen model, e.g. from ``prepare_frozen``.
        timesteps, names: the cells, as for ``extract_grid_features``.
        image_shape: (C, H, W) of one image.
        batch_size: images per batch (each goes through the network once per timestep).
        precision: autocast precision.
        n_batches, warmup: timed and untimed batches.

    Returns:
        images per second (each image counted once, whatever the number of timesteps).
    """
    device = next(diffusion.parameters()).device
    images, _ = to_device(torch.rand(batch_size, *image_shape), torch.zeros(0), device)
    for _ in range(warmup):
        extract_grid_features(diffusion, images, timesteps, names, precision=precision)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(n_batches):
        extract_grid_features(diffusion, images, timesteps, names, precision=precision)
    synchronize(device)
    return batch_size * n_batches / (time.perf_counter() - start)


def save_json(obj, path):
    """Write ``obj`` as indented JSON through a temporary file, so readers never see half a file."""
    with atomic_path(path, fix="choose a writable save_dir") as temporary:
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(obj, file, indent=1)
            file.write("\n")
