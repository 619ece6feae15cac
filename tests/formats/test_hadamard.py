import math

import pytest
import torch

from fewer.formats import (hadamard_matrix, inverse_random_hadamard_transform, random_hadamard_transform,
                           random_signs)


@pytest.mark.parametrize("size", [16, 32, 128])
def test_hadamard_is_orthogonal(size):
    h = hadamard_matrix(size, torch.float64) / math.sqrt(size)
    assert torch.allclose(h @ h.t(), torch.eye(size, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("block,dim", [(16, -1), (16, 0), (64, 1), (32, 2)])
def test_inverse_recovers_input(block, dim):
    x = torch.randn(64, 128, 32, generator=torch.Generator().manual_seed(0))
    signs = random_signs(block, seed=3)
    y = random_hadamard_transform(x, signs, block=block, dim=dim)
    assert not torch.allclose(y, x)
    assert torch.allclose(inverse_random_hadamard_transform(y, signs, block=block, dim=dim), x, atol=1e-5)
    assert torch.allclose(y.norm(), x.norm(), rtol=1e-5)       # orthonormal


def test_shared_signs_cancel_in_a_gemm():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(32, 64, generator=g, dtype=torch.float64), torch.randn(48, 64, generator=g, dtype=torch.float64)
    signs = random_signs(16, seed=5).double()
    ra = random_hadamard_transform(a, signs, dim=1)
    rb = random_hadamard_transform(b, signs, dim=1)
    assert torch.allclose(ra @ rb.t(), a @ b.t(), atol=1e-10)


def test_rht_spreads_an_outlier():
    x = torch.zeros(1, 16)
    x[0, 3] = 16.0
    y = random_hadamard_transform(x, random_signs(16, seed=0))
    assert torch.allclose(y.abs(), torch.full((1, 16), 4.0))


def test_errors():
    x = torch.randn(4, 48)
    with pytest.raises(ValueError, match="power of two >= 16"):
        random_hadamard_transform(x, random_signs(8, seed=0), block=8)
    with pytest.raises(ValueError, match="multiple of the block"):
        random_hadamard_transform(x, random_signs(32, seed=0), block=32)
    with pytest.raises(ValueError, match="signs must have shape"):
        random_hadamard_transform(x, random_signs(32, seed=0), block=16)
    with pytest.raises(ValueError, match="exactly one"):
        random_signs(16)
    with pytest.raises(ValueError, match="floating-point"):
        random_hadamard_transform(torch.ones(2, 16, dtype=torch.int32), random_signs(16, seed=0))
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(12)
