"""Shared test settings, the device switch and the markers.

    python -m pytest -q tests                              # the CPU (CI)
    DDAE_TEST_DEVICE=cuda python -m pytest -q tests        # the device-generic tests on a GPU

``DDAE_TEST_DEVICE`` (``tests.helpers.DEVICE``) is where the device-generic tests run. Markers:
``cpu_only`` (a test of the CPU itself: gloo processes, the CPU fallbacks, bitwise repeatability)
is skipped when the switch names another device, since CI runs it; ``cuda`` needs a CUDA device and is
skipped without one (tests/test_cuda.py).
"""
import pytest
import torch

import train
from tests.helpers import DEVICE, small_synthetic

MARKERS = {
    "cpu_only": "checks the CPU itself; skipped when DDAE_TEST_DEVICE names another device",
    "cuda": "needs a CUDA device; skipped without one",
}


def pytest_configure(config):
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        pytest.exit(f"DDAE_TEST_DEVICE={DEVICE}: torch sees no CUDA device here; unset it to test on the CPU",
                    returncode=4)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "cpu_only" in item.keywords and DEVICE.type != "cpu":
            item.add_marker(pytest.mark.skip(reason=f"a CPU test; DDAE_TEST_DEVICE={DEVICE} (CI runs it)"))
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(autouse=True, scope="session")
def one_intra_op_thread():
    """The test networks are tiny: one thread runs them fastest, and several threads per process
    only contend on the 2-core CI machine (many times slower when other tests run beside them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_setup():
    """train.py on small synthetic data (tests.helpers.small_synthetic) in place of the 2,000-image default."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "build_dataset", small_synthetic)
        yield
