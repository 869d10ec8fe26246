"""Fréchet Inception Distance between two image sets, with cached reference statistics.

    python fid.py data/cifar10-pngs/ output_DDPM_ddpm/EMAgenerated_ep1999_ddim_steps100_eta0.0/pngs/
    python fid.py dataset:cifar10 GEN_FOLDER --data_root ./data     # CIFAR-10 train split, no PNGs needed
    python fid.py REF GEN --ref_cache stats/cifar10_train.npz       # REF's statistics computed once

REF and GEN are each a folder of images, an .npz holding ``mu`` and ``sigma`` (pytorch-fid's
format), or, for REF, ``dataset:NAME`` (the training split of a utils.data dataset). The features
are pytorch-fid's InceptionV3 2048-d pool features, the images are read as pytorch-fid reads them
(RGB, ToTensor, the network resizes to 299) in the same order, and the distance is pytorch-fid's
``calculate_frechet_distance``: the number equals ``python -m pytorch_fid REF GEN`` at the same
batch size (50 by default, as there).

REF's statistics are cached (next to REF, or --ref_cache) with a fingerprint of REF's files (names,
sizes, modification times) and of the Inception weights file; when either changes, or the image
count, the statistics are computed again and a line says why. Both paths are checked before any
statistics are computed.
"""
import argparse
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from utils.atomic import atomic_path
from utils.distributed import DEVICE_CHOICES, resolve_device, usable_cpus
from utils.errors import UserError, cli_entry, describe_error
from utils.preemption import StopSignals
from utils.progress import iterate

# pytorch-fid and torchvision are imported where they are used: they take seconds to import, and
# sample.py reads this module's flags on every run.
INCEPTION_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"  # the file pytorch-fid downloads
DATASET_PREFIX = "dataset:"


class InceptionPool3(nn.Module):
    """pytorch-fid's InceptionV3 as a feature extractor: (B, 3, H, W) in [0, 1] -> (B, 2048)."""

    fid_tag = f"pytorch-fid InceptionV3 pool3 ({INCEPTION_WEIGHTS})"

    def __init__(self, inception):
        super().__init__()
        self.inception = inception

    def forward(self, images):
        return self.inception(images)[0].flatten(1)  # (B, 2048, 1, 1) -> (B, 2048)


def inception_weights_folder():
    """Where torch.hub (and so pytorch-fid) looks for the Inception weights."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def load_inception(device):
    """pytorch-fid's InceptionV3 (2048-d pool features) in eval mode, or a one-line UserError when
    its weights are neither cached nor downloadable."""
    from pytorch_fid import inception as fid_inception

    weights = os.path.join(inception_weights_folder(), INCEPTION_WEIGHTS)
    had_weights = os.path.isfile(weights)
    try:
        network = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    except Exception as err:  # urllib, ssl, OSError and torch.load failures all end here
        reason = describe_error(err)
        if had_weights:
            raise UserError(f"the Inception weights {weights} could not be read ({reason}); delete the file "
                            f"so that it is downloaded again, or replace it with a good copy") from None
        raise UserError(f"the Inception weights {INCEPTION_WEIGHTS} are not in {inception_weights_folder()} and "
                        f"could not be downloaded ({reason}); download {fid_inception.FID_WEIGHTS_URL} "
                        f"and place it in that folder") from None
    return InceptionPool3(network).to(device).eval()


def list_images(folder):
    """The image files of ``folder`` in the order pytorch-fid reads them (sorted paths)."""
    from pytorch_fid.fid_score import IMAGE_EXTENSIONS

    folder = Path(folder)
    return sorted(file for extension in IMAGE_EXTENSIONS for file in folder.glob(f"*.{extension}"))


def _unit_float(image):
    """A dataset image (PIL or uint8 tensor) as pytorch-fid's ToTensor gives it: float in [0, 1]."""
    if isinstance(image, Image.Image):
        from torchvision.transforms.functional import to_tensor

        return to_tensor(image.convert("RGB"))
    return image.float().div(255) if image.dtype == torch.uint8 else image


