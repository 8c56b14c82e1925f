"""The objective tests run tiny tensors: one intra-op thread is fastest, and on a shared, busy
machine two spinning OpenMP threads per process slow them down several times."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
