"""slurm/train.sbatch's shell logic on the CPU, with a stub ``srun`` and ``scontrol`` on PATH: the CPUs are
passed to the step, the job is requeued only after the training saved and exited 75, and never after a
crash."""
import os
import signal
import subprocess
import time

import pytest

from tests.launch import REPO

SCRIPT = REPO / "slurm" / "train.sbatch"
# The training: records its command line; on SIGTERM it "saves" and exits 75, else exits $STUB_EXIT.
SRUN = """#!/bin/bash
trap 'echo save >> "$STUB_LOG"; exit 75' TERM
echo "srun $*" >> "$STUB_LOG"
for _ in $(seq 300); do sleep 0.1; [ -n "$STUB_EXIT" ] && exit "$STUB_EXIT"; done
"""
SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$STUB_LOG"
"""


def start(tmp_path, **env):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    log = tmp_path / "log"
    environment = {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", "STUB_LOG": str(log),
                   "SLURM_JOB_ID": "42", "SLURM_CPUS_PER_TASK": "8", **env}
    process = subprocess.Popen(["bash", str(SCRIPT), "--config", "config/EDM_ddpm.yaml"], cwd=tmp_path,
                               env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 20
    while not (log.exists() and "srun" in log.read_text()):
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.05)
    return process, log


def srun_pid(process):
    return int(subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()[0])


@pytest.mark.parametrize("how", ["time limit", "preemption"])
def test_a_stop_saves_then_exits_75_then_requeues(tmp_path, how):
    process, log = start(tmp_path)
    if how == "time limit":  # --signal=B:USR1: to the batch shell only, which passes SIGTERM on
        process.send_signal(signal.SIGUSR1)
    else:  # a preemption: SIGTERM to every process of the job
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        os.kill(srun_pid(process), signal.SIGTERM)
    output, _ = process.communicate(timeout=20)
    assert process.returncode == 75, output
    assert log.read_text().splitlines() == [
        "srun --cpus-per-task=8 python -m utils.launch --standalone --nproc_per_node=4 train.py "
        "--config config/EDM_ddpm.yaml --resume auto",
        "save",                      # the save comes first ...
        "scontrol requeue 42",       # ... the requeue (which ends the job) only after the exit
    ]
    assert "requeueing job 42" in output


@pytest.mark.parametrize("code", [0, 1])
def test_an_end_or_a_crash_is_not_requeued(tmp_path, code):
    process, log = start(tmp_path, STUB_EXIT=str(code))
    process.communicate(timeout=20)
    assert process.returncode == code
    assert [line for line in log.read_text().splitlines() if not line.startswith("srun")] == []
