"""Feature passes: average-pooled block features of a frozen model at one timestep, at several in
one batched call, or over a whole loader.

    features = extract_grid_features(diffusion, x0, timesteps, blocks, precision="bf16")  # {(t, block): (B, C)}
    tokens = extract_grid_features(diffusion, x0, timesteps, blocks, tokens=True)         # {(t, block): (B, T, C)}
"""
import torch

from evaluation.frozen import to_device
from model.amp import autocast
from model.blocks import memory_format
from model.models import feature_dims
from model.noise import PerImageNoise
from utils.distributed import is_main
from utils.errors import UserError
from utils.progress import iterate


def label_tag(feature_label):
    """The part of an output name that says the features were read with the true label: "_truelabel", or ""."""
    return "_truelabel" if feature_label == "true" else ""


def read_features_with(diffusion, feature_label):
    """Make a conditional ``diffusion`` read its features with the null label (``feature_label`` "null", its
    default) or each image's true label ("true"): ``extract_features`` then passes the labels it is given."""
    conditional = getattr(diffusion, "conditional", False)
    if feature_label == "true" and not conditional:
        raise UserError("--feature_label true: the model is not conditional (no network.n_classes), so there is "
                        "no label to read the features with; drop the flag")
    if conditional:
        diffusion.feature_label = feature_label == "true"
    return diffusion


@torch.no_grad()
def extract_features(diffusion, x0, t, names, norm=False, precision="fp32", noise=None, tokens=False, labels=None):
    """Average-pooled features of the requested blocks from one forward pass at timestep ``t`` (the network
    stops after the deepest requested block).

    Args:
        diffusion: a DDPM or EDM model (EDM's ``t`` indexes its 18-step schedule).
        x0: (B, C, H, W) clean images in [0, 1].
        t: int, or (B,) integer tensor of per-image timesteps.
        names: block names (``out_k``); one string is allowed.
        norm: L2-normalise each feature vector.
        precision: "fp32", "bf16" or "fp16" autocast for the network.
        noise: (B, C, H, W) noise to use, or None for a fresh draw.
        tokens: each block's (B, T, C) tokens instead of their average (``model.ddpm.as_tokens``).
        labels: (B,) labels of the images; a conditional model reads its features with them only when made to
            (``read_features_with``), else with the null label.

    Returns:
        ``{name: (B, C)}`` (``tokens``: ``{name: (B, T, C)}``) float32 tensors.
    """
    names = [names] if isinstance(names, str) else list(names)
    extra = {"tokens": True} if tokens else {}  # a diffusion kind without token features still serves pooled heads
    if labels is not None and getattr(diffusion, "feature_label", False):
        extra["labels"] = labels
    with autocast(x0.device, precision):
        features = diffusion.get_feature(x0, t, name=names, norm=norm, noise=noise, **extra)
    return {name: feature.float() for name, feature in features.items()}


@torch.no_grad()
def extract_grid_features(diffusion, x0, timesteps, names, norm=False, precision="fp32", noise=None, tokens=False,
                          labels=None):
    """Features of every (timestep, block) cell, all timesteps in one batched forward pass.

    The images are repeated once per timestep and each copy is noised to its own timestep, so a
    batch of B images becomes one network call of ``len(timesteps) * B`` (larger batches use a GPU
    better than several small ones); the network stops after the deepest requested block.

    Args:
        diffusion, x0, names, norm, precision, tokens, labels: as for ``extract_features``.
        timesteps: ints.
        noise: (B, C, H, W) noise used at every timestep, or None for fresh draws everywhere.

    Returns:
        ``{(t, name): (B, C)}`` (``tokens``: (B, T, C)) float32 tensors.
    """
    timesteps = list(timesteps)
    names = [names] if isinstance(names, str) else list(names)
    batch = x0.shape[0]
    if len(timesteps) == 1:
        features = extract_features(diffusion, x0, timesteps[0], names, norm, precision, noise, tokens, labels)
        return {(timesteps[0], name): feature for name, feature in features.items()}
    repeated = x0.repeat(len(timesteps), 1, 1, 1).contiguous(memory_format=memory_format(x0))  # (T*B, C, H, W)
    # Filled on the device: building it from a Python list would be a host-to-device copy, which
    # waits for the GPU to finish its queued work.
    per_image_t = torch.cat([torch.full((batch,), t, device=x0.device) for t in timesteps])  # (T*B,)
    if noise is not None:
        noise = noise.repeat(len(timesteps), 1, 1, 1)
    if labels is not None:
        labels = labels.repeat(len(timesteps))
    features = extract_features(diffusion, repeated, per_image_t, names, norm, precision, noise, tokens, labels)
    return {(t, name): features[name][i * batch:(i + 1) * batch]
            for i, t in enumerate(timesteps) for name in names}


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
        features = extract_grid_features(diffusion, images, timesteps, names, norm, precision, noise,
                                         labels=batch_labels)
        for cell, feature in features.items():
            chunks.setdefault(cell, []).append(feature)
        labels.append(batch_labels)
        done += len(batch_labels)
    if not labels:  # a process whose shard is empty still returns every cell, with 0 rows
        dims = feature_dims(diffusion, tuple(loader.dataset[0][0].shape))
        empty = {(t, name): torch.zeros(0, dims[name], device=device) for t in timesteps for name in names}
        return empty, torch.zeros(0, dtype=torch.long, device=device)
    return {cell: torch.cat(parts) for cell, parts in chunks.items()}, torch.cat(labels)
