import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread_and_seed():
    # One intra-op thread: on a small shared CPU, two threads contending with other jobs run these tiny
    # models several times slower, not faster.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