@torch.no_grad()
def activations(dataset, feature_extractor, device, batch_size=50, num_workers=None, progress=True,
                desc="FID features"):
    """Features of every image of ``dataset``, batch by batch in order, as pytorch-fid computes them.

    Args:
        dataset: yields (3, H, W) float images in [0, 1], or ``(image, label)`` pairs of them.
        feature_extractor: module or callable, (B, 3, H, W) in [0, 1] -> (B, D).
        device: where the extractor runs.
        batch_size: images per forward pass.
        num_workers: loader processes (default min(8, CPUs), as pytorch-fid).
        desc: the progress lines' prefix (names the image set).

    Returns:
        (N, D) float64 numpy array.
    """
    loader = DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=False, drop_last=False,
                        num_workers=min(usable_cpus(), 8) if num_workers is None else num_workers)
    features = []
    for batch in iterate(loader, desc=desc, unit="batch", disable=not progress):
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        features.append(feature_extractor(images.to(device)).float().cpu().numpy())
    return np.concatenate(features).astype(np.float64)


def statistics(features):
    """Mean (D,) and covariance (D, D) of (N, D) features, as pytorch-fid computes them."""
    if features.shape[0] < 2:
        raise UserError(f"FID needs at least 2 images, got {features.shape[0]}")
    if features.shape[0] < features.shape[1]:
        print(f"note: {features.shape[0]} images for {features.shape[1]} features: their covariance is "
              f"singular and the FID biased upwards; compare it only with FIDs of as many images "
              f"(the papers use 50,000)", flush=True)
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def files_statistics(files, feature_extractor, device, **options):
    """(mu, sigma) of the image files ``files`` (read as RGB with ToTensor, like pytorch-fid)."""
    from pytorch_fid.fid_score import ImagePathDataset
    from torchvision.transforms.functional import to_tensor

    dataset = ImagePathDataset(list(files), transforms=to_tensor)
    return statistics(activations(dataset, feature_extractor, device, **options))


def dataset_statistics(name, data_root, feature_extractor, device, **options):
    """(mu, sigma, n_images) of the training split of the utils.data dataset ``name``."""
    from utils.data import build_dataset

    dataset = build_dataset(name, data_root, train=True, transform=_unit_float)
    mu, sigma = statistics(activations(dataset, feature_extractor, device, **options))
    return mu, sigma, len(dataset)


