"""Long runs on shared clusters: kill -9 at random moments and SIGTERM mid-epoch, each followed by the
same command with --resume auto, end bitwise equal to a run that was never interrupted; a second
signal exits at once; latest.pth is invisible to the evaluation scripts; the probe stops on a signal."""
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import linear
import train
from tests.launch import REPO
from tests.helpers import CPU, assert_same_tensors, make_checkpoint, make_config, run, small_sets, write_config
from utils.checkpoint import (LATEST_NAME, checkpoint_path, latest_path, list_checkpoints, load_checkpoint,
                              remove_stale_temporaries, resolve_checkpoint, resume_checkpoint, save_checkpoint)
from utils.logging import read_jsonl
from utils.preemption import EXIT_REQUEUE, StopSignals

N_EPOCH = 3  # 8 steps of 16 images per epoch (test_train's 128 synthetic images)

# train.py's main on test_train's 128 synthetic images.
PROBE = textwrap.dedent(f"""
    import sys
    sys.path.insert(0, {str(REPO)!r})
    import torch
    import train
    from tests.helpers import small_synthetic

    torch.set_num_threads(1)
    train.build_dataset = small_synthetic
    train.main(train.parse_args())
""")


@pytest.fixture(scope="module")
def straight(tiny_setup, tmp_path_factory):
    """N_EPOCH epochs in one go, in this process (one thread, as the subprocesses)."""
    folder = tmp_path_factory.mktemp("straight")
    run(write_config(folder, n_epoch=N_EPOCH), folder / "run")
    return folder / "run"


def command(tmp_path, *flags):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    config = write_config(tmp_path, n_epoch=N_EPOCH)
    return [sys.executable, str(probe), "--config", str(config), "--device", "cpu", "--set",
            f"save_dir={tmp_path / 'run'}", "--resume", "auto", *flags]


def environment(**extra):
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def assert_same_end(run_dir, straight_dir):
    final = f"model_{N_EPOCH - 1}.pth"
    expected, got = load_checkpoint(straight_dir / "ckpts" / final), load_checkpoint(run_dir / "ckpts" / final)
    assert_same_tensors(expected["EMA"], got["EMA"])
    assert_same_tensors(expected["MODEL"], got["MODEL"])
    assert expected["step"] == got["step"] == N_EPOCH * 8
    # The epochs cut by the interruptions are logged whole, with the loss of the straight run.
    logged = [(r["epoch"], r["steps"], r["loss"]) for r in read_jsonl(run_dir / "log.jsonl")]
    assert logged == [(r["epoch"], r["steps"], r["loss"]) for r in read_jsonl(straight_dir / "log.jsonl")]


def saved_step(path):
    """The step of the checkpoint at ``path`` (replaced atomically, so always whole), -1 without one."""
    return load_checkpoint(path)["step"] if os.path.exists(path) else -1


