"""Datasets, transforms and loaders shared by every script.

Every dataset (a ``DATASETS`` entry) yields ``(image, label)``: a (C, H, W) float image in [0, 1] once the
transform has run, and an int label. Each dataset carries ``num_classes``.
"""
import math
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from torchvision.datasets import utils as download_utils
from torchvision.transforms import v2

from utils.config import import_entry
from utils.distributed import get_rank, usable_cpus
from utils.errors import UserError, describe_error

# Without train/ and val/ (or test/) subfolders, a `folder` dataset keeps every 10th image of each
# class for the test split, so that test accuracy is never measured on training images.
FOLDER_TEST_EVERY = 10


def add_data_args(parser, num_workers=True):
    """Add ``--data_root`` (default ./data), the folder that holds or receives the datasets, and
    ``--num_workers`` (default: the config's ``num_workers``; see ``resolve_num_workers``)."""
    parser.add_argument("--data_root", default="./data",
                        help="folder with the datasets (CIFAR is downloaded there when missing)")
    if num_workers:
        parser.add_argument("--num_workers", type=int, default=None,
                            help="data-loader processes per loader (default: the config's num_workers; when "
                                 "that is -1, as by default, chosen from the CPUs this process may use)")
    return parser


MAX_AUTO_WORKERS = 4  # the original's fixed number, now the most chosen automatically


