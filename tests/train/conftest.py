import pytest
import torch


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """The train tests use tiny models: on a shared, loaded CPU, intra-op threads only contend
    (a backward pass takes ~80 ms with 2 threads against ~5 ms with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
