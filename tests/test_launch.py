"""utils.launch with two gloo workers: a failure is one line, the last: a worker killed by SIGKILL (what the
kernel's OOM killer sends) or a full disk is named, and the survivor whose collective broke, or whom the
launcher ended, prints no traceback and claims no stop; a bad input is one line, not one per worker plus
torchrun's; the order of failures decides whom to blame."""
import logging
import os
import signal
import subprocess
import textwrap
import time

import pytest
import yaml

from tests.helpers import TINY, write_config
from tests.launch import REPO, run_two_processes, two_process_command
from utils.errors import cli_entry
from utils.launch import decide, watch_logs
from utils.launch_records import RECORDS_ENV, read_records, write_record

pytestmark = pytest.mark.cpu_only  # gloo processes on the CPU, whatever the test device; CI runs them

# A script as ours are written (cli_entry, StopSignals polled at each step): both workers loop, over
# all-reduces ("collectives") or over nothing but the poll ("poll"); rank 1 writes its process id to READY once
# the process group and its signals are set up.
WORKER = textwrap.dedent("""
    import os, sys, time
    import torch
    import torch.distributed as dist
    from utils.errors import cli_entry
    from utils.preemption import StopSignals, exit_stopped

    @cli_entry
    def main(ready, collectives):
        dist.init_process_group("gloo")
        dist.barrier()
        with StopSignals() as signals:
            if dist.get_rank() == 1:
                with open(ready + ".partial", "w") as file:
                    file.write(str(os.getpid()))
                os.replace(ready + ".partial", ready)
            while not signals.requested:
                if collectives:
                    dist.all_reduce(torch.ones(1))
                time.sleep(0.01)
        exit_stopped(f"stopped on {signals.requested}: saved nothing")

    main(sys.argv[1], sys.argv[2] == "collectives")
""")
KILLED = ("error: worker rank 1 was killed by SIGKILL, which the launcher did not send: most often the kernel's "
          "out-of-memory killer: lower batch_size (and raise --accum to keep the batch per step), or check the "
          "node's memory (dmesg, sacct's MaxRSS); the other workers' errors follow from it (exit code 1)")


def kill_rank_1(tmp_path, loop):
    """Run WORKER under utils.launch, SIGKILL rank 1 once it is ready; the finished process's (code, out, err)."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    ready = tmp_path / "rank1.pid"
    command, env = two_process_command(script, ready, loop, launcher="utils.launch")
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    os.kill(int(ready.read_text()), signal.SIGKILL)  # as the OOM killer does
    out, err = process.communicate(timeout=120)
    return process.returncode, out, err


def test_a_worker_killed_by_sigkill_is_named_in_one_line_without_the_survivors_traceback(tmp_path):
    """The survivor's all-reduce breaks (gloo: "Connection closed by peer"): it leaves its traceback to the
    launcher, which names the killed worker in the only line on stderr."""
    code, out, err = kill_rank_1(tmp_path, "collectives")
    assert code == 1, err[-3000:]
    assert err.splitlines() == [KILLED]  # no traceback, no torchrun line for it, the cause last
    assert out == ""


def test_the_launchers_sigterm_after_a_failure_is_no_stop(tmp_path):
    """The survivor waits in no collective: torchrun ends it with SIGTERM after rank 1 died. It neither says
    "SIGTERM received: stopping ..." nor stops as on a user's signal (a stop line, exit 75)."""
    code, out, err = kill_rank_1(tmp_path, "poll")
    assert code == 1, err[-3000:]
    assert err.splitlines() == [KILLED]
    assert out == ""


# train.py on tests.helpers' small synthetic images, whose rank 0 finds the disk full when it writes
# model_0.pth (rank 1 is then in the next epoch's collectives).
FULL_DISK = f"""
import os, sys
sys.path.insert(0, {str(REPO)!r})
import torch
import train
from tests.helpers import small_synthetic

torch.set_num_threads(1)
train.build_dataset = small_synthetic
save = torch.save

def full_disk_save(obj, file, *args, **kwargs):
    if os.environ["RANK"] == "0" and "model_0.pth" in str(file):
        raise OSError(28, "No space left on device")
    return save(obj, file, *args, **kwargs)

torch.save = full_disk_save
train.main(train.parse_args())
"""