def default_num_workers():
    """Loader workers for a process: its share of the CPUs it may use (os.sched_getaffinity, split
    among the LOCAL_WORLD_SIZE processes torchrun starts on the machine), minus one for the process
    itself, at most MAX_AUTO_WORKERS. Two cores give one worker: no "may freeze" warning from torch."""
    cpus = usable_cpus()
    try:
        local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_processes = 1
    return max(0, min(MAX_AUTO_WORKERS, cpus // local_processes - 1))


def resolve_num_workers(args, cfg):
    """``--num_workers`` when given, else the config's ``num_workers``, else (-1) ``default_num_workers()``."""
    if args.num_workers is not None:
        if args.num_workers < 0:
            raise UserError(f"--num_workers {args.num_workers}: must be 0 or positive")
        return args.num_workers
    return default_num_workers() if cfg.num_workers == -1 else cfg.num_workers


def _to_float_image():
    # ToImage accepts PIL images and tensors alike; ToDtype scales uint8 to [0, 1] and leaves
    # float tensors as they are; ToPureTensor drops the tv_tensors wrapper.
    return [v2.ToDtype(torch.float32, scale=True), v2.ToPureTensor()]


def train_transform(flip=True):
    """Diffusion training: [0, 1] float tensor, with a random horizontal flip when ``flip``."""
    steps = [v2.ToImage()]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + _to_float_image())


def probe_train_transform(image_size=32):
    """Probe / classifier training: RandomCrop(image_size, padding=image_size // 8) and a horizontal flip.

    The padding is the original's 4 pixels at CIFAR's 32x32 and keeps that proportion at other sizes.
    """
    return v2.Compose([v2.ToImage(), v2.RandomCrop(image_size, padding=max(1, image_size // 8)),
                       v2.RandomHorizontalFlip()] + _to_float_image())


def test_transform():
    """Evaluation: only the conversion to a [0, 1] float tensor."""
    return v2.Compose([v2.ToImage()] + _to_float_image())


def build_dataset(name, root, train, transform=None, image_size=None):
    """Build the train or test split of a dataset of ``DATASETS``, or of one named by import path.

    Args:
        name: a key of ``DATASETS``, or ``package.module.NAME`` naming a ``DatasetSpec`` or a function
            ``load(root, train, transform, image_size)`` (see ``dataset_spec``).
        root: folder with the data (``--data_root``); for ``folder`` the image tree itself.
        train: the training split when True, the test split otherwise.
        transform: applied to each image; defaults to ``test_transform()``.
        image_size: side of the images (default: the entry's ``image_size``): the generated size for
            ``synthetic``, a resize plus centre crop for the entries that ``resize``; for the others
            it must equal their size.

    Returns:
        A Dataset of ``(image, label)`` with ``num_classes``, and ``uint8_layout`` when its ``.data``
        holds the images as they are trained on (see ``uint8_images``).
    """
    transform = test_transform() if transform is None else transform
    spec = dataset_spec(name)
    native, image_size = spec.image_size, image_size or spec.image_size
    if native is not None and image_size != native and not spec.resize:
        raise UserError(f"dataset '{name}' has {native}x{native} images but {image_size}x{image_size} "
                        f"were asked for; set the image size (network.image_shape) to {native}")
    resized = spec.resize and image_size is not None
    if resized:
        transform = v2.Compose([v2.Resize(image_size), v2.CenterCrop(image_size), transform])
    dataset = spec.load(root, train, transform, image_size)
    if not hasattr(dataset, "num_classes"):
        dataset.num_classes = spec.num_classes
    dataset.uint8_layout = None if resized else spec.layout
    dataset.dataset_name = name
    return dataset


def dataset_spec(name):
    """The ``DatasetSpec`` of ``name``: an entry of ``DATASETS``, or imported from ``package.module.NAME``,
    which is a ``DatasetSpec`` or a function ``load(root, train, transform, image_size)`` (then its dataset
    gives ``num_classes`` or the config's ``classes`` is trusted, and images are decoded one by one)."""
    if name not in DATASETS and "." not in name:
        raise UserError(f"unknown dataset '{name}'; use one of {', '.join(DATASETS)}, or the import path of a "
                        f"DatasetSpec or a load function (package.module.NAME)")
    entry = import_entry(name, DATASETS, "dataset", "the config", "dataset")
    if isinstance(entry, DatasetSpec):
        return entry
    if callable(entry) and not isinstance(entry, type):
        return DatasetSpec(entry)
    raise UserError(f"dataset {name!r} is neither a utils.data.DatasetSpec nor a function "
                    f"load(root, train, transform, image_size); name one of those")


def uint8_images(dataset):
    """The whole dataset as one (N, C, H, W) uint8 tensor: its ``.data`` in the layout its ``DATASETS``
    entry names (``uint8_layout``, e.g. "NHWC"), else every image decoded once (its [0, 1] floats come
    from 8-bit pixels)."""
    layout = getattr(dataset, "uint8_layout", None)
    if layout is not None:
        images = torch.as_tensor(dataset.data).permute(*[layout.index(axis) for axis in "NCHW"]).contiguous()
        decoded = tuple(dataset[0][0].shape) if len(dataset) else tuple(images.shape[1:])
        if tuple(images.shape[1:]) != decoded:
            name = getattr(dataset, "dataset_name", "?")
            raise UserError(f"dataset '{name}': its entry's layout {layout!r} reads .data of shape "
                            f"{tuple(dataset.data.shape)} as (C, H, W) images of {tuple(images.shape[1:])}, but "
                            f"its items are {decoded}; fix the entry's layout (the axes of .data, e.g. 'NHWC')")
        return images
    return torch.stack([(dataset[i][0] * 255).round().to(torch.uint8) for i in range(len(dataset))])


def dataset_labels(dataset):
    """The whole dataset's labels as one (N,) int64 tensor: its ``.targets`` when it has them, else each item's."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [dataset[i][1] for i in range(len(dataset))]
    return torch.as_tensor(targets, dtype=torch.long)


def _load_cifar(dataset_class, label, root, train, transform):
    """Load CIFAR from ``root``, unpacking or downloading the archive first when needed."""
    try:
        return dataset_class(root, train=train, transform=transform, download=False)
    except RuntimeError:
        pass  # not unpacked yet, or damaged: unpack (and if needed download) the archive below
    archive = os.path.join(root, dataset_class.filename)
    if not os.path.isfile(archive):
        _download_archive(dataset_class, label, root)
    if not download_utils.check_integrity(archive, dataset_class.tgz_md5):
        raise UserError(f"{archive} is damaged (checksum mismatch): delete it and run again to "
                        f"download it, or replace it with a good copy")
    try:
        download_utils.extract_archive(archive, root)
        return dataset_class(root, train=train, transform=transform, download=False)
    except (OSError, tarfile.TarError, RuntimeError) as err:
        raise UserError(f"could not unpack {archive} into {root} ({describe_error(err)}); check free "
                        f"space and write permission there") from None


def _download_archive(dataset_class, label, root):
    """Download the archive into a staging folder and move it into ``root`` only once complete (never a partial one)."""
    missing = (f"{label} not found under {root} and could not be downloaded ({{reason}}): place "
               f"{dataset_class.filename} in {os.path.join(root, '')} or pass --data_root DIR")
    try:
        os.makedirs(root, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".download-", dir=root)
    except OSError as err:
        raise UserError(missing.format(reason=f"cannot write there: {describe_error(err)}")) from None
    try:
        download_utils.download_url(dataset_class.url, staging, dataset_class.filename,
                                    dataset_class.tgz_md5)
        os.replace(os.path.join(staging, dataset_class.filename),
                   os.path.join(root, dataset_class.filename))
    except Exception as err:  # no network, a proxy, a truncated transfer: the remedy is the same
        raise UserError(missing.format(reason=describe_error(err))) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _load_folder(root, train, transform):
    """A class-per-folder image tree: ``root/<class>/*.png``, or with train/ and val/ or test/."""
    if not os.path.isdir(root):
        raise UserError(f"image folder {root} not found; pass --data_root pointing at a folder with "
                        f"one subfolder of images per class")
    test_dirs = [os.path.join(root, sub) for sub in ("val", "test")
                 if os.path.isdir(os.path.join(root, sub))]
    split_dirs = os.path.isdir(os.path.join(root, "train")) and test_dirs
    folder = (os.path.join(root, "train") if train else test_dirs[0]) if split_dirs else root
    try:
        dataset = torchvision.datasets.ImageFolder(folder, transform=transform)
    except (FileNotFoundError, OSError) as err:
        raise UserError(f"image folder {folder}: {describe_error(err)}; it needs one subfolder of "
                        f"images per class") from None
    dataset.num_classes = len(dataset.classes)
    if not split_dirs:
        kept = []
        for label in range(dataset.num_classes):
            indices = [i for i, target in enumerate(dataset.targets) if target == label]
            kept += [i for rank, i in enumerate(indices)
                     if (rank % FOLDER_TEST_EVERY == FOLDER_TEST_EVERY - 1) != train]
        dataset.samples = [dataset.samples[i] for i in kept]
        dataset.imgs = dataset.samples
        dataset.targets = [target for _, target in dataset.samples]
    return dataset


class TinyImageNet(Dataset):
    """Tiny ImageNet (200 classes, 64x64) in the layout of the official tiny-imagenet-200.zip.

    ``root`` is the unpacked ``tiny-imagenet-200`` folder or a folder that contains it. Training
    images are ``train/<wnid>/images/*.JPEG``; the test split is the official validation set,
    ``val/images/*.JPEG`` labelled by ``val/val_annotations.txt``. Labels follow the sorted wnids.
    """

    def __init__(self, root, train=True, transform=None):
        if os.path.isdir(os.path.join(root, "tiny-imagenet-200")):
            root = os.path.join(root, "tiny-imagenet-200")
        self.root = root
        self.transform = transform if transform is not None else test_transform()
        train_dir = os.path.join(root, "train")
        annotations = os.path.join(root, "val", "val_annotations.txt")
        needed = train_dir if train else annotations
        if not os.path.exists(needed):
            raise UserError(f"Tiny ImageNet not found: {needed} is missing; unzip "
                            f"tiny-imagenet-200.zip into {root} or pass --data_root DIR")
        self.classes = sorted(entry for entry in os.listdir(train_dir)
                              if os.path.isdir(os.path.join(train_dir, entry)))
        self.num_classes = len(self.classes)
        class_index = {wnid: i for i, wnid in enumerate(self.classes)}
        if train:
            self.samples = [
                (os.path.join(train_dir, wnid, "images", file), class_index[wnid])
                for wnid in self.classes
                for file in sorted(os.listdir(os.path.join(train_dir, wnid, "images")))
                if file.lower().endswith((".jpeg", ".jpg", ".png"))
            ]
        else:
            self.samples = []
            with open(annotations) as lines:
                for line_number, line in enumerate(lines, 1):
                    fields = line.split("\t")
                    if len(fields) < 2 or fields[1] not in class_index:
                        raise UserError(f"{annotations} line {line_number}: expected "
                                        f"'<file>\\t<wnid>\\t...' with a wnid from train/")
                    self.samples.append((os.path.join(root, "val", "images", fields[0]),
                                         class_index[fields[1]]))
        self.targets = [label for _, label in self.samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        # Some Tiny ImageNet images are greyscale: convert so every image has 3 channels.
        image = torchvision.datasets.folder.default_loader(path)
        return self.transform(image), label


def _hsv_to_rgb(hue, saturation, value):
    """Vectorised HSV -> RGB for tensors of shape (N,) with entries in [0, 1]; returns (N, 3)."""
    channel_offsets = torch.tensor([5.0, 3.0, 1.0])
    k = (channel_offsets + hue[:, None] * 6) % 6  # (N, 3)
    ramp = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return value[:, None] - value[:, None] * saturation[:, None] * ramp


def _box(u, v, centre_u, centre_v, half_u, half_v):
    return torch.maximum((u - centre_u).abs() - half_u, (v - centre_v).abs() - half_v)


def _plus(u, v):
    return torch.minimum(_box(u, v, 0, 0, 0.85, 0.22), _box(u, v, 0, 0, 0.22, 0.85))


def _bars(across, along):
    centres = torch.tensor([-0.6, 0.0, 0.6]).view(3, 1, 1, 1)
    stripes = (across.unsqueeze(0) - centres).abs().amin(dim=0) - 0.16
    return torch.maximum(stripes, along.abs() - 0.85)


# Signed distance (negative inside) of each class's shape in a unit frame; u points right, v down.
SHAPES = {
    "disc": lambda u, v: torch.sqrt(u**2 + v**2) - 0.8,
    "square": lambda u, v: _box(u, v, 0, 0, 0.7, 0.7),
    "ring": lambda u, v: (torch.sqrt(u**2 + v**2) - 0.65).abs() - 0.18,
    "triangle": lambda u, v: torch.maximum(v - 0.55, 0.866 * u.abs() - 0.5 * v - 0.4),
    "plus": _plus,
    "x_cross": lambda u, v: _plus((u + v) / math.sqrt(2), (v - u) / math.sqrt(2)),
    "horizontal_bars": lambda u, v: _bars(v, u),
    "vertical_bars": lambda u, v: _bars(u, v),
    "two_dots": lambda u, v: torch.sqrt((u.abs() - 0.45) ** 2 + v**2) - 0.32,
    "l_shape": lambda u, v: torch.minimum(_box(u, v, -0.5, 0, 0.25, 0.75),
                                          _box(u, v, 0, 0.5, 0.75, 0.25)),
}


class SyntheticImages(Dataset):
    """Coloured shapes on noisy backgrounds, generated in memory and reproducible from ``seed``.

    The class is the shape (disc, square, ring, ...); hue, saturation and brightness of shape and
    background are drawn independently of the class, so mean colour says little about the label,
    and position, size and a small rotation are jittered per image. Labels are balanced.

    Args:
        n: number of images; 2,000 for the train split and 1,000 for the test split by default
            (enough for the CPU demo to learn features that beat a random network).
        image_size: side of the square RGB images.
        num_classes: number of shapes used, at most ``len(SHAPES)``.
        seed: the same seed gives the same images; the two splits never share images.
        train: which split to generate.
        transform: applied to each (3, H, W) uint8 image; defaults to ``test_transform()``.
    """

    def __init__(self, n=None, image_size=32, num_classes=10, seed=0, train=True, transform=None):
        if not 1 <= num_classes <= len(SHAPES):
            raise UserError(f"synthetic dataset: classes={num_classes}, but there are "
                            f"{len(SHAPES)} shapes; use a value from 1 to {len(SHAPES)}")
        self.n = n if n is not None else (2000 if train else 1000)
        self.image_size = image_size
        self.num_classes = num_classes
        self.classes = list(SHAPES)[:num_classes]
        self.transform = transform if transform is not None else test_transform()
        generator = torch.Generator().manual_seed(2 * seed + (0 if train else 1))
        self.images, self.targets = self._generate(generator)

    def _generate(self, generator):
        n, size = self.n, self.image_size

        def uniform(low, high, *shape):
            return low + (high - low) * torch.rand(*(shape or (n,)), generator=generator)

        # Images are drawn grouped by class (contiguous slices, balanced) and shuffled at the end.
        labels = torch.arange(n) % self.num_classes
        labels = labels.sort().values
        scale = uniform(0.45, 0.7).view(n, 1, 1)  # shape radius, as a fraction of half the side
        centre_x, centre_y = uniform(-0.25, 0.25).view(n, 1, 1), uniform(-0.25, 0.25).view(n, 1, 1)
        angle = uniform(-math.pi / 18, math.pi / 18).view(n, 1, 1)
        foreground = _hsv_to_rgb(uniform(0, 1), uniform(0.5, 1), uniform(0.7, 1))  # (N, 3)
        background = _hsv_to_rgb(uniform(0, 1), uniform(0, 0.6), uniform(0.05, 0.4))
        gradient = uniform(-0.25, 0.25, n, 2, 1, 1)

        axis = (torch.arange(size) + 0.5) / size * 2 - 1
        grid_y, grid_x = torch.meshgrid(axis, axis, indexing="ij")  # (H, W)
        distance = torch.empty(n, size, size)
        bounds = torch.searchsorted(labels, torch.arange(self.num_classes + 1)).tolist()
        for shape, start, end in zip(SHAPES.values(), bounds[:-1], bounds[1:]):
            members = slice(start, end)
            dx = grid_x - centre_x[members]  # (n_class, H, W)
            dy = grid_y - centre_y[members]
            cos, sin = angle[members].cos(), angle[members].sin()
            u = (cos * dx + sin * dy) / scale[members]
            v = (cos * dy - sin * dx) / scale[members]
            distance[members] = shape(u, v)
        # Antialiased coverage: the signed distance in pixels, clipped to a one-pixel ramp.
        coverage = (0.5 - distance * (scale * size / 2)).clamp_(0, 1).unsqueeze(1)  # (N, 1, H, W)

        shading = 1 + gradient[:, 0] * grid_x + gradient[:, 1] * grid_y  # (N, H, W)
        backdrop = background.view(n, 3, 1, 1) * shading.unsqueeze(1)  # (N, 3, H, W)
        images = torch.lerp(backdrop, foreground.view(n, 3, 1, 1).expand_as(backdrop), coverage)
        images.add_(torch.randn(n, 3, size, size, generator=generator), alpha=0.06)
        images = images.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
        order = torch.randperm(n, generator=generator)
        return images[order], labels[order].tolist()

    @property
    def data(self):
        """The (N, C, H, W) uint8 images."""
        return self.images

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return self.transform(self.images[index]), self.targets[index]


def _rank_and_world_size(rank, world_size):
    if rank is None or world_size is None:
        from utils.distributed import get_rank, get_world_size  # after init_distributed()
        rank = get_rank() if rank is None else rank
        world_size = get_world_size() if world_size is None else world_size
    return rank, world_size


def shard_indices(num_samples, rank, world_size):
    """The contiguous slice of ``range(num_samples)`` that ``rank`` evaluates; no index repeats."""
    return range(rank * num_samples // world_size, (rank + 1) * num_samples // world_size)


def split_batches(indices, batch_size, rank, world_size):
    """Cut ``indices`` into batches of ``batch_size`` and give each process a contiguous run of whole
    batches: the batches are the same whatever the number of processes."""
    batches = [indices[start:start + batch_size] for start in range(0, len(indices), batch_size)]
    return batches[rank * len(batches) // world_size:(rank + 1) * len(batches) // world_size]


class EvalShardSampler(Sampler):
    """Visit this rank's ``shard_indices`` in order, without the padding DistributedSampler adds.

    Summing correct counts and sample counts over ranks gives the exact accuracy on the whole
    test set. Ranks may get one sample more than others, or none at all when the test set is
    smaller than the world size, so do not run one collective per batch.
    """

    def __init__(self, dataset, rank=None, world_size=None):
        rank, world_size = _rank_and_world_size(rank, world_size)
        self.indices = shard_indices(len(dataset), rank, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose next pass can start ``skip(n)`` indices in, for a mid-epoch resume:
    the skipped images are neither loaded nor transformed. Its length stays the whole shard's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._skip = 0

    def skip(self, n):
        """Leave out the first ``n`` indices of the next pass only."""
        self._skip = n

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self._skip = self._skip, 0
        return iter(indices[skip:])


def epoch_seed(seed, epoch, rank):
    """Seed of one epoch's random draws on one process (well mixed by numpy's SeedSequence), so a
    resumed run draws exactly what the uninterrupted run would have drawn."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, np.uint64)[0])


def add_max_images_arg(parser):
    parser.add_argument("--max_images", type=int, default=0,
                        help="use only the first N images of each split (quick checks); 0: all")
    return parser


def limit_images(dataset, max_images):
    """The first ``max_images`` items of ``dataset`` (all when 0), keeping ``num_classes``."""
    if max_images < 0:
        raise UserError(f"--max_images {max_images}: must be 0 (all images) or a positive count")
    if max_images == 0 or max_images >= len(dataset):
        return dataset
    subset = Subset(dataset, range(max_images))
    subset.num_classes = dataset.num_classes
    return subset


def config_splits(cfg, root, train_transform, max_images=0):
    """(train, test) of the config's dataset at its image size, the test split with ``test_transform()``,
    each cut to its first ``max_images`` images (0: all)."""
    size = cfg.image_shape[-1]
    return tuple(limit_images(build_dataset(cfg.dataset, root, train=train, transform=transform, image_size=size),
                              max_images) for train, transform in ((True, train_transform), (False, test_transform())))


def _splitmix64(value):
    value = (value + 0x9E3779B97F4A7C15) % 2 ** 64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) % 2 ** 64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) % 2 ** 64
    return value ^ (value >> 31)


def image_seed(seed, index):
    """The generator seed of image ``index`` in a run with ``seed``.

    A scrambled offset of the run plus the index: distinct for every index of a run even in the low
    32 bits, which are all that a CPU generator uses, while two runs' ranges practically never meet.
    """
    return (_splitmix64(seed) + index) % 2 ** 64


def build_loader(dataset, batch_size, train, num_workers=0, seed=0, rank=None, world_size=None,
                 device=None, drop_last=True, batch_flag="--set batch_size=N"):
    """A DataLoader over this rank's part of ``dataset``: shuffled for training (call ``set_loader_epoch``
    before each epoch, so the order depends only on (seed, epoch)), else each index once over all ranks.

    Args:
        batch_size: images per batch on this rank.
        train: shuffle (and apply ``drop_last``).
        drop_last: with ``train``, drop the last incomplete batch of every rank. Otherwise the sampler
            pads the shards to equal length with the first shuffled indices, and the last batch is
            smaller: diffusion training keeps it, as the original does (391 steps of 128 on CIFAR-10).
        num_workers: loader processes; workers persist across epochs when > 0.
        seed: shuffling seed; must be the same on every rank.
        rank, world_size: default to ``utils.distributed.get_rank() / get_world_size()``.
        device: where batches go; memory is pinned for CUDA (default: when CUDA is available).
        batch_flag: how the user sets ``batch_size`` in this script, for the error message.
    """
    rank, world_size = _rank_and_world_size(rank, world_size)
    drop_last = train and drop_last
    if train:
        if drop_last and len(dataset) < batch_size * world_size:
            raise UserError(f"the training set has {len(dataset)} images, fewer than one batch on "
                            f"every process ({batch_size} x {world_size}); lower it with {batch_flag}")
        sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                   seed=seed, drop_last=drop_last)
    else:
        sampler = EvalShardSampler(dataset, rank, world_size)
    on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        pin_memory=on_cuda, drop_last=drop_last, persistent_workers=num_workers > 0,
        # Worker seeds (and so the random crops and flips) come from this generator.
        generator=torch.Generator().manual_seed(seed + rank),
    )


def set_loader_epoch(loader, epoch):
    """Tell the loader's sampler which epoch starts, so each epoch has its own shuffle."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)


class TrainData:
    """This process's training batches; their order and flips are a pure function of (seed, epoch, rank), so
    an epoch sees the same images straight or resumed, with any number of workers, from host or device.

    Args:
        dataset: training split yielding (float image in [0, 1], label), without random flips.
        batch_size: images per optimizer step on this process.
        device: where batches are delivered.
        seed: shuffling and flipping seed, the same on every rank.
        flip: random horizontal flips with probability 1/2.
        num_workers: loader processes (unused with ``on_device``).
        on_device: keep the whole set on the device as uint8 and gather batches there.
        channels_last: deliver batches in channels-last memory format.
        drop_last: drop the epoch's last, smaller batch (by default it is kept, as in the original).
        labels: ``labelled_batches`` gives each batch's labels too (a conditional model's training).
    """

    def __init__(self, dataset, batch_size, device, seed, flip=True, num_workers=0, on_device=False,
                 channels_last=False, drop_last=False, labels=False):
        self.dataset = dataset
        self.batch_size = batch_size
        self.device = device
        self.seed = seed
        self.flip = flip
        self.channels_last = channels_last
        self.drop_last = drop_last
        self.rank = get_rank()
        # With on_device the loader is never iterated: its sampler only supplies the order.
        self.loader = build_loader(dataset, batch_size, train=True, num_workers=0 if on_device else num_workers,
                                   seed=seed, device=device, drop_last=drop_last)
        self.images = uint8_images(dataset).to(device) if on_device else None  # (N, C, H, W)
        self.labels = dataset_labels(dataset).to(device) if on_device and labels else None  # (N,)
        self.with_labels = labels

    def __len__(self):
        return len(self.loader)

    def batches(self, epoch, start=0):
        """Yield the epoch's (batch_size, C, H, W) float batches in [0, 1] on the device, from batch
        ``start`` on (a mid-epoch resume: docs/DESIGN.md, Checkpoint layout, says what is replayed)."""
        for images, _ in self.labelled_batches(epoch, start):
            yield images

    def labelled_batches(self, epoch, start=0):
        """``batches`` as (images, (B,) int64 labels on the device) pairs; the labels are None unless the
        TrainData was made with ``labels``."""
        set_loader_epoch(self.loader, epoch)
        flips = torch.Generator(self.device).manual_seed(epoch_seed(self.seed, epoch, self.rank))
        if self.flip:
            for _ in range(start):  # only the last batch can be smaller, and it is never skipped
                torch.rand(self.batch_size, generator=flips, device=self.device)
        if self.images is None:
            self.loader.sampler.skip(start * self.batch_size)
            source = ((images.to(self.device, non_blocking=True),
                       labels.to(self.device, non_blocking=True) if self.with_labels else None)
                      for images, labels in self.loader)
        else:
            order = torch.tensor(list(self.loader.sampler), device=self.device)
            picks = (order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(start, len(self)))
            source = ((v2.functional.to_dtype(self.images[pick], torch.float32, scale=True),
                       None if self.labels is None else self.labels[pick]) for pick in picks)
        for images, labels in source:
            yield self._finish(images, flips), labels

    def _finish(self, images, flips):
        if self.flip:
            flipped = torch.rand(images.shape[0], generator=flips, device=self.device) < 0.5
            images = torch.where(flipped.view(-1, 1, 1, 1), images.flip(-1), images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def describe_end(self):
        """How the epoch ends, for train.py's header line: the size of the last batch, or that it is dropped."""
        remainder = len(self.loader.sampler) % self.batch_size
        if not remainder:
            return "all full"
        if self.drop_last:
            return f"--drop_last: the last {remainder} images of each shard are dropped"
        return f"the last of {remainder}"

    def first_images(self, n):
        """The first ``n`` training images, unflipped, on the CPU: the real half of the sample grids."""
        return torch.stack([self.dataset[i][0] for i in range(min(n, len(self.dataset)))])


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset by name: how to load a split, and what training, sampling and FID take from it."""

    load: Callable                # load(root, train, transform, image_size) -> Dataset of (image, label)
    num_classes: int = None       # None: the dataset tells (``folder``)
    image_size: int = None        # the side used by default, and of FID's REF statistics; None: the config's
    layout: str = None            # the axes of its uint8 ``.data`` ("NHWC", "NCHW"); None: decode each image
    fid_samples: int = 400        # sample.py's default image count (the FID protocol: 50,000)
    resize: bool = False          # other sides are made by Resize + CenterCrop (a folder of any size)


FID_SAMPLES = 50_000
DATASETS = {  # adding a dataset is one entry here, or a DatasetSpec named by import path (docs/EXTENDING.md)
    "cifar": DatasetSpec(lambda root, train, transform, _: _load_cifar(torchvision.datasets.CIFAR10, "CIFAR-10", root,
                         train, transform), 10, 32, "NHWC", FID_SAMPLES),
    "cifar100": DatasetSpec(lambda root, train, transform, _: _load_cifar(torchvision.datasets.CIFAR100, "CIFAR-100",
                            root, train, transform), 100, 32, "NHWC", FID_SAMPLES),
    "tinyimagenet": DatasetSpec(lambda root, train, transform, _: TinyImageNet(root, train, transform), 200, 64,
                                fid_samples=FID_SAMPLES),
    "folder": DatasetSpec(lambda root, train, transform, _: _load_folder(root, train, transform), resize=True),
    "synthetic": DatasetSpec(lambda root, train, transform, size: SyntheticImages(
        image_size=size or 32, train=train, transform=transform), 10, layout="NCHW"),
}
DATASETS["cifar10"] = DATASETS["cifar"]
