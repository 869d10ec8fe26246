"""Datasets, transforms and loaders: the synthetic set, folder trees, offline CIFAR, eval sharding."""
import argparse
import os
import urllib.error

import pytest
import torch
from PIL import Image
from torchvision.datasets import utils as download_utils

from utils.data import (SHAPES, EvalShardSampler, SyntheticImages, add_data_args, build_dataset,
                        build_loader, default_num_workers, probe_train_transform, resolve_num_workers,
                        set_loader_epoch, shard_indices, train_transform)
from utils.data import test_transform as eval_transform  # the test_ prefix would make it a test
from utils.errors import UserError


def test_synthetic_is_deterministic_balanced_and_in_range():
    first = SyntheticImages(200, image_size=16, seed=3)
    again = SyntheticImages(200, image_size=16, seed=3)
    other_seed = SyntheticImages(200, image_size=16, seed=4)
    test_split = SyntheticImages(200, image_size=16, seed=3, train=False)
    assert torch.equal(first.images, again.images) and first.targets == again.targets
    assert not torch.equal(first.images, other_seed.images)
    assert not torch.equal(first.images, test_split.images)

    assert first.images.shape == (200, 3, 16, 16) and first.images.dtype == torch.uint8
    assert torch.bincount(torch.tensor(first.targets)).tolist() == [20] * 10
    image, label = first[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and isinstance(label, int)
    torch.testing.assert_close(image, first.images[0].float() / 255)
    assert 0 <= image.min() and image.max() <= 1 and image.std() > 0.05


def test_synthetic_default_sizes():
    train, test = SyntheticImages(), SyntheticImages(train=False)
    assert (len(train), len(test)) == (2000, 1000)
    assert train.images.shape[1:] == (3, 32, 32) and train.num_classes == 10


def test_synthetic_class_is_not_given_by_mean_colour():
    data = SyntheticImages(1000, image_size=16, seed=0)
    mean_rgb = data.images.float().mean(dim=(2, 3))  # (N, 3)
    labels = torch.tensor(data.targets)
    class_means = torch.stack([mean_rgb[labels == c].mean(0) for c in range(10)])  # (10, 3)
    # Hue is drawn independently of the shape, so the class means of the colour barely differ.
    between_class_std = class_means.std(0)
    within_class_std = mean_rgb.std(0)
    assert (between_class_std < 0.25 * within_class_std).all()


def test_synthetic_classes_and_bad_class_count():
    assert SyntheticImages(30, image_size=8, num_classes=3).classes == ["disc", "square", "ring"]
    with pytest.raises(UserError, match=f"classes=11.*from 1 to {len(SHAPES)}"):
        SyntheticImages(10, num_classes=11)


def test_build_dataset_synthetic_and_unknown_name():
    train = build_dataset("synthetic", "unused", train=True, image_size=8)
    assert len(train) == 2000 and train[0][0].shape == (3, 8, 8) and train.num_classes == 10
    with pytest.raises(UserError, match="unknown dataset 'imagenet'"):
        build_dataset("imagenet", "unused", train=True)
    with pytest.raises(UserError, match="'cifar' has 32x32 images"):
        build_dataset("cifar", "unused", train=True, image_size=64)


def test_transforms_accept_tensors_and_pil_images():
    uint8_image = torch.arange(3 * 8 * 8, dtype=torch.uint8).view(3, 8, 8)
    pil_image = Image.fromarray(uint8_image.permute(1, 2, 0).numpy())
    expected = uint8_image.float() / 255
    for transform in (eval_transform(), train_transform(flip=False)):
        for source in (uint8_image, pil_image, expected):
            out = transform(source)
            assert type(out) is torch.Tensor and out.dtype == torch.float32
            torch.testing.assert_close(out, expected)
    torch.manual_seed(0)
    flipped = [train_transform(flip=True)(uint8_image) for _ in range(20)]
    assert any(torch.allclose(f, expected.flip(-1)) for f in flipped)
    assert any(torch.allclose(f, expected) for f in flipped)
    cropped = probe_train_transform(8)(pil_image)
    assert cropped.shape == (3, 8, 8) and type(cropped) is torch.Tensor


def write_png_tree(root, counts, size=6):
    for class_index, (name, count) in enumerate(counts.items()):
        os.makedirs(root / name, exist_ok=True)
        for i in range(count):
            pixels = torch.full((size, size, 3), 20 * class_index + i, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / name / f"{i:03d}.png")


def test_folder_dataset_holds_out_every_tenth_image(tmp_path):
    write_png_tree(tmp_path, {"cat": 12, "dog": 10})
    train = build_dataset("folder", str(tmp_path), train=True)
    test = build_dataset("folder", str(tmp_path), train=False)
    assert train.num_classes == test.num_classes == 2
    assert (len(train), len(test)) == (20, 2)
    assert [os.path.basename(path) for path, _ in test.samples] == ["009.png", "009.png"]
    assert test.targets == [0, 1]
    image, label = test[1]
    assert label == 1 and image.shape == (3, 6, 6)
    assert torch.allclose(image, torch.full((3, 6, 6), (20 + 9) / 255))
    resized, _ = build_dataset("folder", str(tmp_path), train=True, image_size=4)[0]
    assert resized.shape == (3, 4, 4)


def test_folder_dataset_with_split_folders_and_missing_root(tmp_path):
    write_png_tree(tmp_path / "train", {"a": 3, "b": 2})
    write_png_tree(tmp_path / "val", {"a": 1, "b": 1})
    assert len(build_dataset("folder", str(tmp_path), train=True)) == 5
    assert len(build_dataset("folder", str(tmp_path), train=False)) == 2
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match=f"image folder {missing} not found"):
        build_dataset("folder", str(missing), train=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty.*one subfolder of images per class"):
        build_dataset("folder", str(tmp_path / "empty"), train=True)


def test_tinyimagenet_layout(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    for wnid in ("n02", "n01"):
        images = root / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(2):
            Image.new("L", (64, 64), 40 * i).save(images / f"{wnid}_{i}.JPEG")  # greyscale
    (root / "val" / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(root / "val" / "images" / "val_0.JPEG")
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn02\t0\t0\t63\t63\n")

    train = build_dataset("tinyimagenet", str(tmp_path), train=True)
    test = build_dataset("tinyimagenet", str(tmp_path), train=False)
    assert train.classes == ["n01", "n02"] and train.num_classes == 2
    assert train.targets == [0, 0, 1, 1] and test.targets == [1]
    assert train[0][0].shape == (3, 64, 64)
    with pytest.raises(UserError, match="Tiny ImageNet not found: .*train is missing"):
        build_dataset("tinyimagenet", str(tmp_path / "none"), train=True)


def test_cifar_offline_gives_one_clear_line_and_leaves_nothing(tmp_path, monkeypatch):
    def offline_download(url, root, filename=None, md5=None):
        with open(os.path.join(root, filename), "wb") as partial:
            partial.write(b"first bytes of the archive")
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(download_utils, "download_url", offline_download)
    root = tmp_path / "data"
    with pytest.raises(UserError) as error:
        build_dataset("cifar", str(root), train=True)
    message = str(error.value)
    assert message.startswith(f"CIFAR-10 not found under {root} and could not be downloaded (")
    assert "Temporary failure in name resolution" in message
    assert message.endswith(f"place cifar-10-python.tar.gz in {root}/ or pass --data_root DIR")
    assert "\n" not in message
    assert os.listdir(root) == []  # no partial archive, no staging folder

    with pytest.raises(UserError, match="CIFAR-100 not found.*cifar-100-python.tar.gz"):
        build_dataset("cifar100", str(root), train=False)


def test_cifar_damaged_archive_is_reported(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not an archive")
    with pytest.raises(UserError, match="cifar-10-python.tar.gz is damaged .*delete it"):
        build_dataset("cifar10", str(tmp_path), train=True)


@pytest.mark.parametrize("num_samples", [0, 1, 3, 7, 10, 101])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_eval_shards_cover_every_index_once(num_samples, world_size):
    shards = [list(shard_indices(num_samples, rank, world_size)) for rank in range(world_size)]
    assert sum(shards, []) == list(range(num_samples))
    sizes = [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1
    dataset = list(range(num_samples))
    assert [list(EvalShardSampler(dataset, rank, world_size)) for rank in range(world_size)] == shards


def test_eval_loader_keeps_every_sample_and_order():
    data = SyntheticImages(10, image_size=4, num_classes=2)
    seen = []
    for rank in range(3):
        loader = build_loader(data, batch_size=4, train=False, rank=rank, world_size=3)
        seen += [label for _, labels in loader for label in labels.tolist()]
    assert seen == data.targets


def test_train_loader_shuffles_by_epoch_and_splits_ranks():
    data = SyntheticImages(40, image_size=4, num_classes=4)

    def epoch_order(rank, epoch):
        loader = build_loader(data, batch_size=6, train=True, seed=5, rank=rank, world_size=2,
                              device="cpu")
        set_loader_epoch(loader, epoch)
        batches = list(loader)
        assert all(images.shape == (6, 3, 4, 4) for images, _ in batches) and len(batches) == 3
        return [labels.tolist() for _, labels in batches]

    assert epoch_order(0, 0) == epoch_order(0, 0)
    assert epoch_order(0, 0) != epoch_order(0, 1)
    rank0 = build_loader(data, 6, True, seed=5, rank=0, world_size=2).sampler
    rank1 = build_loader(data, 6, True, seed=5, rank=1, world_size=2).sampler
    assert set(rank0).isdisjoint(rank1) and len(set(rank0) | set(rank1)) == 40
    with pytest.raises(UserError, match="fewer than one batch on every process \\(32 x 2\\)"):
        build_loader(data, batch_size=32, train=True, rank=0, world_size=2)


def test_add_data_args_default():
    import argparse
    parser = add_data_args(argparse.ArgumentParser())
    assert parser.parse_args([]).data_root == "./data"
    assert parser.parse_args(["--data_root", "/x"]).data_root == "/x"


def test_default_num_workers_follow_this_processs_share_of_the_cpus(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert default_num_workers() == 1  # two cores: the process and one worker, no "may freeze" warning
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert default_num_workers() == 4  # at most the original's 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun --nproc_per_node=8 on those 64 cores: 8 each
    assert default_num_workers() == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert default_num_workers() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert default_num_workers() == 0

    class Cfg:
        num_workers = -1

    parser = add_data_args(argparse.ArgumentParser())
    assert resolve_num_workers(parser.parse_args([]), Cfg) == 0  # the config's default: from the CPUs
    Cfg.num_workers = 3
    assert resolve_num_workers(parser.parse_args([]), Cfg) == 3  # the config key overrides
    assert resolve_num_workers(parser.parse_args(["--num_workers", "2"]), Cfg) == 2  # and the flag overrides both
