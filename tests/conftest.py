import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_each_test():
    """Seed inside each test, so -k selections do not change inputs."""
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """The suite runs tiny models on a small shared CPU, where intra-op threads only contend
    (measured here: a 400-step CNN run went from 31 s to 462 s, a tiny backward from 5 ms to 80 ms)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
