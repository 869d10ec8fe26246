"""utils/progress.py and train.py's log for files: plain lines without carriage returns, a bar on a terminal."""
import itertools
import re

from tqdm import tqdm

import train
from model.training import start_epoch
from tests.helpers import DEVICE, parse, write_config
from utils import epochs, progress as progress_module
from utils.progress import PlainProgress, batches, format_duration, progress


def test_plain_lines_every_ten_percent_and_at_the_end(capsys):
    with progress(total=50, desc="features", unit="batch", interactive=False) as bar:
        for _ in range(50):
            bar.update()
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "\r" not in out and len(lines) == 10  # 10%, 20%, ... 90%, then the closing line
    assert lines[0].startswith("features: 5/50 batch (10%), ") and "left" in lines[0]
    assert lines[-1].startswith("features: 50/50 batch (100%), ") and "left" not in lines[-1]


def test_plain_lines_by_time_only_and_silent_when_disabled(capsys, monkeypatch):
    clock = itertools.count(0, 100)  # every reading is 100 s later
    monkeypatch.setattr(progress_module, "_now", lambda: next(clock))
    bar = PlainProgress(total=1000, desc="epoch 0/5", unit="step", every_percent=None, every_seconds=250,
                        final_line=False)
    bar.set_postfix(loss="0.1234")
    for _ in range(6):
        bar.update()
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("epoch 0/5: 3/1000 step (0%), 0.0 step/s, 0:05:00 elapsed")
    assert lines[0].endswith("[loss 0.1234]")
    for _ in batches(range(3), "by time"):  # a line per 5 minutes only, none at the end
        pass
    assert len(capsys.readouterr().out.splitlines()) == 1  # 3 readings, 300 s apart
    quiet = PlainProgress(total=3, disable=True)
    quiet.update(3)
    quiet.close()
    assert capsys.readouterr().out == ""


def test_a_terminal_gets_tqdm(monkeypatch):
    assert isinstance(progress(total=3, interactive=True, disable=True), tqdm)
    assert isinstance(progress(total=3, interactive=False), PlainProgress)
    monkeypatch.setattr(progress_module, "is_interactive", lambda stream=None: True)
    assert isinstance(progress(total=3, disable=True), tqdm)


def test_format_duration():
    assert format_duration(3725.4) == "1:02:05" and format_duration(None) == "?" and format_duration(59) == "0:00:59"


def test_train_log_in_a_file_has_one_line_per_epoch_checkpoints_and_a_summary(tiny_setup, tmp_path, capsys):
    cfg, args = parse(write_config(tmp_path), tmp_path / "run", n_epoch=3, ckpt_interval=2)
    train.train(cfg, args)
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err
    lines = captured.out.splitlines()
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(epochs) == 3
    pattern = (r"epoch 1/3  step 16  loss \d\.\d{4}  lr \d\.\d\de-0\d  \d+ img/s  peak \d+\.\d\d GiB  "
               r"\d+\.\d s  \d:\d\d:\d\d left")
    assert re.fullmatch(pattern, epochs[1]), epochs[1]
    assert epochs[2].endswith("0:00:00 left")
    checkpoints = [line for line in lines if line.startswith("checkpoint ")]
    assert [c.split()[1] for c in checkpoints] == [str(tmp_path / "run" / "ckpts" / f"model_{e}.pth") for e in (0, 2)]
    assert sum(line.startswith("sample grid ") for line in lines) == 2
    assert lines[-1].startswith("done: epochs 0..2 of 3, step 24, last loss ")


def test_a_log_file_reads_the_running_loss_only_for_a_line(tiny_setup, tmp_path, monkeypatch, capsys):
    """train.py in a log file: the running loss stays on the device until a line shows it, so steps
    between lines never wait for it (on a GPU, .item() drains the queue); a terminal's tqdm reads it."""
    reads = []

    class Counted:
        def __init__(self, function, spec=""):
            self.text = progress_module.LazyText(function, spec)

        def __str__(self):
            if self.text.text is None:
                reads.append(1)
            return str(self.text)

    def run_epoch(state, epoch):  # train.py's inner loop, without the clock
        meter = start_epoch(state, epoch)
        for images in state.data.batches(epoch):
            meter.update(train.train_step(state, images), images.shape[0])
        meter.finish(state.step)

    monkeypatch.setattr(epochs, "LazyText", Counted)
    monkeypatch.setattr(epochs, "PROGRESS_EVERY", 1)
    cfg, args = parse(write_config(tmp_path), tmp_path / "run")
    state = train.build_training(cfg, args, DEVICE)
    run_epoch(state, 0)  # 8 steps, no line: nothing read
    assert reads == []
    monkeypatch.setattr(epochs, "progress", lambda **options: progress(interactive=False, every_seconds=0, **options))
    run_epoch(state, 1)  # a line after every step (the first before any loss), each loss read then
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 1/")]
    assert len(reads) == 7 and all(re.search(r"\[loss \d\.\d{4}, img_s \d+\]$", line) for line in lines[1:8])
    reads.clear()
    monkeypatch.setattr(epochs, "progress", lambda **options: progress(interactive=True, **options))
    run_epoch(state, 2)
    assert len(reads) == 8  # tqdm turns the value into text at once
