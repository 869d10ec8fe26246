"""Shared test settings."""
import pytest
import torch

import train
from tests.helpers import small_synthetic


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
