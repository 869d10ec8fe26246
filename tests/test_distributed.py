"""Single-process defaults, launcher flags, and a real two-process gloo run under torchrun."""
import argparse
import json
import os
import textwrap

import pytest
import torch

from tests.launch import LAUNCHER_VARS, run_two_processes
from utils import distributed
from utils.errors import UserError

# Launcher helpers of the CPU and gloo processes, whatever the test device; CI runs them.
pytestmark = pytest.mark.cpu_only


@pytest.fixture
def plain_env(monkeypatch):
    """The environment of ``python script.py``: no launcher variables."""
    for name in LAUNCHER_VARS:
        monkeypatch.setenv(name, "")  # records the original value, so teardown restores it
        monkeypatch.delenv(name)


def test_plain_python_is_one_process(plain_env, capsys):
    assert distributed.init_distributed("cpu") == torch.device("cpu")
    assert not torch.distributed.is_initialized()
    assert (distributed.get_rank(), distributed.get_local_rank(), distributed.get_world_size()) == (0, 0, 1)
    assert distributed.is_main()
    distributed.print0("hello", 3)
    assert capsys.readouterr().out == "hello 3\n"
    distributed.barrier()
    assert torch.equal(distributed.all_reduce_sum(torch.tensor([2, 5])), torch.tensor([2, 5]))
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    distributed.cleanup()


def test_print0_is_silent_off_rank_zero(plain_env, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert distributed.get_rank() == 1 and not distributed.is_main()
    distributed.print0("hidden")
    assert capsys.readouterr().out == ""


def test_auto_device_and_bad_requests(plain_env, monkeypatch):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert distributed.resolve_device("auto").type == expected
    assert distributed.resolve_device(None).type == expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--device cuda: no CUDA device"):
        distributed.resolve_device("cuda")
    with pytest.raises(UserError, match="--device tpu"):
        distributed.resolve_device("tpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UserError, match="WORLD_SIZE='two'"):
        distributed.get_world_size()


@pytest.mark.parametrize("argv", [["--local_rank", "0"], ["--local-rank=0"], ["--local_rank=0"]])
def test_launcher_flags_parse(plain_env, argv):
    parser = distributed.add_launcher_args(argparse.ArgumentParser())
    args = parser.parse_args(argv)
    assert (args.local_rank, args.device) == (0, "auto")


def test_local_rank_flag_fills_missing_env(plain_env):
    parser = distributed.add_launcher_args(argparse.ArgumentParser())
    args = parser.parse_args(["--local-rank=3", "--device", "cpu"])
    assert (args.local_rank, args.device) == (3, "cpu")
    assert os.environ["LOCAL_RANK"] == "3" and distributed.get_local_rank() == 3


def test_local_rank_defaults_to_env(plain_env, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")
    parser = distributed.add_launcher_args(argparse.ArgumentParser())
    assert parser.parse_args([]).local_rank == 2


WORKER = """
import argparse, json
import torch
from utils import distributed
from utils.errors import UserError

args = distributed.add_launcher_args(argparse.ArgumentParser()).parse_args()
device = distributed.init_distributed(args.device)
rank, world = distributed.get_rank(), distributed.get_world_size()
assert torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo"
assert args.local_rank == rank == distributed.get_local_rank()
total = distributed.all_reduce_sum(torch.tensor([rank + 1]))
gathered = distributed.all_gather_object({"rank": rank, "name": f"p{rank}"})
decided = distributed.decide_on_main(lambda: f"decided by rank {rank}")


def refuse():
    raise UserError(f"refused by rank {rank}")


try:
    distributed.decide_on_main(refuse)
    refused = None
except UserError as err:
    refused = str(err)
refusals = distributed.all_gather_object(refused)  # every rank raised rank 0's error, none hangs
distributed.barrier()
distributed.print0(json.dumps({"world": world, "device": str(device), "sum": total.tolist(), "gathered": gathered, "decided": decided,
                               "refusals": refusals}))
distributed.cleanup()
assert distributed.all_gather_object(rank) == [rank]
"""


def test_two_process_gloo_run(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    result = run_two_processes(script, "--device", "cpu", cwd=tmp_path, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, result.stdout
    report = json.loads(lines[0])
    assert report == {"world": 2, "device": "cpu", "sum": [3],
                      "gathered": [{"rank": 0, "name": "p0"}, {"rank": 1, "name": "p1"}],
                      "decided": "decided by rank 0", "refusals": ["refused by rank 0"] * 2}