def test_a_full_disk_under_the_launcher_is_one_line(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(FULL_DISK)
    config = write_config(tmp_path, n_epoch=2, ckpt_interval=1, save_dir=str(tmp_path / "run"))
    result = run_two_processes(probe, "--config", config, "--device", "cpu", cwd=tmp_path, launcher="utils.launch")
    assert result.returncode == 1, result.stderr[-3000:]
    [line] = result.stderr.splitlines()  # not rank 1's gloo traceback first
    failed = tmp_path / "run" / "ckpts" / "model_0.pth"
    assert line.startswith(f"error: cannot write checkpoint {failed} (No space left on device; ")


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


def test_a_death_by_an_unsent_signal_is_blamed_before_an_error_line_of_the_same_second():
    # The OOM killer ends rank 1 while rank 0 fails to write (its line follows from the dying peer, or
    # not): in the same second, the death comes first, in whichever order torchrun listed them.
    full = {"error": {0: "error: cannot write checkpoint model_1.pth (No space left on device)"}}
    for failures in ({0: 1, 1: -9}, {1: -9, 0: 1}):
        code, line = decide(failures, full, seconds={0: 100, 1: 100})
        assert (code, line.split(",")[0]) == (1, "error: worker rank 1 was killed by SIGKILL")
    # A second earlier, the error is the cause.
    assert decide({0: 1, 1: -9}, full, seconds={0: 100, 1: 101}) == (1, full["error"][0])


def test_a_broken_collective_is_blamed_last():
    killed = "error: worker rank 1 was killed by SIGKILL"
    broken = {"peer": {0: "Traceback (most recent call last):\n  ...\nRuntimeError: Connection closed by peer"}}
    # Recorded a second before the killed worker (both in one poll of torchrun's): the death is the cause.
    assert decide({0: 1, 1: -9}, broken, seconds={0: 100, 1: 101})[1].startswith(killed)
    # Ended by the launcher (exit 143) after rank 1 crashed: the crash is named.
    ended = {"peer": {0: "ended by the launcher after another worker failed"}}
    assert decide({0: 143, 1: 1}, ended, seconds={0: 100, 1: 100}) == (
        1, "error: worker rank 1 failed (exit code 1); its own output above says why (exit code 1)")
    # A clean stop whose other worker the launcher ended is still a clean stop.
    stops = {"stop": {0: "stopped on SIGTERM: saved latest.pth (exit code 75)"},
             "peer": {1: ended["peer"][0]}}
    assert decide({0: 75, 1: 143}, stops) == (75, stops["stop"][0])
    # No other worker failed: the collective's traceback, then the line naming it, last.
    code, text = decide({0: 1, 1: -15}, broken)
    assert code == 1 and text.splitlines() == broken["peer"][0].splitlines()[:2] + [
        "error: worker rank 0: a collective failed (RuntimeError: Connection closed by peer) and no other worker "
        "failed before it; its traceback is above (exit code 1)"]


def test_a_bad_input_under_the_launcher_is_one_line(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "save_dir": str(tmp_path / "run"), "batch_sise": 16}))
    result = run_two_processes(REPO / "train.py", "--config", config, "--device", "cpu", cwd=tmp_path,
                               launcher="utils.launch")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == [f"error: {config}: unknown key 'batch_sise'; did you mean 'batch_size'?"]
    assert result.stdout == ""


def test_only_the_last_attempts_records_count(tmp_path, monkeypatch):
    """torchrun's restarts (--max-restarts) keep the records folder: a full disk of the first attempt is not
    the cause of the second's end, even when the second left no record but its workers' start."""
    monkeypatch.setenv(RECORDS_ENV, str(tmp_path))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    write_record("error", "error: cannot write checkpoint model_1.pth (No space left on device)", rank=0)
    write_record("peer", "ended by the launcher after another worker failed", rank=1)

    @cli_entry
    def main():
        """A worker of the second attempt that crashes after its start (not a UserError: no record)."""

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        main()
    records = read_records(tmp_path)
    assert records == {"stop": {}, "error": {}, "peer": {}}
    assert decide({1: 1, 0: -15}, records) == (
        1, "error: worker rank 1 failed (exit code 1); its own output above says why (exit code 1)")


def test_the_teardown_is_marked_under_a_quiet_loglevel(tmp_path, monkeypatch):
    """LOGLEVEL=ERROR (torchrun's own variable, for quieter cluster logs) hides torchrun's warnings, but
    the launcher still marks the workers torchrun ends after a failure, and not after a user's signal."""
    logger = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    agent = logging.getLogger("torch.distributed.elastic.agent.server.api")
    saved = [(each, each.level, each.filters[:]) for each in (logger, agent)]
    try:
        for each in (logger, agent):
            each.setLevel(logging.ERROR)
        watch_logs(str(tmp_path))
        logger.warning("Sending process %s closing signal %s", 1234, "SIGTERM")  # torchrun's teardown
        agent.warning("Received %s death signal, shutting down workers", signal.SIGTERM)
        logger.warning("Sending process %s closing signal %s", 1235, "SIGTERM")  # passes the user's signal on
        assert sorted(os.listdir(tmp_path)) == ["teardown.1234"]
        assert not logger.filter(logger.makeRecord(logger.name, logging.WARNING, "", 0, "a warning", (), None))
    finally:
        for each, level, filters in saved:
            each.setLevel(level)
            each.filters[:] = filters
