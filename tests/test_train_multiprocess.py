"""train.py under torchrun with two CPU processes (gloo): DDP keeps the ranks identical, the learning
rate scales with the world size, and the run starts from the weights a single process would build."""
import signal
import subprocess
import textwrap
import time

import pytest
import torch
import yaml

import train
from model.models import load_config
from tests.launch import REPO, run_two_processes, two_process_command
from utils.checkpoint import load_checkpoint
from utils.data import SyntheticImages
from utils.logging import read_jsonl

pytestmark = pytest.mark.cpu_only  # gloo processes on the CPU, whatever the test device; CI runs them

IMAGES = 128  # 4 steps of 16 images per rank and epoch
CONFIG = {
    "model_type": "EDM",  # 18 Heun steps per sample grid
    "network": {"image_shape": [3, 16, 16], "n_channels": 32, "ch_mults": [1, 2], "is_attn": [False, True],
                "dropout": 0.1, "n_blocks": 1},
    "dataset": "synthetic", "batch_size": 16, "n_epoch": 2, "lrate": 1.0e-3, "warm_epoch": 1, "ema": 0.99,
    "num_workers": 0, "n_sample": 10, "ckpt_interval": 100,
    "linear": {"timestep": 4, "blockname": "out_2"},
}

# Runs train.py's main under torchrun with test hooks: the data shrunk to IMAGES images, every rank's
# weights saved right after build_training and at the end of train, and with PROBE_KILL_AT=N rank 1 of
# torchrun's first attempt killed (SIGKILL) before its step N + 1, with PROBE_SIGTERM_AT=N sent SIGTERM.
PROBE = textwrap.dedent(f"""
    import os, signal, sys
    sys.path.insert(0, {str(REPO)!r})
    import torch
    import train
    import utils.checkpoint_clock
    from utils.data import SyntheticImages
    from utils.distributed import get_rank

    out = os.environ["PROBE_OUT"]
    build_training, run = train.build_training, train.train

    def small_dataset(name, root, train, transform=None, image_size=None):
        return SyntheticImages(n={IMAGES}, image_size=image_size, train=train, transform=transform)

    def recording_build(cfg, args, device):
        state = build_training(cfg, args, device)
        torch.save(state.diffusion.state_dict(), f"{{out}}/init_rank{{get_rank()}}.pt")
        return state

    def recording_train(cfg, args):
        state = run(cfg, args)
        torch.save({{"MODEL": state.diffusion.state_dict(), "EMA": state.ema.state_dict()}},
                   f"{{out}}/final_rank{{get_rank()}}.pt")
        return state

    train.build_dataset, train.build_training, train.train = small_dataset, recording_build, recording_train
    utils.checkpoint_clock.POLL_EVERY = int(os.environ.get("PROBE_POLL_EVERY", utils.checkpoint_clock.POLL_EVERY))
    kill_at, step = int(os.environ.get("PROBE_KILL_AT", -1)), train.train_step
    sigterm_at = int(os.environ.get("PROBE_SIGTERM_AT", -1))

    def killed_step(state, images):
        if get_rank() == 1 and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
            if state.step in (kill_at, sigterm_at):
                os.kill(os.getpid(), signal.SIGKILL if state.step == kill_at else signal.SIGTERM)
        return step(state, images)

    train.train_step = killed_step
    train.main(train.parse_args())
""")


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    config = folder / "tiny_edm.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "save_dir": str(folder / "run")}))
    probe = folder / "probe.py"
    probe.write_text(PROBE)
    result = run_two_processes(probe, "--config", config, "--device", "cpu", cwd=REPO,
                               env={"PROBE_OUT": str(folder)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return folder, config


def test_ranks_stay_identical(two_process_run):
    folder, _ = two_process_run
    final = [torch.load(folder / f"final_rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert_same_tensors(final[0]["MODEL"], final[1]["MODEL"])
    assert_same_tensors(final[0]["EMA"], final[1]["EMA"])
    checkpoint = load_checkpoint(folder / "run" / "ckpts" / "model_1.pth")
    assert_same_tensors(checkpoint["MODEL"], final[1]["MODEL"])
    assert_same_tensors(checkpoint["EMA"], final[1]["EMA"])


def test_checkpoint_of_two_processes(two_process_run):
    folder, config = two_process_run
    checkpoint = load_checkpoint(folder / "run" / "ckpts" / "model_1.pth")
    assert set(checkpoint) == {"MODEL", "EMA", "opt", "scaler", "epoch", "step", "rng", "config"}
    assert all(key.startswith("nn_model.") for key in checkpoint["MODEL"])
    assert checkpoint["epoch"] == 1
    assert checkpoint["step"] == int(checkpoint["EMA"]["step"]) == 2 * IMAGES // (2 * 16)
    assert [group["lr"] for group in checkpoint["opt"]["param_groups"]] == [CONFIG["lrate"] * 2]
    rng = checkpoint["rng"]
    assert rng["world_size"] == 2
    assert not torch.equal(rng["ranks"][0]["torch"], rng["ranks"][1]["torch"])  # seeds 1337 and 1338
    records = read_jsonl(folder / "run" / "log.jsonl")
    assert [(r["epoch"], r["step"], r["lr"]) for r in records] == [(0, 4, 2e-3), (1, 8, 2e-3)]
    assert (folder / "run" / "visual" / "image_ep1_ema.png").is_file()
    assert (folder / "run" / "ckpts" / "model_0.pth").is_file()


def test_initial_weights_match_a_single_process(two_process_run, monkeypatch):
    folder, config = two_process_run
    initial = [torch.load(folder / f"init_rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert_same_tensors(initial[0], initial[1])  # rank 1 (seed 1338) was overwritten by rank 0's weights
    monkeypatch.setattr(train, "build_dataset", lambda name, root, train, transform=None, image_size=None:
                        SyntheticImages(n=IMAGES, image_size=image_size, train=train, transform=transform))
    args = train.parse_args(["--config", str(config), "--device", "cpu"])
    single = train.build_training(load_config(args.config), args, torch.device("cpu"))
    assert_same_tensors(single.diffusion.state_dict(), initial[0])
    final = torch.load(folder / "final_rank0.pt", weights_only=True)["MODEL"]
    assert not torch.equal(final["nn_model.image_proj.weight"], initial[0]["nn_model.image_proj.weight"])


def test_killed_worker_restarted_by_torchrun_ends_like_the_straight_run(two_process_run, tmp_path):
    """torchrun --max-restarts 1 with --resume auto: rank 1 dies in epoch 1 (step 8 of 8), both restart
    from latest.pth, written after step 6 (epoch 1, batch 2 of 4), and end with the straight run's weights."""
    straight_folder, _ = two_process_run
    config = tmp_path / "tiny_edm.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "save_dir": str(tmp_path / "run")}))
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    result = run_two_processes(probe, "--config", config, "--device", "cpu", "--resume", "auto",
                               "--ckpt_every_min", "0.0001", cwd=REPO, launcher_args=("--max-restarts", "1"),
                               env={"PROBE_OUT": str(tmp_path), "PROBE_KILL_AT": "7", "PROBE_POLL_EVERY": "2"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    latest = tmp_path / "run" / "ckpts" / "latest.pth"
    assert f"resuming from {latest}: epoch 1, batch 2 of 4, step 6" in result.stdout
    straight = torch.load(straight_folder / "final_rank0.pt", weights_only=True)
    for rank in (0, 1):
        restarted = torch.load(tmp_path / f"final_rank{rank}.pt", weights_only=True)
        # The same collectives in the same order: equal bit for bit.
        assert_same_tensors(straight["MODEL"], restarted["MODEL"])
        assert_same_tensors(straight["EMA"], restarted["EMA"])
    records = read_jsonl(tmp_path / "run" / "log.jsonl")
    assert [(r["epoch"], r["steps"], r["loss"]) for r in records] == \
        [(r["epoch"], r["steps"], r["loss"]) for r in read_jsonl(straight_folder / "run" / "log.jsonl")]


def test_sigterm_to_one_rank_stops_both_at_the_same_step(tmp_path):
    """Rank 1 alone gets SIGTERM during step 2; the ranks agree at the next poll (step 2), write latest.pth
    together and both exit with code 75; utils.launch (the README's torchrun) ends with 75 and the stop
    line, where plain torchrun ends with 1 and a traceback."""
    config = tmp_path / "tiny_edm.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "save_dir": str(tmp_path / "run")}))
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    result = run_two_processes(probe, "--config", config, "--device", "cpu", "--resume", "auto",
                               "--ckpt_every_min", "0", cwd=REPO, launcher="utils.launch",
                               env={"PROBE_OUT": str(tmp_path), "PROBE_SIGTERM_AT": "1", "PROBE_POLL_EVERY": "2"})
    latest = tmp_path / "run" / "ckpts" / "latest.pth"
    line = f"stopped on a signal to another process: saved {latest}"
    assert result.returncode == 75, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith(line)  # the launcher's last line
    assert result.stdout.count("stopped on") == 1  # the launcher's only: no worker prints it too
    # Nothing on stderr: no traceback, no torchrun lines for the workers' exit 75, no DDP warnings
    # (broadcast_buffers' FutureWarning, "Grad strides do not match bucket view strides").
    assert result.stderr == ""
    saved = load_checkpoint(latest)
    assert (saved["epoch"], saved["batch"], saved["step"]) == (-1, 2, 2)
    assert saved["rng"]["world_size"] == len(saved["epoch_loss"]) == 2
    for rank in (0, 1):  # both left train() after that same step, none waits in a collective
        final = torch.load(tmp_path / f"final_rank{rank}.pt", weights_only=True)
        assert_same_tensors(final["MODEL"], saved["MODEL"])


def test_sigterm_to_the_launcher_saves_and_exits_75(tmp_path):
    """SIGTERM to utils.launch (as srun or a scheduler sends it): torchrun passes it to both workers,
    which save latest.pth at an agreed step; the launcher exits with 75 and one line, no traceback."""
    config = tmp_path / "tiny_edm.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "n_epoch": 200, "save_dir": str(tmp_path / "run")}))
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    command, env = two_process_command(probe, "--config", config, "--device", "cpu", "--ckpt_every_min", "0",
                                       launcher="utils.launch",
                                       env={"PROBE_OUT": str(tmp_path), "PROBE_POLL_EVERY": "2"})
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.monotonic() + 180
    while not (log.exists() and log.read_text().strip()):  # an epoch done: training is under way
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    latest = tmp_path / "run" / "ckpts" / "latest.pth"
    assert process.returncode == 75, out[-3000:] + err[-3000:]
    assert out.strip().splitlines()[-1].startswith(f"stopped on SIGTERM: saved {latest}")
    assert out.count("stopped on") == 1
    # One notice, from rank 0; torchrun's "death signal" and "closing signal" lines are not shown.
    assert err.splitlines() == ["SIGTERM received: stopping at the next step or epoch boundary, after saving; "
                                "send it again to exit at once"]
    assert load_checkpoint(latest)["step"] >= 4


CRASH = textwrap.dedent("""
    import os, time
    if os.environ["RANK"] == "1":
        raise RuntimeError("a crash on rank 1")
    time.sleep(30)  # rank 0 is still working when torchrun ends it
""")


def test_a_crashing_worker_is_not_a_clean_stop(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    result = run_two_processes(script, cwd=tmp_path, launcher="utils.launch")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "RuntimeError: a crash on rank 1" in result.stderr  # the worker's own traceback stays
    assert result.stderr.strip().splitlines()[-1] == (
        "error: worker rank 1 failed (exit code 1); its own output above says why (exit code 1)")


def test_two_processes_train_a_label_conditioned_edm_with_the_augmentation_off(tmp_path):
    """augment_dim 9 with augment_prob 0 (the ablation of EDM_ddpmpp_aug): the network gets zero labels,
    so DDP sees its label embedding used in every step instead of stopping at step 2."""
    config = tmp_path / "tiny_edm.yaml"
    network = {**CONFIG["network"], "augment_dim": 9}
    config.write_text(yaml.safe_dump({**CONFIG, "network": network, "diffusion": {"augment_prob": 0.0},
                                      "n_epoch": 1, "save_dir": str(tmp_path / "run")}))
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    result = run_two_processes(probe, "--config", config, "--device", "cpu", cwd=REPO,
                               env={"PROBE_OUT": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    final = [torch.load(tmp_path / f"final_rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert_same_tensors(final[0]["MODEL"], final[1]["MODEL"])
    assert [record["steps"] for record in read_jsonl(tmp_path / "run" / "log.jsonl")] == [4]
