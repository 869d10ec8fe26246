"""k-NN evaluation (knn.py), the dataset feature pass it shares with export_features.py, and the
CIFAR-100 / Tiny ImageNet configs."""
import pytest
import torch
from torch.utils.data import Subset

from model.models import build_diffusion, count_parameters
from utils.config import load_config
from utils.data import SyntheticImages, build_loader
from utils.probe import extract_dataset_features, extract_grid_features, probe_cells

TINY_OVERRIDES = ["network.image_shape=[3,16,16]", "linear.blockname=out_2", "linear.batch_size=8",
                  "num_workers=0"]


def tiny_config(save_dir, extra=()):
    """config/demo.yaml shrunk to 16x16 images (4 blocks: out_1, out_2 at 8x8; out_3, out_4 at 16x16)."""
    return load_config("config/demo.yaml", TINY_OVERRIDES + [f"save_dir={save_dir}", *extra])


def tiny_diffusion(cfg, seed=0):
    torch.manual_seed(seed)
    return build_diffusion(cfg).eval().requires_grad_(False)


def tiny_images(n, train, seed=0):
    return Subset(SyntheticImages(n=n, image_size=16, train=train, seed=seed), range(n))


def test_dataset_features_do_not_depend_on_batch_size_or_sharding(tmp_path):
    cfg = tiny_config(tmp_path)
    diffusion = tiny_diffusion(cfg)
    dataset = tiny_images(7, train=False)
    cells = ([1, 21], ["out_2", "out_4"])
    one_pass, labels = extract_dataset_features(diffusion, build_loader(dataset, 7, train=False, rank=0, world_size=1),
                                                *cells, torch.device("cpu"), seed=5)
    assert labels.tolist() == [dataset[i][1] for i in range(7)]
    assert set(one_pass) == {(t, b) for t in cells[0] for b in cells[1]}
    assert one_pass[(1, "out_2")].shape == (7, 64) and one_pass[(21, "out_4")].shape == (7, 32)

    shards = [extract_dataset_features(diffusion, build_loader(dataset, 2, train=False, rank=rank, world_size=3),
                                       *cells, torch.device("cpu"), seed=5) for rank in range(3)]
    assert torch.equal(torch.cat([shard_labels for _, shard_labels in shards]), labels)
    for cell, feature in one_pass.items():
        sharded = torch.cat([features[cell] for features, _ in shards])
        torch.testing.assert_close(sharded, feature, rtol=1e-5, atol=1e-5)

    # Image 4 on its own, with the noise of its seed, gives row 4 of the whole pass.
    image = dataset[4][0][None]
    noise = torch.randn(image.shape[1:], generator=torch.Generator().manual_seed(5 + 4))[None]
    alone = extract_grid_features(diffusion, image, *cells, noise=noise)
    torch.testing.assert_close(alone[(21, "out_2")][0], one_pass[(21, "out_2")][4], rtol=1e-5, atol=1e-5)
    other_seed, _ = extract_dataset_features(diffusion, build_loader(dataset, 7, train=False, rank=0, world_size=1),
                                             *cells, torch.device("cpu"), seed=6)
    assert not torch.allclose(other_seed[(21, "out_2")], one_pass[(21, "out_2")])


def test_empty_shard_gives_every_cell_with_no_rows(tmp_path):
    cfg = tiny_config(tmp_path)
    dataset = tiny_images(2, train=False)
    loader = build_loader(dataset, 4, train=False, rank=0, world_size=3)  # 2 images over 3 processes
    features, labels = extract_dataset_features(tiny_diffusion(cfg), loader, [11], ["out_1", "out_3"],
                                                torch.device("cpu"), seed=0)
    assert labels.shape == (0,)
    assert features[(11, "out_1")].shape == (0, 64) and features[(11, "out_3")].shape == (0, 32)


@pytest.mark.parametrize("name, dataset, classes, parameters, n_blocks, cell", [
    ("CIFAR100_DDPM_ddpm", "cifar100", 100, 35_746_307, 12, (11, "out_6")),
    ("CIFAR100_EDM_ddpm", "cifar100", 100, 35_746_307, 12, (4, "out_7")),
    ("TinyImageNet_DDPM_ddpm", "tinyimagenet", 200, 45_654_019, 15, (11, "out_9")),
    ("TinyImageNet_EDM_ddpm", "tinyimagenet", 200, 45_654_019, 15, (4, "out_10")),
])
def test_dataset_configs_load_and_build(name, dataset, classes, parameters, n_blocks, cell):
    cfg = load_config(f"config/{name}.yaml")
    assert (cfg.dataset, cfg.classes, cfg.save_dir) == (dataset, classes, f"./output_{name}")
    with torch.device("meta"):  # sizes only: no memory, no initialisation
        diffusion = build_diffusion(cfg)
    print(f"{name}: {count_parameters(diffusion):,} parameters")
    assert count_parameters(diffusion) == parameters
    assert diffusion.nn_model.block_names == cfg.network.block_names == [f"out_{k}" for k in range(1, n_blocks + 1)]
    timesteps, blocks = probe_cells(cfg, grid=True)
    assert len(timesteps) * len(blocks) == 3 * n_blocks
    assert probe_cells(cfg) == ([cell[0]], [cell[1]])


def test_tiny_imagenet_feature_resolutions():
    cfg = load_config("config/TinyImageNet_DDPM_ddpm.yaml", ["network.n_channels=32"])  # same layout, narrower
    net = build_diffusion(cfg).nn_model
    with torch.no_grad():
        activations = net.forward_features(torch.zeros(1, 3, 64, 64), torch.zeros(1), net.block_names)
    sides = [activations[f"out_{k}"].shape[-1] for k in range(1, 16)]
    assert sides == [4] * 3 + [8] * 3 + [16] * 3 + [32] * 3 + [64] * 3
