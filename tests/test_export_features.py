"""export_features.py: .npy files per block, labels and file names, for dataset splits and image folders."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import export_features
from evaluation.features import extract_grid_features
from tests.helpers import TINY_OVERRIDES, tiny_config, tiny_diffusion
from tests.launch import REPO
from utils.checkpoint import save_checkpoint
from utils.data import SyntheticImages
from utils.errors import UserError
from utils.provenance import short_digest


@pytest.fixture
def tiny_run(tmp_path):
    """A tiny config (16x16 synthetic images, blocks out_1..out_4) and a checkpoint of its network."""
    cfg = tiny_config(tmp_path / "run")
    checkpoint = tmp_path / "model_7.pth"
    save_checkpoint({"MODEL": tiny_diffusion(cfg).state_dict()}, checkpoint)
    return cfg, checkpoint


def run_cli(tmp_path, checkpoint, *extra):
    sets = [arg for override in TINY_OVERRIDES + [f"save_dir={tmp_path / 'run'}"] for arg in ("--set", override)]
    argv = ["--config", str(REPO / "config" / "demo.yaml"), *sets, "--ckpt", str(checkpoint), "--device", "cpu",
            "--batch_size", "5", *extra]
    export_features.main(export_features.build_parser().parse_args(argv))


def test_split_export_writes_one_array_per_block(tmp_path, tiny_run):
    cfg, checkpoint = tiny_run
    run_cli(tmp_path, checkpoint, "--split", "test", "--max_images", "12", "--blocks", "out_1", "out_3",
            "--timestep", "21", "--seed", "100")
    out = tmp_path / "run" / "features" / f"model_7_{short_digest(checkpoint)}_t21_test_max12_seed100"
    assert sorted(p.name for p in out.iterdir()) == ["labels.npy", "meta.json", "out_1.npy", "out_3.npy"]
    out_1, out_3, labels = (np.load(out / name) for name in ("out_1.npy", "out_3.npy", "labels.npy"))
    assert (out_1.shape, out_1.dtype, out_3.shape, labels.dtype) == ((12, 64), np.float32, (12, 32), np.int64)
    test_set = SyntheticImages(image_size=16, train=False)
    assert labels.tolist() == test_set.targets[:12]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["timestep"] == 21 and meta["blocks"] == ["out_1", "out_3"] and meta["n_images"] == 12
    assert meta["dims"] == {"out_1": 64, "out_3": 32} and meta["norm"] is False
    assert meta["source"] == "synthetic/test" and meta["checkpoint"] == str(checkpoint)

    # Row 9 is image 9 noised with seed 100 + 9, through the checkpoint's network.
    image = test_set[9][0][None]
    noise = torch.randn(image.shape[1:], generator=torch.Generator().manual_seed(109))[None]
    alone = extract_grid_features(tiny_diffusion(cfg), image, [21], ["out_3"], noise=noise)[(21, "out_3")]
    np.testing.assert_allclose(out_3[9], alone[0].numpy(), rtol=1e-5, atol=1e-5)


def test_norm_gives_unit_rows_of_the_same_features(tmp_path, tiny_run):
    _, checkpoint = tiny_run
    run_cli(tmp_path, checkpoint, "--max_images", "6", "--out", str(tmp_path / "raw"))
    run_cli(tmp_path, checkpoint, "--max_images", "6", "--norm", "--out", str(tmp_path / "unit"))
    raw, unit = np.load(tmp_path / "raw" / "out_2.npy"), np.load(tmp_path / "unit" / "out_2.npy")  # linear.blockname
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "unit" / "meta.json").read_text())["timestep"] == 11  # linear.timestep


def test_image_folder_export_keeps_names_and_folder_labels(tmp_path, tiny_run):
    _, checkpoint = tiny_run
    folder = tmp_path / "photos"
    (folder / "dogs").mkdir(parents=True)
    (folder / "cats" / "indoor").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(folder / "loose.png")
    Image.fromarray(rng.integers(0, 256, (40, 24), dtype=np.uint8)).save(folder / "dogs" / "grey.jpg")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / "cats" / "indoor" / "b.PNG")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / "cats" / "a.png")
    (folder / "notes.txt").write_text("not an image")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / "grid_0.png")  # sample.py's
    run_cli(tmp_path, checkpoint, "--images", str(folder), "--blocks", "all")

    out = tmp_path / "run" / "features" / f"model_7_{short_digest(checkpoint)}_t11_photos"
    assert (out / "files.txt").read_text().splitlines() == ["cats/a.png", "cats/indoor/b.PNG", "dogs/grey.jpg",
                                                            "loose.png"]
    assert np.load(out / "labels.npy").tolist() == [0, 0, 1, -1]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"] == ["cats", "dogs"] and meta["blocks"] == ["in_1", "in_2", "mid", "out_1", "out_2",
                                                                                   "out_3", "out_4"]
    assert [np.load(out / f"out_{k}.npy").shape for k in range(1, 5)] == [(4, 64), (4, 64), (4, 32), (4, 32)]
    image, _ = export_features.ImageFiles(str(folder), 16)[2]  # the greyscale 40x24 file
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and torch.equal(image[0], image[1])


@pytest.mark.parametrize("extra, message", [
    (["--blocks", "out_9"], "--blocks out_9: this network has blocks in_1, in_2, mid, out_1, out_2, out_3, out_4"),
    (["--timestep", "5000"], "linear.timestep' must be in 0..1000 (diffusion.n_T), got 5000 (from --timestep 5000)"),
    (["--timestep", "-3"], "must be 0 or positive, got -3 (from --timestep -3)"),
    (["--out", str(REPO / "README.md")], "README.md is a file, not a folder; pass --out with a writable folder"),
    (["--images", "nowhere"], "--images nowhere: folder not found"),
    (["--batch_size", "0"], "--batch_size 0: must be at least 1"),
])
def test_errors_name_the_flag(tmp_path, tiny_run, capsys, extra, message):
    _, checkpoint = tiny_run
    with pytest.raises(SystemExit) as stopped:
        run_cli(tmp_path, checkpoint, *extra)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_empty_image_folder_is_a_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no image files"):
        export_features.ImageFiles(str(tmp_path / "empty"), 16)