def load_statistics(path):
    """(mu, sigma) from an .npz written by pytorch-fid (``--save-stats``) or by this module."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: statistics file not found; pass an existing .npz or an image folder")
    try:
        with np.load(path) as stats:
            return stats["mu"], stats["sigma"]
    except (KeyError, OSError, ValueError) as err:
        raise UserError(f"{path} is not an FID statistics file with 'mu' and 'sigma' ({err}); "
                        f"delete it or pass another file") from None


CACHE_KEYS = ("source", "n_images", "files", "features", "weights")  # what a cache was computed from


def _statistics_metadata(path):
    """The CACHE_KEYS recorded in a cache (None for those an older cache lacks), or {} for a bare
    pytorch-fid .npz."""
    with np.load(path) as stats:
        if "source" not in stats:
            return {}
        return {key: (int(stats[key]) if key == "n_images" else str(stats[key])) if key in stats else None
                for key in CACHE_KEYS}


def save_statistics(path, mu, sigma, **metadata):
    """Write (mu, sigma) with what they were computed from (the CACHE_KEYS); pytorch-fid reads the file too."""
    with atomic_path(path, what="FID statistics ", fix="pass --ref_cache with a writable path") as temporary:
        with open(temporary, "wb") as file:
            np.savez(file, mu=mu, sigma=sigma, **{key: np.array(metadata[key]) for key in CACHE_KEYS})


def files_fingerprint(files):
    """SHA-256 of the names, sizes and modification times of ``files``: it changes when any image is
    replaced, added, removed or renamed, without reading the images."""
    digest = hashlib.sha256()
    for file in files:
        stat = os.stat(file)
        digest.update(f"{os.path.basename(file)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def weights_fingerprint(path):
    """Name, size and modification time of a weights file, or "absent" when there is none."""
    if path is None or not os.path.isfile(path):
        return "absent"
    stat = os.stat(path)
    return f"{os.path.basename(path)}:{stat.st_size}:{stat.st_mtime_ns}"


def default_cache(ref, data_root):
    """Where the statistics of a reference are cached when no --ref_cache is given."""
    if ref.startswith(DATASET_PREFIX):
        return os.path.join(data_root, f"fid_stats_{ref[len(DATASET_PREFIX):]}_train.npz")
    return os.path.normpath(ref) + ".fid_stats.npz"


def _feature_tag(feature_extractor):
    return getattr(feature_extractor, "fid_tag", type(feature_extractor).__name__)


def _describe_source(ref, data_root):
    if ref.startswith(DATASET_PREFIX):
        return f"{ref}@{os.path.abspath(data_root)}"
    return os.path.abspath(ref)


class FeatureSource:
    """Builds the feature extractor (pytorch-fid's Inception unless one is given) on first use."""

    def __init__(self, feature_extractor, device):
        self.extractor, self.device = feature_extractor, device
        self.given = feature_extractor is not None

    def __call__(self):
        if self.extractor is None:
            self.extractor = load_inception(self.device)
        return self.extractor

    @property
    def tag(self):
        """The name recorded in caches, known without building the network."""
        return InceptionPool3.fid_tag if self.extractor is None else _feature_tag(self.extractor)

    @property
    def weights(self):
        """The fingerprint of the weights file: pytorch-fid's Inception file, or a given extractor's
        ``fid_weights`` file (tests)."""
        if self.given:
            return weights_fingerprint(getattr(self.extractor, "fid_weights", None))
        return weights_fingerprint(os.path.join(inception_weights_folder(), INCEPTION_WEIGHTS))


def _stale_reasons(recorded, expected):
    """Why a cache recorded as ``recorded`` does not fit ``expected``; [] when it fits."""
    names = {"source": "the reference", "n_images": "the image count", "files": "the reference images",
             "features": "the feature network", "weights": "the Inception weights"}
    return [f"{names[key]} changed" + (f" ({recorded[key]!r}, now {value!r})" if key in ("source", "n_images") else "")
            if recorded[key] is not None else f"it records no {key}" for key, value in expected.items()
            if recorded[key] != value]


def reference_statistics(ref, features, cache, data_root, options):
    """(mu, sigma) of REF: an .npz, a folder or ``dataset:NAME``; computed once and kept in ``cache``."""
    if ref.endswith(".npz"):
        return load_statistics(ref)
    is_dataset = ref.startswith(DATASET_PREFIX)
    source = _describe_source(ref, data_root)
    files = None if is_dataset else list_images(ref)
    fingerprint = None if is_dataset else files_fingerprint(files)
    if cache and os.path.isfile(cache):
        mu, sigma = load_statistics(cache)
        recorded = _statistics_metadata(cache)
        expected = {"source": source, "features": features.tag, "weights": features.weights}
        if files is not None:
            expected.update(n_images=len(files), files=fingerprint)
        stale = _stale_reasons(recorded, expected) if recorded else []  # a bare pytorch-fid .npz is trusted
        if not stale:
            return mu, sigma
        print(f"FID cache {cache} is stale: {'; '.join(stale)}; recomputing the reference statistics", flush=True)
    extractor = features()
    if is_dataset:
        mu, sigma, n_images = dataset_statistics(ref[len(DATASET_PREFIX):], data_root, extractor,
                                                 features.device, desc=f"FID features of {ref}", **options)
    else:
        if len(files) < 2:
            raise UserError(f"reference folder {ref} holds {len(files)} image{'' if len(files) == 1 else 's'}; FID "
                            f"needs a folder of images (e.g. the 50,000 CIFAR-10 PNGs from extract_cifar10_pngs.ipynb)")
        mu, sigma = files_statistics(files, extractor, features.device, desc=f"FID features of {ref}", **options)
        n_images = len(files)
    if cache:
        try:
            save_statistics(cache, mu, sigma, source=source, n_images=n_images, files=fingerprint or "",
                            features=features.tag, weights=features.weights)
        except OSError as err:
            print(f"note: could not cache the reference statistics at {cache} ({err.strerror}); "
                  f"pass --ref_cache with a writable path to reuse them")
    return mu, sigma


def check_inputs(ref, gen):
    """Check both paths before any statistics are computed, so a typo in GEN is not found after REF's
    statistics (or reported as a missing Inception file when offline)."""
    for role, path, kinds, fix in (
            ("reference", ref, "a folder, an .npz or dataset:NAME",
             "pass the folder of reference PNGs (see extract_cifar10_pngs.ipynb) or its statistics .npz"),
            ("generated images", gen, "a folder or an .npz", "pass the pngs/ folder of a sample.py run")):
        if not isinstance(path, (str, os.PathLike)):
            continue  # a list of files
        path = os.fspath(path)
        if role == "reference" and path.startswith(DATASET_PREFIX):
            continue
        if path.endswith(".npz"):
            if not os.path.isfile(path):
                raise UserError(f"{role} {path}: statistics file not found; {fix}")
        elif not os.path.isdir(path):
            raise UserError(f"{role} {path}: not {kinds}; {fix}")


def generated_statistics(gen, features, options):
    """(mu, sigma) of GEN: an .npz, a folder, or a list of image files."""
    if isinstance(gen, (str, os.PathLike)) and os.fspath(gen).endswith(".npz"):
        return load_statistics(os.fspath(gen))
    if isinstance(gen, (str, os.PathLike)):
        files = list_images(gen)
    else:
        files = list(gen)
    if len(files) < 2:
        raise UserError(f"generated images {gen}: {len(files)} image{'' if len(files) == 1 else 's'} found; "
                        f"FID needs at least 2")
    name = gen if isinstance(gen, (str, os.PathLike)) else f"{len(files)} generated images"
    return files_statistics(files, features(), features.device, desc=f"FID features of {name}", **options)


def compute_fid(ref, gen, feature_extractor=None, device="cpu", batch_size=50, num_workers=None,
                ref_cache=None, data_root="./data", progress=True):
    """The FID between a reference and a generated image set.

    Args:
        ref: image folder, .npz of (mu, sigma), or ``dataset:NAME`` (training split of a utils.data
            dataset under ``data_root``).
        gen: image folder, .npz, or a list of image files.
        feature_extractor: (B, 3, H, W) in [0, 1] -> (B, D); pytorch-fid's InceptionV3 when None
            (tests pass a small network). A ``fid_tag`` attribute names it in caches.
        device: where the extractor runs.
        batch_size: images per forward pass (pytorch-fid's default is 50).
        num_workers: image-loading processes (default min(8, CPUs)).
        ref_cache: .npz keeping REF's statistics; None uses ``default_cache(ref)``, "" disables it.
        data_root: folder of the datasets for ``dataset:NAME``.

    Returns:
        the FID as a Python float.
    """
    check_inputs(ref, gen)
    features = FeatureSource(feature_extractor, torch.device(device))
    options = {"batch_size": batch_size, "num_workers": num_workers, "progress": progress}
    cache = default_cache(ref, data_root) if ref_cache is None else ref_cache
    mu_ref, sigma_ref = reference_statistics(ref, features, cache, data_root, options)
    mu_gen, sigma_gen = generated_statistics(gen, features, options)
    if mu_ref.shape != mu_gen.shape:
        raise UserError(f"the reference statistics have {mu_ref.shape[0]} dimensions but the generated ones "
                        f"{mu_gen.shape[0]}; compute both with the same network (2048-d Inception pool)")
    from pytorch_fid.fid_score import calculate_frechet_distance

    # REF first, as `python -m pytorch_fid REF GEN` orders them (sqrtm of the product is not symmetric in rounding)
    return float(calculate_frechet_distance(mu_ref, sigma_ref, mu_gen, sigma_gen))


def add_fid_args(parser):
    """Options shared by fid.py and sample.py --fid."""
    parser.add_argument("--ref_cache", default=None,
                        help="where REF's statistics are cached (default: next to REF, or "
                             "DATA_ROOT/fid_stats_NAME_train.npz for dataset:NAME); '' disables caching")
    parser.add_argument("--data_root", default="./data", help="dataset folder for REF = dataset:NAME")
    parser.add_argument("--fid_batch_size", type=int, default=50,
                        help="Inception batch size (50, pytorch-fid's default, gives its exact number)")
    parser.add_argument("--fid_workers", type=int, default=None, help="image-loading processes (default min(8, CPUs))")
    return parser


def build_parser():
    parser = argparse.ArgumentParser(description="Fréchet Inception Distance, as pytorch-fid computes it.")
    parser.add_argument("ref", help="reference: image folder, .npz (mu, sigma) or dataset:NAME (e.g. dataset:cifar10)")
    parser.add_argument("gen", help="generated images: folder or .npz")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto: CUDA when available")
    return add_fid_args(parser)


@cli_entry
def main(args):
    value = compute_fid(args.ref, args.gen, device=resolve_device(args.device), batch_size=args.fid_batch_size,
                        num_workers=args.fid_workers, ref_cache=args.ref_cache, data_root=args.data_root)
    print(f"FID: {value}")
    return value


if __name__ == "__main__":
    # SIGTERM / SIGUSR1: stop at once with exit code 75, saying what the same command redoes
    with StopSignals(at_once="nothing of this run is kept but cached reference statistics; the same command "
                             "computes the FID again"):
        main(build_parser().parse_args())
