"""The DiT latent cache with a tiny random AutoencoderKL: encode, cache and probe end to end, resume,
1 vs 2 processes, flat memory, and the one-line errors of missing files."""
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import encode_latents
import export_features
import knn
import linear
from model.models import load_config, load_diffusion
from model.noise import PerImageNoise
from model.vae import encode_images, load_vae
from tests.launch import REPO, run_two_processes
from tests.helpers import save_golden_weights, write_tiny_config
from utils.data import SyntheticImages
from utils.latents import TEST_COPY, LatentCache, latent_seed

N_IMAGES = 48  # per split, with --max_images


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny random AutoencoderKL (downsampling 8, 4 latent channels) and the golden DiT, as files."""
    from diffusers import AutoencoderKL

    folder = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=64)
    vae.save_pretrained(folder / "vae")
    return {"vae": folder / "vae", "ckpt": save_golden_weights(folder / "dit.pt")}


def make_config(folder, pretrained, **kwargs):
    Path(folder).mkdir(parents=True, exist_ok=True)
    return write_tiny_config(folder, ckpt=pretrained["ckpt"], vae=pretrained["vae"], **kwargs)


def encode(config, *extra, max_images=N_IMAGES):
    argv = ["--config", str(config), "--device", "cpu", "--max_images", str(max_images), "--batch_size", "8", *extra]
    return encode_latents.main(encode_latents.build_parser().parse_args(argv))


def read_cache(cache_dir):
    return {path.name: np.load(path) for path in sorted(Path(cache_dir).glob("*.npy"))}


def test_encode_cache_and_probe_end_to_end(tmp_path, pretrained):
    config = make_config(tmp_path, pretrained)
    result = encode(config)
    assert result["encoded"] == [0, 1, TEST_COPY]
    cfg = load_config(config, allow_dit=True)
    cache = read_cache(cfg.latents.cache_dir)
    assert sorted(cache) == ["test.npy", "test_labels.npy", "train_0.npy", "train_1.npy", "train_labels.npy"]
    assert cache["train_0.npy"].shape == (N_IMAGES, 4, 8, 8) and cache["train_0.npy"].dtype == np.float16

    # each latent is its own function of (seed, copy, index): recompute a few directly
    vae = load_vae(str(pretrained["vae"]))
    for split, copy, name in ((True, 1, "train_1.npy"), (False, TEST_COPY, "test.npy")):
        images = SyntheticImages(image_size=16, train=split)
        assert cache[name.replace(name.split(".")[0], "train_labels" if split else "test_labels")].tolist() == \
            images.targets[:N_IMAGES]
        picked = [5, 30]
        expected = encode_images(vae, torch.stack([images[i][0] for i in picked]),
                                 [latent_seed(cfg.seed, copy, i) for i in picked], cfg.latents.scale,
                                 cfg.latents.image_size, None if copy == TEST_COPY else cfg.latents.crop_padding)
        stored = torch.from_numpy(cache[name][picked].astype(np.float32))
        torch.testing.assert_close(stored, expected, rtol=1e-3, atol=1e-3)  # float16 storage
    assert not np.array_equal(cache["train_0.npy"], cache["train_1.npy"])  # other flips, crops and noise

    probe = ["--config", str(config), "--device", "cpu"]
    linear.main(linear.build_parser().parse_args(probe + ["--grid", "--set", "linear.n_epoch=1", "--tag", "dit_grid"]))
    grid = json.loads((tmp_path / "run" / "linear" / "dit_grid.json").read_text())
    assert grid["timesteps"] == [41, 81, 121, 161, 201] and grid["blocks"] == ["layer-0", "layer-1", "layer-2"]
    assert grid["test_images"] == N_IMAGES and (tmp_path / "run" / "linear" / "dit_grid.png").is_file()
    knn.main(knn.build_parser().parse_args(probe + ["--k", "5"]))
    neighbours = json.loads(next((tmp_path / "run" / "knn").glob("dit_sha*_t121_layer-1_k5_T0.07.json")).read_text())
    assert (neighbours["train_images"], neighbours["test_images"]) == (N_IMAGES, N_IMAGES)

    out = tmp_path / "features"
    export_features.main(export_features.build_parser().parse_args(probe + ["--out", str(out), "--seed", "7"]))
    exported = np.load(out / "layer-1.npy")
    diffusion = load_diffusion(cfg, str(pretrained["ckpt"]))
    latents = torch.from_numpy(cache["test.npy"].astype(np.float32))
    with torch.no_grad():
        direct = diffusion.get_feature(latents, 121, name="layer-1",
                                       noise=PerImageNoise([7 + i for i in range(N_IMAGES)], "cpu")((4, 8, 8)))
    torch.testing.assert_close(torch.from_numpy(exported), direct, rtol=1e-5, atol=1e-5)


def test_cache_resumes_at_the_unfinished_copy(tmp_path, pretrained, monkeypatch):
    reference = make_config(tmp_path / "straight", pretrained, dtype="float32")
    encode(reference, max_images=16)

    config = make_config(tmp_path / "killed", pretrained, dtype="float32")
    calls = []

    def dies_in_copy_1(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 3:  # copy 0 is two batches of 8; die in the first batch of copy 1
            raise KeyboardInterrupt
        return encode_images(*args, **kwargs)

    monkeypatch.setattr(encode_latents, "encode_images", dies_in_copy_1)
    with pytest.raises(SystemExit):
        encode(config, max_images=16)
    cache_dir = tmp_path / "killed" / "cache"
    assert (cache_dir / "train_0.npy").is_file() and (cache_dir / "train_1.partial.npy").is_file()
    assert not (cache_dir / "train_1.npy").exists()
    finished_copy = (cache_dir / "train_0.npy").stat()

    calls.clear()
    monkeypatch.setattr(encode_latents, "encode_images", lambda *a, **k: calls.append(len(a[1])) or encode_images(*a, **k))
    assert encode(config, max_images=16)["encoded"] == [1, TEST_COPY]
    assert sum(calls) == 32  # copy 1 and the test split, each image once
    assert (cache_dir / "train_0.npy").stat().st_mtime_ns == finished_copy.st_mtime_ns
    assert not (cache_dir / "train_1.partial.npy").exists()
    straight, resumed = read_cache(tmp_path / "straight" / "cache"), read_cache(cache_dir)
    assert sorted(straight) == sorted(resumed)
    for name in straight:
        assert np.array_equal(straight[name], resumed[name]), name

    calls.clear()
    assert encode(config, max_images=16)["encoded"] == [] and calls == []  # complete: nothing to redo


def test_same_cache_from_one_and_two_processes(tmp_path, pretrained):
    one = make_config(tmp_path / "one", pretrained)
    encode(one, max_images=40)
    two = make_config(tmp_path / "two", pretrained)
    finished = run_two_processes("encode_latents.py", "--config", two, "--device", "cpu", "--max_images", 40,
                                 "--batch_size", 8, cwd=REPO, timeout=120)
    assert finished.returncode == 0, finished.stderr[-2000:]
    first, second = read_cache(tmp_path / "one" / "cache"), read_cache(tmp_path / "two" / "cache")
    assert sorted(first) == sorted(second) and len(first) == 5
    for name in first:
        assert np.array_equal(first[name], second[name]), name


def test_probe_reads_one_random_copy_from_disk(tmp_path, pretrained):
    config = make_config(tmp_path, pretrained, dtype="float32")
    encode(config, max_images=8)
    cache_dir = tmp_path / "cache"
    dataset = LatentCache(cache_dir, "train", copies=2)
    assert all(isinstance(array, np.memmap) for array in dataset._open())  # never loaded into memory
    assert len(pickle.dumps(dataset)) < 4096  # data-loader workers get the paths, not the arrays
    copies = [np.load(cache_dir / f"train_{c}.npy")[3] for c in range(2)]
    torch.manual_seed(0)
    picked = set()
    for _ in range(20):
        latent, label = dataset[3]
        matches = [c for c in range(2) if np.array_equal(latent.numpy(), copies[c])]
        assert len(matches) == 1 and label == dataset.targets[3]
        picked.add(matches[0])
    assert picked == {0, 1}
    fixed = LatentCache(cache_dir, "train", copies=2, copy=1)
    assert all(np.array_equal(fixed[3][0].numpy(), copies[1]) for _ in range(5))


def run_cli(module, argv, capsys):
    with pytest.raises(SystemExit) as stopped:
        module.main(module.build_parser().parse_args(argv))
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_missing_or_mismatched_files_are_one_line_errors(tmp_path, pretrained, capsys):
    config = make_config(tmp_path, pretrained)
    argv = ["--config", str(config), "--device", "cpu"]
    err = run_cli(linear, argv, capsys)
    assert f"latent cache file {tmp_path / 'cache' / 'train_0.npy'} not found; encode the latents first" in err

    err = run_cli(encode_latents, argv + ["--set", f"latents.vae={tmp_path / 'no_vae'}"], capsys)
    assert f"VAE folder {tmp_path / 'no_vae'} not found" in err and "huggingface-cli download stabilityai/sd-vae-ft-mse" in err
    broken = tmp_path / "broken_vae"
    broken.mkdir()
    (broken / "config.json").write_text((pretrained["vae"] / "config.json").read_text())
    err = run_cli(encode_latents, argv + ["--set", f"latents.vae={broken}"], capsys)
    assert f"VAE folder {broken} has no diffusion_pytorch_model.safetensors; download" in err
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"truncated")
    err = run_cli(encode_latents, argv + ["--set", f"latents.vae={broken}"], capsys)
    assert f"VAE folder {broken} is incomplete or damaged" in err

    encode(config, max_images=8)
    err = run_cli(linear, argv + ["--ckpt", str(tmp_path / "absent.pt")], capsys)
    assert f"DiT checkpoint {tmp_path / 'absent.pt'} not found; download https://dl.fbaipublicfiles.com" in err
    err = run_cli(encode_latents, argv + ["--max_images", "8", "--set", "seed=5"], capsys)
    assert f"{tmp_path / 'cache'} holds latents made with seed=1337, but this run has seed=5" in err
    err = run_cli(export_features, argv + ["--images", str(tmp_path)], capsys)
    assert "--images with a DiT config" in err


def test_encoding_reports_progress_in_a_log_file(tmp_path, pretrained, capsys):
    """With stderr not a terminal (pytest's capture), each copy's pass prints plain progress lines."""
    encode(make_config(tmp_path, pretrained), max_images=16)
    lines = capsys.readouterr().out.splitlines()
    for name in ("train_0", "train_1", "test"):
        assert f"encoding {name}: 2/2 batch (100%)" in "\n".join(lines), lines
    assert not any("\r" in line for line in lines)
