"""utils/epochs.py: the epoch loop's resume checks, its random state, its sums and its log."""
import pytest
import torch

from utils.checkpoint import save_checkpoint
from utils.epochs import EpochLoop, EpochTotals, every_rank_rng
from utils.errors import UserError
from utils.logging import read_jsonl

CPU = torch.device("cpu")
MISMATCH = "{path} was trained with --{key} {saved}, not {wanted}"


def test_resume_checks_settings_and_restores_the_random_state(tmp_path, capsys):
    path = tmp_path / "state.pth"
    loop = EpochLoop(5, CPU)
    assert loop.resume(path, {"lr": 0.1}, MISMATCH) is None  # nothing saved yet
    torch.manual_seed(3)
    save_checkpoint({"settings": {"lr": 0.1, "width": 10}, "epoch": 2, "rng": every_rank_rng()}, path)
    expected = torch.rand(4)
    torch.manual_seed(99)
    assert loop.resume(path, {"lr": 0.1, "width": 10}, MISMATCH)["epoch"] == 2
    assert torch.equal(torch.rand(4), expected)  # continues the saved generator
    assert f"resuming {path}: 2 of 5 epochs done" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"state.pth was trained with --width 10, not 8$"):
        loop.resume(path, {"lr": 0.1, "width": 8}, MISMATCH)
    with pytest.raises(UserError, match=r"was trained with --depth None, not 28$"):
        loop.resume(path, {"depth": 28}, MISMATCH, keys=["depth"])
    assert loop.resume(path, {"depth": 28}, MISMATCH, keys=["depth"], lenient=True) is not None  # older file


def test_totals_weight_each_batch_by_its_size():
    totals = EpochTotals(CPU)
    totals.add(torch.tensor(1.0), torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, 1]))  # 1 of 2 right
    totals.add(torch.tensor(4.0), torch.tensor([[0.0, 1.0]]), torch.tensor([1]))  # right
    loss, accuracy, images = totals.reduce()
    assert (loss, images) == (pytest.approx(2.0), 3) and accuracy == pytest.approx(200 / 3)


def test_log_writes_the_record_on_the_main_process_and_epochs_count_from_start(tmp_path, capsys):
    loop = EpochLoop(3, CPU, log_path=tmp_path / "log.jsonl")
    for epoch in loop.epochs(1):
        loop.log(epoch + 1, f"epoch {epoch}", record={"epoch": epoch})
        assert loop.seconds >= 0
    loop.close()
    assert read_jsonl(tmp_path / "log.jsonl") == [{"epoch": 1}, {"epoch": 2}]
    assert capsys.readouterr().out.splitlines() == ["epoch 1", "epoch 2"]
