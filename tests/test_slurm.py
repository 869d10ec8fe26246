"""slurm/train.sbatch's shell logic on the CPU, with a stub ``srun`` and ``scontrol`` on PATH (bash only, no
Python starts): the CPUs are passed to the step when SLURM gives them, the job is requeued only after the
time-limit signal and a save (exit 75), also when srun exits at the very moment the signal interrupts the
script's ``wait``, and never after scancel, a preemption's SIGTERM or a crash (also one after the
time-limit signal)."""
import contextlib
import os
import signal
import subprocess
import time

import pytest

from tests.launch import REPO

SCRIPT = REPO / "slurm" / "train.sbatch"
# The training: on SIGTERM it "saves" and exits 75 at once (the race: srun ends while the script's trap
# runs), or $STUB_TERM_EXIT (a crash while saving), else exits $STUB_EXIT, or waits. Its first line is
# logged once the trap is installed.
SRUN = """#!/bin/bash
trap 'echo save >> "$STUB_LOG"; exit ${STUB_TERM_EXIT:-75}' TERM
echo $$ > "$STUB_LOG.pid"
echo "srun $*" >> "$STUB_LOG"
[ -n "$STUB_EXIT" ] && exit "$STUB_EXIT"
sleep 30 >/dev/null 2>&1 & wait $!   # in wait, not a sleep, the trap runs at once
"""
SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$STUB_LOG"
"""
STARTED = "slurm: training started"  # the script's mark: its traps are set and it knows srun's process


def stubs(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def start(tmp_path, log, cpus="8", **env):
    """The batch script under the stubs, once both are ready for a signal: the script has printed its
    mark, and the stub has installed its trap and logged its command line."""
    environment = {**os.environ, "PATH": f"{stubs(tmp_path)}{os.pathsep}{os.environ['PATH']}",
                   "STUB_LOG": str(log), "SLURM_JOB_ID": "42", **env}
    environment.pop("SLURM_CPUS_PER_TASK", None)
    if cpus is not None:
        environment["SLURM_CPUS_PER_TASK"] = cpus
    process = subprocess.Popen(["bash", str(SCRIPT), "--config", "config/EDM_ddpm.yaml"], cwd=tmp_path,
                               env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = process.stdout.readline()
        assert first.startswith(STARTED), first
        deadline = time.monotonic() + 20
        while not (log.exists() and log.read_text().startswith("srun")):
            assert time.monotonic() < deadline and process.poll() is None, "the stub srun did not start"
            time.sleep(0.005)
    except AssertionError:
        process.kill()  # the stub ends by itself
        raise
    return process, first


def srun_pid(log):
    return int(log.with_name(log.name + ".pid").read_text())


COMMAND = ("python -m utils.launch --standalone --nproc_per_node=4 train.py --config config/EDM_ddpm.yaml "
           "--resume auto")


def test_the_time_limit_saves_then_exits_75_then_requeues_even_when_srun_ends_at_once(tmp_path):
    """USR1 to the batch shell (--signal=B:USR1), 30 times, and at once SIGTERM to the stub, which exits 75
    the moment it gets it: srun ends while the script's trap still runs, which once lost the requeue.
    Every run is requeued, after the save."""
    for attempt in range(30):
        log = tmp_path / f"log{attempt}"
        process, _ = start(tmp_path, log)
        stub = srun_pid(log)
        process.send_signal(signal.SIGUSR1)
        with contextlib.suppress(ProcessLookupError):  # the script's own SIGTERM may have ended it already
            os.kill(stub, signal.SIGTERM)
        output, _ = process.communicate(timeout=20)
        assert process.returncode == 75, (attempt, output)
        assert log.read_text().splitlines() == [
            f"srun --cpus-per-task=8 {COMMAND}",
            "save",                      # the save comes first ...
            "scontrol requeue 42",       # ... the requeue (which ends the job) only after the exit
        ], attempt
        assert "requeueing job 42" in output


@pytest.mark.parametrize("code", [1, 0])
def test_a_crash_or_the_end_after_the_time_limit_signal_is_not_requeued(tmp_path, code):
    """USR1, then the training exits with 1 (it crashed while saving: a full disk) or 0 (it ended just
    then) instead of 75: the job is not requeued; the script exits with the training's code."""
    log = tmp_path / "log"
    process, _ = start(tmp_path, log, STUB_TERM_EXIT=str(code))
    process.send_signal(signal.SIGUSR1)
    output, _ = process.communicate(timeout=20)
    assert process.returncode == code, output
    assert log.read_text().splitlines() == [f"srun --cpus-per-task=8 {COMMAND}", "save"]  # no scontrol
    assert "slurm: time limit near" in output and "requeue" not in output


@pytest.mark.parametrize("how", ["scancel", "preemption"])
def test_a_sigterm_saves_and_exits_75_without_a_requeue(tmp_path, how):
    """scancel and a preemption both send SIGTERM to every process of the job: the training saves and
    exits 75, and the script does not requeue (a cancel ends the job; SLURM requeues a preempted one
    itself under PreemptMode=REQUEUE)."""
    log = tmp_path / "log"
    process, _ = start(tmp_path, log)
    process.send_signal(signal.SIGTERM)
    os.kill(srun_pid(log), signal.SIGTERM)
    output, _ = process.communicate(timeout=20)
    assert process.returncode == 75, output
    assert log.read_text().splitlines() == [f"srun --cpus-per-task=8 {COMMAND}", "save"]
    assert "requeue" not in output.replace("no requeue here", "")


@pytest.mark.parametrize("code", [0, 1, 2])
def test_an_end_or_a_failure_is_not_requeued(tmp_path, code):
    log = tmp_path / "log"
    environment = {**os.environ, "PATH": f"{stubs(tmp_path)}{os.pathsep}{os.environ['PATH']}",
                   "STUB_LOG": str(log), "SLURM_JOB_ID": "42", "STUB_EXIT": str(code)}
    result = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=environment, capture_output=True, text=True,
                            timeout=20)
    assert result.returncode == code, result.stdout + result.stderr
    assert [line for line in log.read_text().splitlines() if not line.startswith("srun")] == []


def test_without_cpus_per_task_srun_gets_no_empty_flag(tmp_path):
    """An #SBATCH line without --cpus-per-task leaves SLURM_CPUS_PER_TASK unset: srun gets no flag (an
    empty --cpus-per-task= is an error to srun)."""
    log = tmp_path / "log"
    process, _ = start(tmp_path, log, cpus=None)
    process.send_signal(signal.SIGUSR1)
    output, _ = process.communicate(timeout=20)
    assert process.returncode == 75, output
    assert log.read_text().splitlines()[0] == f"srun {COMMAND}"
