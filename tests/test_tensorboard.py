"""--tensorboard: the event files hold log.jsonl's numbers and the sample grids; a missing package is one line."""
import sys

import pytest

import train
from tests.helpers import parse, read_events, read_scalars, write_config
from utils.errors import UserError
from utils.logging import read_jsonl
from utils.tensorboard import open_board


def test_train_writes_the_log_and_the_sample_grids(tiny_setup, tmp_path, capsys):
    cfg, args = parse(write_config(tmp_path), tmp_path / "run", "--tensorboard", n_epoch=2, ckpt_interval=1)
    train.train(cfg, args)
    log = read_jsonl(tmp_path / "run" / "log.jsonl")
    folder = tmp_path / "run" / "tb" / "train"
    scalars = read_scalars(folder)
    for key in ("loss", "lr", "img_per_s", "peak_mem_gib"):
        assert scalars[f"train/{key}"] == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in log]
    images = read_events(folder).Images("samples_ema")
    assert [image.step for image in images] == [8, 16]  # one grid per checkpointed epoch
    assert (images[0].width, images[0].height) == (10 * 18 + 2, 2 * 18 + 2)  # 10 samples above 10 real images


def test_off_by_default_and_on_other_ranks(tmp_path, monkeypatch):
    assert not open_board(False, tmp_path / "tb").enabled
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    board = open_board(True, tmp_path / "tb")
    board.scalars({"loss": 1.0}, 0)
    assert not board.enabled and not (tmp_path / "tb").exists()


def test_missing_package_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with pytest.raises(UserError) as error:
        open_board(True, tmp_path / "tb")
    assert str(error.value) == ("--tensorboard needs the tensorboard package, which is not installed; "
                                "pip install tensorboard, or drop --tensorboard")


def test_missing_package_stops_train_before_any_work(tiny_setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    cfg, args = parse(write_config(tmp_path), tmp_path / "run", "--tensorboard")
    with pytest.raises(SystemExit) as exit_info:
        train.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install tensorboard" in err
    assert not (tmp_path / "run" / "ckpts").exists()


def test_restarting_a_finished_run_adds_no_event_file(tiny_setup, tmp_path, capsys):
    config = write_config(tmp_path)
    train.train(*parse(config, tmp_path / "run", "--tensorboard", "--resume", "auto", n_epoch=1))
    folder = tmp_path / "run" / "tb" / "train"
    written = sorted(folder.iterdir())
    assert len(written) == 1
    train.train(*parse(config, tmp_path / "run", "--tensorboard", "--resume", "auto", n_epoch=1))  # a requeue
    assert "the run is complete" in capsys.readouterr().out
    assert sorted(folder.iterdir()) == written


def test_a_board_that_logs_nothing_writes_no_event_file(tmp_path):
    """A rerun of a finished probe (or of a finished training) logs nothing: no empty event file."""
    board = open_board(True, tmp_path / "tb")
    assert board.enabled
    board.close()
    assert list((tmp_path / "tb").iterdir()) == []
    board = open_board(True, tmp_path / "tb")
    board.scalars({"loss": 1.0}, 0)
    board.close()
    assert len(list((tmp_path / "tb").iterdir())) == 1
