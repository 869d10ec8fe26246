"""JSONL logs and the PNG plots drawn from them."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from utils.errors import UserError
from utils.logging import JsonlLogger, plot_curves, plot_heatmap, plot_lines, read_jsonl


def test_jsonl_round_trip_and_append(tmp_path):
    path = tmp_path / "logs" / "stats.jsonl"
    with JsonlLogger(path) as logger:
        logger.log({"epoch": 0, "loss": torch.tensor(0.5)}, lr=np.float32(0.25))
        logger.log(epoch=1, loss=0.25, per_block=torch.tensor([1.0, 2.0]))
        assert len(path.read_text().splitlines()) == 2  # flushed before close
    with JsonlLogger(path) as logger:  # a resumed run appends
        logger.log(epoch=2, name="done")
    assert read_jsonl(path) == [
        {"epoch": 0, "loss": 0.5, "lr": 0.25},
        {"epoch": 1, "loss": 0.25, "per_block": [1.0, 2.0]},
        {"epoch": 2, "name": "done"},
    ]


def test_read_jsonl_skips_cut_off_last_line_but_not_damage_elsewhere(tmp_path):
    path = tmp_path / "stats.jsonl"
    path.write_text('{"epoch": 0}\n{"epoch": 1}\n{"epo')
    assert read_jsonl(path) == [{"epoch": 0}, {"epoch": 1}]
    path.write_text('{"epoch": 0}\nnot json\n{"epoch": 2}\n')
    with pytest.raises(UserError, match="stats.jsonl line 2 is not JSON"):
        read_jsonl(path)
    with pytest.raises(UserError, match="log .*missing.jsonl not found"):
        read_jsonl(tmp_path / "missing.jsonl")


def assert_png(path, min_size=(200, 150)):
    assert os.path.getsize(path) > 1000
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        # A drawn plot, not a blank canvas: many distinct colours.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 24)) > 20
    assert [name for name in os.listdir(os.path.dirname(path)) if name.endswith(".tmp")] == []


def test_plot_curves(tmp_path):
    records = [{"epoch": e, "loss": 1 / (e + 1), "lr": 1e-4} for e in range(10)]
    records.append({"epoch": 10, "fid": 30.0})  # a record without the plotted key
    plot_curves(records, "epoch", ["loss", "lr"], tmp_path / "plots" / "loss.png", title="t",
                logy=True)
    assert_png(tmp_path / "plots" / "loss.png")
    plot_curves(records, "epoch", "loss", tmp_path / "loss_only.png")
    assert_png(tmp_path / "loss_only.png")


def test_plot_heatmap_and_label_check(tmp_path):
    accuracy = [[80.1, 85.2, float("nan")], [88.8, 90.05, 70.0]]
    plot_heatmap(accuracy, ["t=1", "t=11"], ["out_1", "out_2", "out_3"], tmp_path / "grid.png",
                 "probe accuracy (%)", xlabel="block", ylabel="timestep")
    assert_png(tmp_path / "grid.png")
    with pytest.raises(ValueError, match="needs 2 row labels and 3 column labels, got 1 and 3"):
        plot_heatmap(accuracy, ["t=1"], ["a", "b", "c"], tmp_path / "bad.png", "x")
    assert not (tmp_path / "bad.png").exists()


def test_plot_lines(tmp_path):
    series = {"out_6": ([1, 11, 21], [90.0, 91.5, 88.0]), "out_7": ([1, 11, 21], [85.0, 87.0, 86.0])}
    plot_lines(series, tmp_path / "acc_vs_t.png", "timestep", "accuracy (%)", "accuracy vs noise")
    assert_png(tmp_path / "acc_vs_t.png")


def test_plot_into_unwritable_folder_is_a_user_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=f"cannot write the plot {blocker}/plot.png"):
        plot_lines({"a": ([0, 1], [0, 1])}, blocker / "plot.png", "x", "y", "t")