@pytest.mark.cpu_only  # CPU subprocesses held against the straight run bitwise
def test_kill_9_three_times_then_resume_auto_is_exact(straight, tmp_path):
    """Three attempts are killed, each once its latest.pth has reached a random (seeded) step in the
    middle of another epoch, and after a random fraction of a step more; two loader workers, whose
    batches after a resume must be the uninterrupted run's."""
    moments = random.Random(14)
    targets = [moments.randint(1, 5), moments.randint(9, 13), moments.randint(17, 19)]  # of 8 steps per epoch
    argv = command(tmp_path, "--ckpt_every_min", "0.0005", "--num_workers", "2")  # about every step
    latest = latest_path(tmp_path / "run")
    outputs = []
    for attempt, target in enumerate(targets):
        with open(tmp_path / f"attempt{attempt}.out", "w+") as out:
            process = subprocess.Popen(argv, cwd=REPO, env=environment(), stdout=out, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 120
            while saved_step(latest) < target:
                assert process.poll() is None and time.monotonic() < deadline, f"attempt {attempt} did not reach step {target}"
                time.sleep(0.01)
            time.sleep(moments.uniform(0, 0.03))
            process.kill()
            assert process.wait() == -signal.SIGKILL, "the run ended before it was killed"
            out.seek(0)
            outputs.append(out.read())
    finished = subprocess.run(argv, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-2000:]
    resumes = [line for text in outputs[1:] + [finished.stdout] for line in text.splitlines()
               if line.startswith("resuming from")]
    assert len(resumes) == 3
    # On a fast machine a kill may still land after an epoch's end, where model_{epoch}.pth is the newest.
    assert any(f"{LATEST_NAME}: epoch" in line and ", batch " in line for line in resumes), resumes
    assert_same_end(tmp_path / "run", straight)
    assert not [name for name in os.listdir(tmp_path / "run" / "ckpts") if name.endswith(".tmp")]


@pytest.mark.cpu_only  # CPU subprocesses held against the straight run bitwise
def test_sigterm_mid_epoch_saves_exits_75_and_resumes_exactly(straight, tmp_path, monkeypatch, capsys):
    """train.py's main in this process, which sends itself SIGTERM during step 12 (epoch 1, batch 4).
    Epoch 1's steps take 0.5 s each, before and after the resume: its log line and record count both
    parts, and the time left is estimated from the half epoch trained since the resume."""
    config = write_config(tmp_path, n_epoch=N_EPOCH)
    argv = ["--config", str(config), "--device", "cpu", "--set", f"save_dir={tmp_path / 'run'}", "--resume", "auto",
            "--ckpt_every_min", "0"]  # latest.pth only on the signal
    step = train.train_step

    def slow_step(state, images):
        if 8 <= state.step < 16:  # epoch 1
            time.sleep(0.5)
        return step(state, images)

    def signalled_step(state, images):
        if state.step == 11:
            os.kill(os.getpid(), signal.SIGTERM)
        return slow_step(state, images)

    monkeypatch.setattr(train, "train_step", signalled_step)
    with pytest.raises(SystemExit) as exit_info:
        train.main(train.parse_args(argv))
    assert exit_info.value.code == EXIT_REQUEUE
    latest = latest_path(tmp_path / "run")
    assert f"stopped on SIGTERM: saved {latest}" in capsys.readouterr().out
    saved = load_checkpoint(latest)
    assert (saved["epoch"], saved["batch"], saved["step"]) == (0, 4, 12)  # epoch 0 done, then 4 of 8 batches
    assert saved["epoch_seconds"] >= 2.0  # steps 8..11
    assert saved["settings"] == {"processes": 1, "batch_size": 16, "accum": 1, "drop_last": False}
    assert sorted(os.listdir(tmp_path / "run" / "ckpts")) == [LATEST_NAME, "model_0.pth"]  # no temporary file
    assert [r["epoch"] for r in read_jsonl(tmp_path / "run" / "log.jsonl")] == [0]

    monkeypatch.setattr(train, "train_step", slow_step)
    train.main(train.parse_args(argv))  # returns: exit code 0
    out = capsys.readouterr().out
    assert f"resuming from {latest}: epoch 1, batch 4 of 8, step 12" in out
    assert_same_end(tmp_path / "run", straight)
    epoch_1 = read_jsonl(tmp_path / "run" / "log.jsonl")[1]
    assert epoch_1["seconds"] >= 4.0  # both halves of the epoch, not the resumed one only
    assert abs(epoch_1["img_per_s"] * epoch_1["seconds"] - 128) < 2  # all 128 images of the epoch
    line = next(line for line in out.splitlines() if line.startswith(f"epoch 1/{N_EPOCH}"))
    hours, minutes, seconds = map(int, line.rsplit(" left", 1)[0].split()[-1].split(":"))
    assert hours * 3600 + minutes * 60 + seconds >= 3.5  # one more epoch at the pace of a whole one: >= 4 s
    train.main(train.parse_args(argv))  # a restart of the finished run does nothing, successfully
    assert "the run is complete" in capsys.readouterr().out


def test_mid_epoch_checkpoint_refuses_other_batch_settings_before_any_work(tiny_setup, tmp_path, monkeypatch,
                                                                          capsys):
    """A latest.pth written at batch 3 of epoch 0 continues only with the same batch_size, --accum and
    --drop_last (and processes); each change is one line naming it, both values and the fix."""
    config = write_config(tmp_path, n_epoch=N_EPOCH)
    save_dir = tmp_path / "run"
    argv = ["--config", str(config), "--device", "cpu", "--set", f"save_dir={save_dir}", "--resume", "auto",
            "--ckpt_every_min", "0"]
    step = train.train_step

    def signalled_step(state, images):
        if state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(state, images)

    monkeypatch.setattr(train, "train_step", signalled_step)
    with pytest.raises(SystemExit):
        train.main(train.parse_args(argv))
    latest = latest_path(save_dir)
    capsys.readouterr()

    def refused(*flags):
        with pytest.raises(SystemExit) as exit_info:
            train.main(train.parse_args(argv + list(flags)))
        assert exit_info.value.code == 2
        captured = capsys.readouterr()
        assert "training" not in captured.out  # refused before building anything
        return captured.err.strip()

    position = f"error: {latest} stopped mid-epoch (batch 3 of epoch 0) with"
    assert refused("--set", "batch_size=8") == (
        f"{position} batch_size 16, and this run has batch_size 8: the rest of that epoch would not be the "
        f"batches it left; pass --set batch_size=16, or continue from a model_{{epoch}}.pth with --resume PATH")
    assert refused("--accum", "2").startswith(f"{position} accum 1, and this run has accum 2")
    assert "; leave out --drop_last, or" in refused("--drop_last")
    # Written by two processes (the number it records), resumed by one.
    two = load_checkpoint(latest)
    two["settings"]["processes"] = 2
    save_checkpoint(two, latest)
    assert refused() == (
        f"{position} processes 2, and this run has processes 1: the rest of that epoch would not be the batches "
        f"it left; launch 2 process(es) in all (python -m utils.launch --nproc_per_node x --nnodes), or continue from a "
        f"model_{{epoch}}.pth with --resume PATH")
    # A file written before the settings were recorded: its config's batch_size still decides.
    legacy = load_checkpoint(latest)
    del legacy["settings"]
    save_checkpoint(legacy, latest)
    assert refused("--set", "batch_size=32").startswith(f"{position} batch_size 16, and this run has batch_size 32")
    assert load_checkpoint(latest)["step"] == 3  # untouched


SIGNALLED = textwrap.dedent(f"""
    import sys, threading
    sys.path.insert(0, {str(REPO)!r})
    from utils.preemption import StopSignals
    with StopSignals(repeat_seconds=1.0) as signals:
        print("ready", flush=True)
        threading.Event().wait(60)  # blocked, as in a collective whose peer has died
""")


def test_second_signal_exits_at_once_even_while_blocked(tmp_path):
    script = tmp_path / "signalled.py"
    script.write_text(SIGNALLED)
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline() == "ready\n"  # printed once the handlers are installed
    process.send_signal(signal.SIGUSR1)
    process.send_signal(signal.SIGUSR1)  # a duplicate (launcher and scheduler): counted once
    # The watcher's notice marks when the first one was received; the second signal must come at least
    # repeat_seconds (1.0) later to count.
    assert process.stderr.readline().startswith(
        "SIGUSR1 received: stopping at the next step or epoch boundary, after saving")
    received = time.monotonic()
    while time.monotonic() < received + 1.2:
        assert process.poll() is None  # the duplicate did not end it
        time.sleep(0.05)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 5
    assert "second SIGTERM: exiting at once" in process.stderr.read()


def test_signal_handlers_are_restored(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        assert signal.getsignal(signal.SIGTERM) is not before
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while signals.requested is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert signals.requested == "SIGTERM"
        with StopSignals() as inner:  # as train() inside a script's StopSignals
            assert inner.requested == "SIGTERM"
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
    assert signal.set_wakeup_fd(-1) == -1


def test_resume_takes_the_furthest_checkpoint_by_its_step_not_its_file_time(tmp_path):
    save_dir = tmp_path / "run"
    for epoch in (0, 2):
        save_checkpoint({"epoch": epoch, "step": 8 * (epoch + 1)}, checkpoint_path(save_dir, epoch))
    latest = latest_path(save_dir)
    save_checkpoint({"epoch": 1, "batch": 3, "step": 19}, latest)  # stale: epoch 2 came after it
    (save_dir / "ckpts" / f".{LATEST_NAME}.123.tmp").write_bytes(b"half")  # a write that was killed
    (save_dir / "ckpts" / ".notes.txt").write_text("kept")
    assert list(list_checkpoints(save_dir)) == [0, 2]
    assert resolve_checkpoint(save_dir, -1).endswith("model_2.pth")
    assert remove_stale_temporaries(save_dir) == [str(save_dir / "ckpts" / f".{LATEST_NAME}.123.tmp")]
    assert sorted(os.listdir(save_dir / "ckpts")) == [".notes.txt", LATEST_NAME, "model_0.pth", "model_2.pth"]
    # After `cp -r` (no -p) the stale latest.pth may be the newest file: its stored step still loses.
    stamp = os.stat(checkpoint_path(save_dir, 2)).st_mtime_ns
    os.utime(latest, ns=(stamp + 10**9, stamp + 10**9))
    assert resume_checkpoint(save_dir) == checkpoint_path(save_dir, 2)
    save_checkpoint({"epoch": 2, "batch": 1, "step": 25}, latest)  # further, though written before by the clock
    os.utime(latest, ns=(stamp - 10**9, stamp - 10**9))
    assert resume_checkpoint(save_dir) == latest
    assert resume_checkpoint(tmp_path / "empty") is None


def test_resume_auto_of_a_copied_finished_run_ignores_a_stale_latest_pth(straight, tmp_path, monkeypatch, capsys):
    """The README's case: a finished run copied without `cp -p`, where a stale mid-epoch latest.pth is the newest
    file. `--resume auto` takes model_2.pth by its stored step: the run is complete, nothing is retrained, and
    nothing is built to find that out (`--resume` alone: a one-line error, as there is nothing to train)."""
    import shutil
    save_dir = tmp_path / "run"
    shutil.copytree(straight, save_dir)
    final = checkpoint_path(save_dir, N_EPOCH - 1)
    stale = load_checkpoint(final)
    stale.update(epoch=N_EPOCH - 2, batch=3, step=(N_EPOCH - 1) * 8 + 3, epoch_loss=[torch.zeros(())])
    save_checkpoint(stale, latest_path(save_dir))
    stamp = os.stat(final).st_mtime_ns
    os.utime(latest_path(save_dir), ns=(stamp + 10**9, stamp + 10**9))
    before = load_checkpoint(final)
    monkeypatch.setattr(train, "build_training", lambda *args: pytest.fail("built the training of a finished run"))
    argv = ["--config", str(write_config(tmp_path, n_epoch=N_EPOCH)), "--device", "cpu",
            "--set", f"save_dir={save_dir}", "--resume"]
    train.main(train.parse_args(argv + ["auto"]))
    ends = f"{final} ends epoch {N_EPOCH - 1}, the last of n_epoch {N_EPOCH}"
    assert f"{ends}: the run is complete" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        train.main(train.parse_args(argv))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {ends}: nothing to train; raise n_epoch (--set n_epoch=N) to continue")
    assert_same_tensors(load_checkpoint(final)["MODEL"], before["MODEL"])


def test_resume_auto_starts_fresh_and_bad_values_are_one_line_errors(tiny_setup, tmp_path, capsys):
    config = write_config(tmp_path, n_epoch=1)
    state = run(config, tmp_path / "run", "--resume", "auto", "--max_steps", "2")
    assert state.step == 2 and not (tmp_path / "run" / "ckpts").exists()
    with pytest.raises(SystemExit) as exit_info:
        train.main(train.parse_args(["--config", str(config), "--device", "cpu", "--ckpt_every_min", "-1"]))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --ckpt_every_min -1: must be 0 (off) or a positive number of minutes")


def test_probe_stops_on_sigterm_after_saving_its_epoch(tmp_path, monkeypatch):
    from model.models import load_diffusion
    from evaluation.frozen import prepare_frozen
    cfg, _ = make_config(tmp_path)
    checkpoint = make_checkpoint(cfg, 3)
    timesteps, blocks = [11], ["out_2"]
    train_set, test_set = small_sets()
    original = linear.train_one_epoch

    def signalled_epoch(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives during the first epoch
        return original(*args, **kwargs)

    def probe():
        diffusion = prepare_frozen(load_diffusion(cfg, checkpoint), CPU)
        return linear.run_probe(cfg, diffusion, train_set, test_set, timesteps, blocks, CPU, tmp_path / "out",
                                "probe")

    monkeypatch.setattr(linear, "train_one_epoch", signalled_epoch)
    with StopSignals(), pytest.raises(SystemExit) as exit_info:
        probe()
    assert exit_info.value.code == EXIT_REQUEUE
    assert load_checkpoint(tmp_path / "out" / "probe.state.pth")["epoch"] == 1
    assert sorted(os.listdir(tmp_path / "out")) == ["probe.state.pth"]  # no half file, no result yet
    monkeypatch.setattr(linear, "train_one_epoch", original)
    result = probe()  # the same call continues
    assert [record["epoch"] for record in result["epochs"]] == [0, 1]


@pytest.mark.parametrize("on_device, workers, drop_last", [(False, 0, False), (False, 2, False), (True, 0, False),
                                                      (False, 0, True), (True, 0, True)])
def test_batches_from_the_middle_of_an_epoch_are_the_epochs_tail(on_device, workers, drop_last):
    """120 images at batch 16: seven full batches and one of 8, kept or dropped."""
    from utils.data import SyntheticImages, TrainData
    dataset = SyntheticImages(n=120, image_size=16, train=True, transform=None)
    data = TrainData(dataset, 16, torch.device("cpu"), seed=5, num_workers=workers, on_device=on_device,
                           drop_last=drop_last)
    whole = list(data.batches(1))
    tail = list(data.batches(1, start=3))
    assert len(whole) == (7 if drop_last else 8) and len(tail) == len(whole) - 3
    assert all(torch.equal(a, b) for a, b in zip(whole[3:], tail))  # the same images and flips
    assert all(torch.equal(a, b) for a, b in zip(whole, data.batches(1)))  # the skip was for one pass only
    if not on_device and workers == 0:  # the skipped images are not even read
        reads = []
        original = type(dataset).__getitem__
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(type(dataset), "__getitem__", lambda self, i: reads.append(i) or original(self, i))
            list(data.batches(1, start=3))
        assert len(reads) == sum(len(batch) for batch in tail)


class Requested:
    requested = None


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_checkpoint_clock_polls_every_few_steps(device):
    """The collective path, in a one-process group posing as two: gloo decides at the first poll; on
    CUDA the all-reduce launched at a poll is read at the next one, so the decision comes a poll later."""
    import torch.distributed as dist
    from utils.checkpoint_clock import POLL_EVERY, CheckpointClock
    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        signals = Requested()
        clock = CheckpointClock(0, signals, device)
        clock.world_size = 2
        first_poll = POLL_EVERY if device == "cpu" else 2 * POLL_EVERY
        for step in range(1, 3 * POLL_EVERY + 1):
            if step == 1:
                signals.requested = "SIGTERM"
            clock.after_step()
            assert (clock.save_due, clock.stop_due) == ((True, True) if step >= first_poll else (False, False)), step
        timed = CheckpointClock(1e-9, Requested(), device)  # rank 0's clock says "now"
        timed.world_size = 2
        for _ in range(first_poll):
            timed.after_step()
        assert (timed.save_due, timed.stop_due) == (True, False)
        timed.saved()
        assert not timed.save_due
    finally:
        dist.destroy_process_group()


# Runs each script named on its command line as __main__, with its arguments' parsing replaced by a SIGTERM
# to itself and a wait, as if the signal came in the middle of the work; prints each exit code.
SIGNALLED_SCRIPTS = textwrap.dedent(f"""
    import argparse, io, json, os, runpy, signal, sys, time
    from contextlib import redirect_stdout
    sys.path.insert(0, {str(REPO)!r})

    signalled = []

    def parse_args(self, args=None, namespace=None):
        signalled.append(time.monotonic())  # after the script's imports, which take long on a loaded machine
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)

    argparse.ArgumentParser.parse_args = parse_args
    results = {{}}
    for script in sys.argv[1:]:
        out = io.StringIO()
        try:
            with redirect_stdout(out):
                runpy.run_path(script, run_name="__main__")
        except SystemExit as end:
            results[os.path.basename(script)] = [end.code, out.getvalue(), time.monotonic() - signalled[-1]]
    print(json.dumps(results))
""")
AT_ONCE = {
    "sample.py": "the images written so far are kept, and the same command writes only the missing ones",
    "fid.py": "nothing of this run is kept but cached reference statistics; the same command computes the FID again",
    "knn.py": "nothing is saved mid-way; the same command runs the feature pass and the k-NN again",
    "export_features.py": "nothing is saved mid-way; the same command extracts the features again",
    "encode_latents.py": "the finished copies are kept; the same command encodes the unfinished copy again",
    "noisy_classifier_DDAE.py": "nothing is saved mid-way; the same command trains the heads again from the start",
}


def test_scripts_without_a_mid_way_save_stop_at_once_with_75_and_say_what_is_redone(tmp_path):
    """The README's SIGTERM table for the scripts that have nothing to save mid-way (the others: train.py,
    linear.py and the epoch loops, tested above and in test_train_multiprocess)."""
    import json
    probe = tmp_path / "signalled.py"
    probe.write_text(SIGNALLED_SCRIPTS)
    result = subprocess.run([sys.executable, str(probe), *[str(REPO / script) for script in AT_ONCE]], cwd=tmp_path,
                            env=environment(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    ends = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(ends) == sorted(AT_ONCE)
    for script, (code, out, seconds) in ends.items():
        assert code == EXIT_REQUEUE, script
        assert out.strip().splitlines()[-1] == f"stopped on SIGTERM: {AT_ONCE[script]} (exit code 75)"
        assert seconds < 20, script  # at once after the signal, not after the 30 s wait
    assert "Traceback" not in result.stderr
