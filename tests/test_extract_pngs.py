"""utils.images (atomic PNGs, grids, dataset export) and the extract_cifar10_pngs notebook, on synthetic data."""
import io
import os
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import save_image

from utils import images
from utils.data import SyntheticImages
from utils.errors import UserError

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "extract_cifar10_pngs.ipynb"


def read_pixels(path):
    return np.array(Image.open(path))


def test_png_and_grid_bytes_equal_torchvision_save_image(tmp_path):
    generator = torch.Generator().manual_seed(0)
    batch = torch.rand(23, 3, 6, 5, generator=generator) * 1.2 - 0.1  # values outside [0, 1] are clamped
    grey = torch.rand(5, 1, 4, 4, generator=generator)
    cases = [(batch[0], {}), (grey[0], {}), (batch, {"nrow": 20}), (grey, {"nrow": 2}), (batch[:1], {"nrow": 20})]
    for number, (tensor, grid_args) in enumerate(cases):
        expected, ours = tmp_path / f"tv_{number}.png", tmp_path / f"ours_{number}.png"
        save_image(tensor, expected, **grid_args)
        if grid_args:
            images.save_grid(tensor, ours, grid_args["nrow"])
        else:
            images.save_png(tensor, ours)
        assert ours.read_bytes() == expected.read_bytes(), number
    quantised = images.to_uint8(batch)
    images.save_grid(quantised, tmp_path / "from_uint8.png", 20)  # uint8 input gives the same file
    assert (tmp_path / "from_uint8.png").read_bytes() == (tmp_path / "tv_2.png").read_bytes()
    assert read_pixels(tmp_path / "tv_2.png").shape == (2 + 2 * 8, 2 + 20 * 7, 3)  # 2 rows of 20, padding 2


def test_save_png_never_leaves_a_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "0.png"
    images.save_png(torch.zeros(3, 4, 4, dtype=torch.uint8), target)
    before = target.read_bytes()

    def killed_save(self, fp, format=None, **params):
        Path(fp).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", killed_save)
    with pytest.raises(KeyboardInterrupt):
        images.save_png(torch.ones(3, 4, 4), target)
    with pytest.raises(KeyboardInterrupt):
        images.save_png(torch.ones(3, 4, 4), tmp_path / "1.png")
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["0.png"]


def test_export_writes_exact_pixels_and_resumes(tmp_path):
    dataset = SyntheticImages(n=12, image_size=8, seed=3)  # yields ([0, 1] float image, label)
    stored = dataset.images  # (N, 3, H, W) uint8, what the floats were made from
    out = tmp_path / "pngs"
    assert images.export_dataset_pngs(dataset, out, progress=False) == 12
    assert sorted(os.listdir(out), key=lambda name: int(name.split(".")[0])) == [f"{i}.png" for i in range(12)]
    for i in range(12):
        assert np.array_equal(read_pixels(out / f"{i}.png"), stored[i].permute(1, 2, 0).numpy())
    kept = (out / "0.png").stat().st_mtime_ns
    (out / "5.png").unlink()
    (out / ".7.png.123.tmp").write_bytes(b"left by a killed run")
    assert images.export_dataset_pngs(dataset, out, progress=False) == 1
    assert (out / "0.png").stat().st_mtime_ns == kept
    assert np.array_equal(read_pixels(out / "5.png"), stored[5].permute(1, 2, 0).numpy())
    assert len(os.listdir(out)) == 12  # the temporary file is gone


@pytest.fixture
def small_synthetic(monkeypatch):
    """build_dataset("synthetic") with 20 images of 8x8 instead of 2,000 of 32x32."""
    import utils.data
    monkeypatch.setattr(utils.data, "SyntheticImages",
                        lambda image_size, train, transform: SyntheticImages(n=20, image_size=8, transform=transform))
    return SyntheticImages(n=20, image_size=8).images  # (20, 3, 8, 8) uint8


def test_cli_exports_a_training_split(tmp_path, capsys, small_synthetic):
    out = tmp_path / "synthetic-pngs"
    args = images.build_parser().parse_args(["export-cifar10", "--dataset", "synthetic", "--data_root",
                                             str(tmp_path), "--out", str(out), "--limit", "6"])
    assert images.main(args) == 6
    assert "6 PNGs written" in capsys.readouterr().out
    expected = small_synthetic[:6]
    assert np.array_equal(np.stack([read_pixels(out / f"{i}.png") for i in range(6)]),
                          expected.permute(0, 2, 3, 1).numpy())
    with pytest.raises(SystemExit) as stop:
        images.main(images.build_parser().parse_args(["export-cifar10", "--dataset", "mnist", "--out", str(out)]))
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_notebook_is_valid_and_runs_the_export(tmp_path, monkeypatch, small_synthetic):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    parameters = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
    assert len(parameters) == 1 and 'DATASET = "cifar10"' in parameters[0].source
    assert 'OUT_DIR = "data/cifar10-pngs"' in parameters[0].source
    assert all(cell.outputs == [] for cell in code)  # committed without outputs
    # Run every other cell as Jupyter would, with the synthetic dataset in place of CIFAR-10.
    out = tmp_path / "pngs"
    namespace = {"DATASET": "synthetic", "DATA_ROOT": str(tmp_path), "OUT_DIR": str(out)}
    printed = io.StringIO()
    monkeypatch.setattr("sys.stdout", printed)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    for cell in code:
        if cell is not parameters[0]:
            exec(compile(cell.source, str(NOTEBOOK), "exec"), namespace)
    assert namespace["written"] == 20 and namespace["total"] == 20
    assert sorted(os.listdir(out)) == sorted(f"{i}.png" for i in range(20))
    assert np.array_equal(read_pixels(out / "19.png"), small_synthetic[19].permute(1, 2, 0).numpy())
    assert "20 PNGs in" in printed.getvalue()


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="--limit 0"):
        images.export_training_split("synthetic", str(tmp_path), str(tmp_path / "out"), limit=0)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="pass --out with a writable folder"):
        images.export_dataset_pngs([torch.zeros(3, 2, 2)], blocker / "pngs", progress=False)
