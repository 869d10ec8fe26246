"""Running scripts as a launcher would, for the tests that need more than one process."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# What torchrun sets; a test's own process must look like plain ``python``, and a child launch must
# not inherit them.
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def two_process_command(script, *args, env=None, launcher_args=(), launcher="torch.distributed.run"):
    """The command line and environment of ``torchrun --standalone --nproc_per_node=2 script *args``, with
    the repository importable, one CPU thread per process and none of this process's launcher variables.

    Args:
        env: extra environment variables for the processes.
        launcher_args: more torchrun options, such as ``("--max-restarts", "1")``.
        launcher: the module that launches: torchrun's own, or ``utils.launch`` (the README's wrapper).
    """
    environment = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARS}
    environment["PYTHONPATH"] = os.pathsep.join([str(REPO), environment.get("PYTHONPATH", "")])
    environment["OMP_NUM_THREADS"] = "1"
    environment.update(env or {})
    command = [sys.executable, "-m", launcher, "--standalone", "--nproc_per_node=2",
               *map(str, launcher_args), str(script), *map(str, args)]
    return command, environment


def run_two_processes(script, *args, cwd, timeout=240, env=None, launcher_args=(), launcher="torch.distributed.run"):
    """Run ``two_process_command``'s command from ``cwd``.

    Returns:
        the finished ``subprocess.CompletedProcess`` (text stdout and stderr).
    """
    command, environment = two_process_command(script, *args, env=env, launcher_args=launcher_args,
                                               launcher=launcher)
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)
