import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_each_test():
    """Seed inside each test, so -k selections do not change inputs."""
    torch.manual_seed(0)
    yield
