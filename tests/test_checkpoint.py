"""Checkpoint files: round trip, atomic writes, clear errors, RNG state, and locating checkpoints."""
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.checkpoint import (capture_rng_state, checkpoint_path,
                              latest_checkpoint, list_checkpoints, load_checkpoint,
                              resolve_checkpoint, restore_rng_state, save_checkpoint,
                              strip_module_prefix)
from utils.errors import UserError, WriteFailed
from tests.helpers import write_config
from tests.launch import REPO

# train.py's main on tests.helpers' small synthetic images, in a subprocess.
TRAIN_PROBE = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
import torch
import train
from tests.helpers import small_synthetic

torch.set_num_threads(1)
train.build_dataset = small_synthetic
train.main(train.parse_args())
"""

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


# What torch.save (2.x) raises when the disk fills up under its zip writer; its OSError is only the context.
TORCH_DISK_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 4175360 vs 4175248"


def test_torch_saves_full_disk_error_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch):
    latest = tmp_path / "ckpts" / "latest.pth"
    save_checkpoint({"step": 1}, latest)

    def full_disk_save(obj, file):
        file.write(b"PK\x03\x04 the first part of a zip archive")
        raise RuntimeError(TORCH_DISK_FULL)

    monkeypatch.setattr(torch, "save", full_disk_save)
    with pytest.raises(WriteFailed) as failure:
        save_checkpoint({"step": 2}, latest)
    message = str(failure.value)
    assert message.startswith(f"cannot write checkpoint {latest} (torch.save could not write the file: "
                              f"{TORCH_DISK_FULL}; ")
    assert " free on its disk); free disk space or set save_dir to a disk with room" in message
    assert "\n" not in message and failure.value.exit_code == 1  # a crash's code: no scheduler reruns it
    assert load_checkpoint(latest) == {"step": 1}
    assert os.listdir(latest.parent) == ["latest.pth"]


def test_other_runtime_errors_of_torch_save_are_not_disk_errors(tmp_path, monkeypatch):
    def failing_save(obj, file):
        raise RuntimeError("cannot pickle 'generator' object")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_checkpoint({"step": 2}, tmp_path / "latest.pth")


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs (root only, as in CI; skipped where mounting is not permitted)."""
    folder = tmp_path / "small_disk"
    folder.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)],
                                 capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_real_full_disk_keeps_latest_pth_loadable(small_disk):
    latest = small_disk / "ckpts" / "latest.pth"
    save_checkpoint({"weights": torch.zeros(1000)}, latest)
    with pytest.raises(WriteFailed, match=f"cannot write checkpoint {latest} \\(No space left on device; "
                                          f"1[0-9].[0-9] MiB free on its disk\\)"):
        save_checkpoint({"weights": torch.zeros(5_000_000)}, latest)  # 20 MB
    assert torch.equal(load_checkpoint(latest)["weights"], torch.zeros(1000))
    assert os.listdir(latest.parent) == ["latest.pth"]


@pytest.mark.cpu_only  # a CPU training subprocess
def test_training_onto_a_full_disk_ends_with_one_line_and_exit_code_1(small_disk, tmp_path):
    """train.py whose epoch-1 checkpoint does not fit beside epoch 0's (11 MB each on 16 MiB): one line
    naming the file, the free space and the fix, exit code 1, and model_0.pth still loads."""
    probe = tmp_path / "probe.py"
    probe.write_text(TRAIN_PROBE)
    config = write_config(tmp_path, n_epoch=2, ckpt_interval=1)
    save_dir = small_disk / "run"
    result = subprocess.run([sys.executable, str(probe), "--config", str(config), "--device", "cpu",
                             "--set", f"save_dir={save_dir}"], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    failed = save_dir / "ckpts" / "model_1.pth"
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line, no traceback
    assert result.stderr.startswith(f"error: cannot write checkpoint {failed} (No space left on device; ")
    assert "free on its disk); free disk space or set save_dir to a disk with room" in result.stderr
    assert load_checkpoint(save_dir / "ckpts" / "model_0.pth")["epoch"] == 0
    assert list(list_checkpoints(save_dir)) == [0]
    assert not [name for name in os.listdir(save_dir / "ckpts") if name.endswith(".tmp")]


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
