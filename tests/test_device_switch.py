"""The suite's device switch (tests/conftest.py): DDAE_TEST_DEVICE and the cpu_only / cuda markers."""
import os
import subprocess
import sys

import pytest
import torch

from tests.launch import REPO


def pytest_with(device, *args):
    environment = {**os.environ, "DDAE_TEST_DEVICE": device}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args],
                          cwd=REPO, env=environment, capture_output=True, text=True, timeout=120)


@pytest.mark.cpu_only
def test_cpu_tests_are_skipped_when_the_switch_names_another_device():
    result = pytest_with("meta", "tests/test_ddp_accumulation.py", "tests/test_cuda.py")
    assert result.returncode == 0, result.stdout[-2000:]
    assert "a CPU test; DDAE_TEST_DEVICE=meta (CI runs it)" in result.stdout
    assert " passed" not in result.stdout and "skipped" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_cuda_without_it_is_one_line():
    result = pytest_with("cuda", "tests/test_config.py")
    assert result.returncode == 4
    assert "DDAE_TEST_DEVICE=cuda: torch sees no CUDA device here; unset it to test on the CPU" in \
        result.stdout + result.stderr
