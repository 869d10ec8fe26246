"""Checkpoint files: round trip, atomic writes, clear errors, RNG state, and locating checkpoints."""
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.checkpoint import (capture_rng_state, checkpoint_path,
                              latest_checkpoint, list_checkpoints, load_checkpoint,
                              resolve_checkpoint, restore_rng_state, save_checkpoint,
                              strip_module_prefix)
from utils.errors import UserError

GOLDEN = Path(__file__).parent / "golden"


def make_checkpoint():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return {"MODEL": model.state_dict(), "opt": optimizer.state_dict(), "scaler": None,
            "epoch": 7, "step": 70, "rng": capture_rng_state(), "config": {"lrate": 1e-4}}


def test_round_trip_loads_with_weights_only(tmp_path):
    checkpoint = make_checkpoint()
    path = tmp_path / "run" / "ckpts" / "model_7.pth"  # parent folders are created
    save_checkpoint(checkpoint, path)
    assert os.listdir(path.parent) == ["model_7.pth"]
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 7 and loaded["step"] == 70 and loaded["scaler"] is None
    assert loaded["config"] == {"lrate": 1e-4}
    for key, value in checkpoint["MODEL"].items():
        assert torch.equal(loaded["MODEL"][key], value)
    assert torch.equal(loaded["opt"]["state"][0]["exp_avg"], checkpoint["opt"]["state"][0]["exp_avg"])
    assert torch.equal(loaded["rng"]["torch"], checkpoint["rng"]["torch"])


def test_crash_while_writing_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "model_1.pth"
    save_checkpoint({"epoch": 1}, path)
    before = path.read_bytes()

    def crashing_save(obj, file):
        file.write(b"PK\x03\x04 half of a zip archive")
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(RuntimeError, match="killed while writing"):
        save_checkpoint({"epoch": 2}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model_1.pth"]  # no temporary file left
    assert load_checkpoint(path) == {"epoch": 1}


def test_disk_full_while_writing_is_a_user_error(tmp_path, monkeypatch):
    def full_disk_save(obj, file):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk_save)
    with pytest.raises(UserError, match="cannot write checkpoint .*model_3.pth \\(No space left"):
        save_checkpoint({"epoch": 3}, tmp_path / "model_3.pth")
    assert os.listdir(tmp_path) == []


def test_unwritable_folder_is_a_user_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("a regular file where a folder should be")
    with pytest.raises(UserError, match=f"cannot create the checkpoint folder {blocker}/ckpts"):
        save_checkpoint({"epoch": 0}, blocker / "ckpts" / "model_0.pth")


def test_bad_files_are_user_errors(tmp_path):
    missing = tmp_path / "model_5.pth"
    with pytest.raises(UserError, match=f"checkpoint {missing} not found"):
        load_checkpoint(missing)

    save_checkpoint({"MODEL": {"w": torch.ones(2)}}, tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=f"{truncated} is not a readable PyTorch checkpoint.*truncated"):
        load_checkpoint(truncated)

    text = tmp_path / "README.md"  # not damaged, just not a checkpoint: no advice to delete it
    text.write_text("# hello\n")
    with pytest.raises(UserError) as error:
        load_checkpoint(text)
    assert str(error.value) == (f"{text} is not a PyTorch checkpoint (torch.save writes a zip or pickle file); "
                                f"pass a model_{{epoch}}.pth written by train.py")

    listing = tmp_path / "list.pth"
    torch.save([1, 2], listing)
    with pytest.raises(UserError, match=f"{listing} holds a list, not a checkpoint dict"):
        load_checkpoint(listing)

    pickled = tmp_path / "object.pth"
    torch.save({"rng": np.random.get_state()}, pickled)  # an ndarray inside: not weights-only
    with pytest.raises(UserError, match=f"checkpoint {pickled} holds a Python object \\(numpy"):
        load_checkpoint(pickled)


def draws():
    return (torch.rand(3).tolist(), torch.randn(2).tolist(), np.random.rand(3).tolist(),
            np.random.randn(1).tolist(), random.random(), random.gauss(0, 1))


def test_rng_state_round_trip_through_a_file(tmp_path):
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    np.random.randn()  # leaves a cached Gaussian in numpy's state
    random.gauss(0, 1)  # and in Python's
    save_checkpoint({"rng": capture_rng_state()}, tmp_path / "rng.pth")
    expected = draws()
    assert draws() != expected  # the generators moved on

    restore_rng_state(load_checkpoint(tmp_path / "rng.pth")["rng"])
    assert draws() == expected


def test_checkpoint_names_listing_and_latest(tmp_path):
    assert checkpoint_path("out", 99) == os.path.join("out", "ckpts", "model_99.pth")
    assert list_checkpoints(tmp_path) == {} and latest_checkpoint(tmp_path) is None
    for epoch in (199, 9, 1999):
        save_checkpoint({"epoch": epoch}, checkpoint_path(tmp_path, epoch))
    (tmp_path / "ckpts" / "model_5.pth.123.tmp").write_text("leftover")
    (tmp_path / "ckpts" / "notes.txt").write_text("ignored")
    checkpoints = list_checkpoints(tmp_path)
    assert list(checkpoints) == [9, 199, 1999]
    assert checkpoints[199] == checkpoint_path(tmp_path, 199)
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 1999)


def test_resolve_checkpoint_and_its_messages(tmp_path):
    folder = tmp_path / "ckpts"
    with pytest.raises(UserError, match=f"no checkpoints in {folder}; train first"):
        resolve_checkpoint(tmp_path, -1, 2000)
    for epoch in (99, 199):
        save_checkpoint({"epoch": epoch}, checkpoint_path(tmp_path, epoch))

    assert resolve_checkpoint(tmp_path, 99, 2000) == checkpoint_path(tmp_path, 99)
    assert resolve_checkpoint(tmp_path, -1, 200) == checkpoint_path(tmp_path, 199)
    assert resolve_checkpoint(tmp_path, -1) == checkpoint_path(tmp_path, 199)
    with pytest.raises(UserError) as error:
        resolve_checkpoint(tmp_path, 150, 2000)
    assert str(error.value) == (f"no checkpoint for epoch 150 in {folder}; saved epochs: 99, 199; "
                                f"pass --epoch with one of them")
    with pytest.raises(UserError, match="epoch -1 means the final epoch 1999 \\(n_epoch 2000\\).*"
                                        "saved epochs: 99, 199"):
        resolve_checkpoint(tmp_path, -1, 2000)
    with pytest.raises(UserError, match="epoch -5 is not valid"):
        resolve_checkpoint(tmp_path, -5, 2000)


def test_original_checkpoint_loads_and_loses_ddp_prefix():
    checkpoint = load_checkpoint(GOLDEN / "original_ckpt_tiny_DDPM.pth")
    assert set(checkpoint) == {"MODEL", "EMA", "opt"}
    model = strip_module_prefix(checkpoint["MODEL"])
    assert len(model) == len(checkpoint["MODEL"])
    assert all(key.startswith("nn_model.") for key in model)
    for key, value in checkpoint["MODEL"].items():
        assert model[key[len("module."):]] is value


def test_strip_module_prefix_only_touches_the_leading_prefix():
    weights = torch.ones(1)
    stripped = strip_module_prefix({"module.a.module.b": weights, "c": weights, "xmodule.d": weights})
    assert list(stripped) == ["a.module.b", "c", "xmodule.d"]
