"""utils.launch with two gloo workers: a worker killed by SIGKILL (what the kernel's OOM killer sends) is
named, not the survivor whose collective broke; a bad input is one line, not one per worker plus
torchrun's; the order of failures decides whom to blame."""
import os
import signal
import subprocess
import textwrap
import time

import pytest
import yaml

from tests.helpers import TINY
from tests.launch import REPO, run_two_processes, two_process_command
from utils.launch import decide

pytestmark = pytest.mark.cpu_only  # gloo processes on the CPU, whatever the test device; CI runs them

# Both workers loop over all-reduces; rank 1 writes its process id to READY once the process group works.
COLLECTIVES = textwrap.dedent("""
    import os, sys, time
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    dist.barrier()
    if dist.get_rank() == 1:
        with open(sys.argv[1] + ".partial", "w") as file:
            file.write(str(os.getpid()))
        os.replace(sys.argv[1] + ".partial", sys.argv[1])
    while True:
        dist.all_reduce(torch.ones(1))
        time.sleep(0.01)
""")


def test_a_worker_killed_by_sigkill_is_named_with_what_it_usually_means(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    ready = tmp_path / "rank1.pid"
    command, env = two_process_command(script, ready, launcher="utils.launch")
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    os.kill(int(ready.read_text()), signal.SIGKILL)  # as the OOM killer does
    out, err = process.communicate(timeout=120)
    assert process.returncode == 1, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        "error: worker rank 1 was killed by SIGKILL, which the launcher did not send: most often the kernel's "
        "out-of-memory killer: lower batch_size (and raise --accum to keep the batch per step), or check the "
        "node's memory (dmesg, sacct's MaxRSS); the other workers' errors follow from it (exit code 1)")
    assert "failed (exitcode" not in err  # torchrun's own line for it is not repeated


def test_who_failed_first_is_blamed():
    # Seen by torchrun in the same poll: the killed worker, not the one whose collective broke.
    assert decide({0: 1, 1: -9}, {})[1].startswith("error: worker rank 1 was killed by SIGKILL")
    # torchrun's own SIGKILL, after the shutdown timeout, to a worker that ignored its SIGTERM: the crash
    # before it is blamed.
    code, line = decide({1: 1, 0: -9}, {}, seconds={1: 100, 0: 131})
    assert (code, line) == (1, "error: worker rank 1 failed (exit code 1); its own output above says why "
                               "(exit code 1)")
    # A clean stop whose slow worker torchrun killed after the shutdown timeout is still a clean stop.
    stops = {"stop": {0: "stopped on SIGTERM: saved latest.pth (exit code 75)"}}
    assert decide({0: 75, 1: -9}, stops, seconds={0: 100, 1: 130}) == (75, stops["stop"][0])
    # A bad input on one rank only: its line, with its rank.
    assert decide({1: 2, 0: -15}, {"error": {1: "error: x"}}) == (2, "rank 1: error: x")


def test_a_bad_input_under_the_launcher_is_one_line(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "save_dir": str(tmp_path / "run"), "batch_sise": 16}))
    result = run_two_processes(REPO / "train.py", "--config", config, "--device", "cpu", cwd=tmp_path,
                               launcher="utils.launch")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == [f"error: {config}: unknown key 'batch_sise'; did you mean 'batch_size'?"]
    assert result.stdout == ""
