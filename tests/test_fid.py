"""fid.py: pytorch-fid's numbers with a small random network in place of Inception, caches, closed forms, errors."""
import os
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fid
from tests.helpers import FID_DIMS as DIMS
from tests.helpers import RandomFeatures
from utils.data import SyntheticImages
from utils.errors import UserError
from utils.images import export_dataset_pngs


class FakeInceptionV3(nn.Module):
    """pytorch-fid's InceptionV3 interface (a list with one (B, D, 1, 1) map) around RandomFeatures."""

    BLOCK_INDEX_BY_DIM = {DIMS: 0}

    def __init__(self, output_blocks=None):
        super().__init__()
        self.features = RandomFeatures()

    def forward(self, images):
        return [self.features(images)[:, :, None, None]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two PNG folders: 'ref' and 'gen' (different synthetic images), 24 and 20 images of 12x12."""
    root = tmp_path_factory.mktemp("fid")
    export_dataset_pngs(SyntheticImages(n=24, image_size=12, seed=1), root / "ref", progress=False)
    export_dataset_pngs(SyntheticImages(n=20, image_size=12, seed=2), root / "gen", progress=False)
    return root


def run_fid(ref, gen, extractor=False, **options):
    """compute_fid with a fresh RandomFeatures (or ``extractor``; None builds pytorch-fid's Inception)."""
    options.setdefault("num_workers", 0)
    options.setdefault("progress", False)
    return fid.compute_fid(str(ref), gen if isinstance(gen, list) else str(gen),
                           feature_extractor=RandomFeatures() if extractor is False else extractor, **options)


def test_value_equals_pytorch_fid_on_the_same_folders(folders, tmp_path, monkeypatch, capsys):
    from pytorch_fid import fid_score

    monkeypatch.setattr(fid_score, "InceptionV3", FakeInceptionV3)
    expected = fid_score.calculate_fid_given_paths([str(folders / "ref"), str(folders / "gen")], batch_size=7,
                                                   device="cpu", dims=DIMS, num_workers=0)
    value = run_fid(folders / "ref", folders / "gen", batch_size=7, ref_cache=str(tmp_path / "ref.npz"))
    assert value == expected and value > 0.01
    # the statistics themselves are pytorch-fid's, to the last bit
    files = fid.list_images(folders / "gen")
    theirs = fid_score.calculate_activation_statistics(files, FakeInceptionV3(), batch_size=7, dims=DIMS,
                                                       device="cpu", num_workers=0)
    ours = fid.files_statistics(files, RandomFeatures(), "cpu", batch_size=7, num_workers=0, progress=False)
    assert np.array_equal(ours[0], theirs[0]) and np.array_equal(ours[1], theirs[1])
    # the cache is a pytorch-fid statistics file
    assert fid_score.calculate_fid_given_paths([str(tmp_path / "ref.npz"), str(folders / "gen")], batch_size=7,
                                               device="cpu", dims=DIMS, num_workers=0) == pytest.approx(value)


def test_diagonal_closed_form(tmp_path):
    generator = np.random.default_rng(0)
    mu1, mu2 = generator.normal(size=5), generator.normal(size=5)
    s1, s2 = generator.uniform(0.1, 2.0, size=5), generator.uniform(0.1, 2.0, size=5)
    np.savez(tmp_path / "a.npz", mu=mu1, sigma=np.diag(s1))
    np.savez(tmp_path / "b.npz", mu=mu2, sigma=np.diag(s2))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    value = fid.compute_fid(str(tmp_path / "a.npz"), str(tmp_path / "b.npz"))  # no network needed
    assert value == pytest.approx(expected, rel=1e-10)
    assert fid.compute_fid(str(tmp_path / "a.npz"), str(tmp_path / "a.npz")) == pytest.approx(0, abs=1e-10)


def test_identical_folders_give_zero(folders, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(folders / "ref", copy)
    assert abs(run_fid(folders / "ref", copy, ref_cache="")) < 1e-6
    assert not os.path.exists(str(folders / "ref") + ".fid_stats.npz")  # '' turns caching off


def test_reference_statistics_are_computed_once(folders, tmp_path, capsys):
    ref = tmp_path / "ref"
    shutil.copytree(folders / "ref", ref)
    extractor = RandomFeatures()
    first = run_fid(ref, folders / "gen", extractor)
    assert extractor.images_seen == 24 + 20
    cache = Path(str(ref) + ".fid_stats.npz")  # the default place, next to the folder
    with np.load(cache) as stats:
        assert str(stats["source"]) == str(ref.resolve()) and int(stats["n_images"]) == 24
        assert str(stats["features"]) == "random test network"
    assert run_fid(ref, folders / "gen", extractor) == first
    assert extractor.images_seen == 24 + 20 + 20  # only the generated images again
    assert "stale" not in capsys.readouterr().out
    shutil.copy(ref / "0.png", ref / "24.png")  # the reference changed: the cache no longer fits
    value = run_fid(ref, folders / "gen", extractor)
    assert extractor.images_seen == 24 + 20 + 20 + 25 + 20  # recomputed
    assert "is stale: the image count changed (24, now 25); the reference images changed; recomputing" \
        in capsys.readouterr().out
    assert value == run_fid(ref, folders / "gen", ref_cache="")


def test_same_count_of_replaced_images_recomputes(folders, tmp_path, capsys):
    ref = tmp_path / "ref"
    shutil.copytree(folders / "ref", ref)
    first = run_fid(ref, folders / "gen")
    shutil.copy(folders / "gen" / "3.png", ref / "3.png")  # another image under the same name: still 24 files
    extractor = RandomFeatures()
    value = run_fid(ref, folders / "gen", extractor)
    out = capsys.readouterr().out
    assert f"FID cache {ref}.fid_stats.npz is stale: the reference images changed; recomputing" in out
    assert extractor.images_seen == 24 + 20 and value != first
    assert value == run_fid(ref, folders / "gen", ref_cache="")  # what a fresh computation gives
    with np.load(str(ref) + ".fid_stats.npz") as stats:  # the cache now holds the new images' fingerprint
        assert str(stats["files"]) == fid.files_fingerprint(fid.list_images(ref))


def test_changed_inception_weights_recompute(folders, tmp_path, monkeypatch, capsys):
    weights_folder = tmp_path / "hub"
    weights_folder.mkdir()
    weights = weights_folder / fid.INCEPTION_WEIGHTS
    weights.write_bytes(b"first weights")
    monkeypatch.setattr(fid, "inception_weights_folder", lambda: str(weights_folder))
    extractor = RandomFeatures()
    extractor.fid_tag = fid.InceptionPool3.fid_tag
    monkeypatch.setattr(fid, "load_inception", lambda device: extractor)  # built on first use, as Inception
    cache = str(tmp_path / "ref.npz")
    run_fid(folders / "ref", folders / "gen", None, ref_cache=cache)
    run_fid(folders / "ref", folders / "gen", None, ref_cache=cache)
    assert extractor.images_seen == 24 + 20 + 20  # the cache served the second run
    weights.write_bytes(b"other weights, other size")
    run_fid(folders / "ref", folders / "gen", None, ref_cache=cache)
    assert extractor.images_seen == 24 + 20 + 20 + 24 + 20
    out = capsys.readouterr().out
    assert f"FID cache {cache} is stale: the Inception weights changed; recomputing" in out
    with np.load(cache) as stats:
        assert str(stats["weights"]) == f"{fid.INCEPTION_WEIGHTS}:25:{os.stat(weights).st_mtime_ns}"


def test_generated_path_is_checked_before_the_reference_statistics(folders, tmp_path):
    extractor = RandomFeatures()
    with pytest.raises(UserError, match=r"generated images .*/gen_typo: not a folder or an .npz; pass the pngs/"):
        run_fid(folders / "ref", tmp_path / "gen_typo", extractor, ref_cache=str(tmp_path / "ref.npz"))
    assert extractor.images_seen == 0 and not (tmp_path / "ref.npz").exists()


def test_dataset_reference_equals_its_png_folder(folders, tmp_path, monkeypatch):
    import utils.data
    dataset = SyntheticImages(n=24, image_size=12, seed=1)
    monkeypatch.setattr(utils.data, "SyntheticImages",
                        lambda image_size, train, transform: SyntheticImages(n=24, image_size=12, seed=1,
                                                                             transform=transform))
    options = {"batch_size": 5, "num_workers": 0, "progress": False}
    mu, sigma, count = fid.dataset_statistics("synthetic", str(tmp_path), RandomFeatures(), "cpu", **options)
    # PNGs are lossless: the exported files, read in index order, give the same statistics bit for bit
    files = [folders / "ref" / f"{i}.png" for i in range(len(dataset))]
    assert count == 24
    assert all(np.array_equal(a, b) for a, b in zip((mu, sigma), fid.files_statistics(files, RandomFeatures(), "cpu",
                                                                                       **options)))
    cache = tmp_path / "synthetic.npz"
    from_dataset = run_fid("dataset:synthetic", folders / "gen", data_root=str(tmp_path), ref_cache=str(cache))
    from_folder = run_fid(folders / "ref", folders / "gen", ref_cache="")  # sorted names: 0, 1, 10, ...
    assert from_dataset == pytest.approx(from_folder, rel=1e-12)
    with np.load(cache) as stats:
        assert str(stats["source"]) == f"dataset:synthetic@{tmp_path}" and int(stats["n_images"]) == 24
    assert fid.default_cache("dataset:cifar10", "data") == os.path.join("data", "fid_stats_cifar10_train.npz")


def test_generated_file_list_and_cli(folders, tmp_path, capsys):
    files = sorted(Path(folders / "gen").glob("*.png"))
    assert run_fid(folders / "ref", files, ref_cache="") == run_fid(folders / "ref", folders / "gen", ref_cache="")
    np.savez(tmp_path / "a.npz", mu=np.zeros(3), sigma=np.eye(3))
    np.savez(tmp_path / "b.npz", mu=np.ones(3), sigma=np.eye(3))
    assert fid.main(fid.build_parser().parse_args([str(tmp_path / "a.npz"), str(tmp_path / "b.npz")])) == \
        pytest.approx(3.0)
    assert capsys.readouterr().out.startswith("FID: 3.0")


def test_offline_without_inception_weights_is_one_line(tmp_path, monkeypatch, capsys):
    from pytorch_fid import inception

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(inception, "load_state_dict_from_url", offline)
    folder = os.path.join(str(tmp_path / "torch"), "hub", "checkpoints")
    with pytest.raises(UserError) as error:
        fid.load_inception("cpu")
    message = str(error.value)
    assert "\n" not in message
    assert f"{fid.INCEPTION_WEIGHTS} are not in {folder}" in message
    assert "pt_inception-2015-12-05-6726825d.pth" in message and "place it in that folder" in message
    with pytest.raises(SystemExit):  # the script prints that line and exits with code 2
        fid.main(fid.build_parser().parse_args([str(tmp_path), str(tmp_path), "--device", "cpu"]))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pt_inception" in err


def test_bad_paths_are_user_errors(folders, tmp_path):
    with pytest.raises(UserError, match="not a folder, an .npz or dataset:NAME"):
        run_fid(tmp_path / "missing", folders / "gen")
    (tmp_path / "one").mkdir()
    shutil.copy(folders / "gen" / "0.png", tmp_path / "one" / "0.png")
    with pytest.raises(UserError, match="1 image found; FID needs at least 2"):
        run_fid(folders / "ref", tmp_path / "one", ref_cache="")
    with pytest.raises(UserError, match="statistics file not found"):
        run_fid(tmp_path / "none.npz", folders / "gen")
    np.savez(tmp_path / "small.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(UserError, match="have 3 dimensions but the generated ones 16"):
        run_fid(tmp_path / "small.npz", folders / "gen")


def test_progress_names_the_image_set_and_few_images_get_a_note(folders, capsys):
    run_fid(folders / "ref", folders / "gen", ref_cache="", progress=True)
    out = capsys.readouterr().out
    assert f"FID features of {folders / 'ref'}: " in out and f"FID features of {folders / 'gen'}: " in out
    assert "note:" not in out  # 20 and 24 images for 16 features
    files = sorted(Path(folders / "gen").glob("*.png"))[:8]
    run_fid(folders / "ref", files, ref_cache="")
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"note: 8 images for {DIMS} features: their covariance is singular and the FID biased upwards; compare "
        f"it only with FIDs of as many images (the papers use 50,000)")
