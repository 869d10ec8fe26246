"""Does float16 storage of the DiT latent cache change the probe? The same latents, stored as float32 and as
float16, probed the same way (linear probe at the config's defaults and the k-NN grid) on a CPU in minutes.

    python bench/latent_dtype.py --out /tmp/latent_dtype      # prints and writes latent_dtype.json there

The network is the golden tiny DiT (tests/golden/dit_tiny.pt). The latents are made without a VAE: a
random AutoencoderKL's GroupNorms erase the colours and its features the shapes, so every probe on them
is at chance and cannot show a difference. Here a latent is the image average-pooled to 8x8 (plus a grey
channel), standardised to about unit scale like the SD VAE's scaled latents, plus a little noise; the
images are the built-in synthetic shapes, tinted by class so that the random DiT's features carry the
label. Training copies get the cache's flip + crop, from the cache's per-image seeds.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import knn  # noqa: E402
import linear  # noqa: E402
from evaluation.cells import probe_cells  # noqa: E402
from evaluation.frozen import prepare_frozen  # noqa: E402
from model.models import build_diffusion, load_config  # noqa: E402
from model.vae import augment  # noqa: E402
from utils.data import SyntheticImages  # noqa: E402
from utils.latents import TEST_COPY, latent_datasets, latent_seed, prepare_cache, split_name  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden", "dit_tiny.pt")
TINY = ["network.input_size=8", "network.hidden_size=64", "network.depth=3", "network.num_heads=4",
        "latents.image_size=64", "latents.source_size=16", "linear.blockname=layer-1", "num_workers=0"]
SEED = 1337


def tinted_shapes(train):
    """The synthetic shapes (16x16), each class multiplied by its own colour."""
    images = SyntheticImages(image_size=16, train=train)
    tints = torch.rand(images.num_classes, 3, generator=torch.Generator().manual_seed(3)) * 0.6 + 0.4
    return [(images[i][0] * tints[images.targets[i]].view(3, 1, 1)) for i in range(len(images))], images.targets


def pooled_latents(images, copy, padding):
    rows = []
    for index, image in enumerate(images):
        generator = torch.Generator().manual_seed(latent_seed(SEED, copy, index))
        if copy != TEST_COPY:
            image = augment(image, generator, padding)
        pooled = F.avg_pool2d(image[None], 2)[0]  # (3, 8, 8)
        latent = (torch.cat([pooled, pooled.mean(0, keepdim=True)]) - 0.3) / 0.2
        rows.append(latent + 0.05 * torch.randn(latent.shape, generator=generator))
    return torch.stack(rows).numpy()


def main(args):
    torch.set_num_threads(args.threads)
    splits = {train: tinted_shapes(train) for train in (True, False)}
    copies = 10
    arrays = {copy: pooled_latents(splits[copy != TEST_COPY][0], copy, 4) for copy in [*range(copies), TEST_COPY]}
    result = {}
    for dtype in ("float32", "float16"):
        cache_dir = os.path.join(args.out, dtype)
        cfg = load_config(os.path.join(ROOT, "config", "DiT_XL_2_cifar.yaml"),
                          TINY + [f"latents.cache_dir={cache_dir}", f"latents.dtype={dtype}",
                                  f"save_dir={os.path.join(args.out, 'run_' + dtype)}", f"seed={SEED}",
                                  f"linear.n_epoch={args.epochs}"], allow_dit=True)
        settings = {"dataset": "synthetic, tinted", "n_train": len(splits[True][1]), "n_test": len(splits[False][1]),
                    "seed": SEED, "source_size": 16, "crop_padding": 4, "image_size": 64, "scale": 1.0,
                    "dtype": dtype, "latent_shape": [4, 8, 8], "vae_sha256": "none: pooled pixels",
                    "precision": "fp32", "num_classes": 10}
        prepare_cache(cache_dir, settings, copies, splits[True][1], splits[False][1])
        for copy, array in arrays.items():
            np.save(os.path.join(cache_dir, f"{split_name(copy)}.npy"), array.astype(dtype))

        diffusion = build_diffusion(cfg)
        diffusion.nn_model.load_state_dict(torch.load(GOLDEN, weights_only=True)["state_dict"])
        diffusion = prepare_frozen(diffusion, torch.device("cpu"))
        device = torch.device("cpu")
        torch.manual_seed(SEED)
        timesteps, blocks = probe_cells(cfg)
        probe = linear.run_probe(cfg, diffusion, *latent_datasets(cfg), timesteps, blocks, device,
                                 out_dir=os.path.join(cfg.save_dir, "linear"), tag="probe")
        timesteps, blocks = probe_cells(cfg, grid=True)
        neighbours = knn.run_knn(cfg, diffusion, *latent_datasets(cfg, train_copy=0), timesteps, blocks, device,
                                 out_dir=os.path.join(cfg.save_dir, "knn"), tag="grid", seed=SEED)
        result[dtype] = {"linear": probe["best"]["accuracy"], "knn_grid": neighbours["accuracy"]}
    stored = arrays[0].astype(np.float16).astype(np.float32)
    result["rounding"] = {"latent_std": float(arrays[0].std()), "max_abs": float(np.abs(arrays[0] - stored).max())}
    result["knn_max_abs_difference"] = max(abs(result["float32"]["knn_grid"][t][b] - result["float16"]["knn_grid"][t][b])
                                           for t in result["float32"]["knn_grid"] for b in result["float32"]["knn_grid"][t])
    with open(os.path.join(args.out, "latent_dtype.json"), "w") as file:
        json.dump(result, file, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the two caches and latent_dtype.json")
    parser.add_argument("--epochs", type=int, default=30, help="linear-probe epochs (the DiT configs' 30)")
    parser.add_argument("--threads", type=int, default=2)
    main(parser.parse_args())
