"""The GPU kernels divide block maxima by constants with q0 = a * fl(1/c) and one FMA correction
(fewer/formats/_triton_impl.div_by_const); the twin divides (IEEE). Check they agree for every float32 mantissa.

The FMA sequence is simulated exactly in float64: fma(-q0, c, a) = a - q0*c is exact in float64 (24 + 16
significant bits), rounded once to float32; the last fma(r, 1/c, q0) is rounded from float64, so results whose
float64 sum lands within 2^-40 of a float32 rounding boundary are recomputed with fractions. Scaling a by a power of
two scales every step exactly while q0 and the remainder stay normal, so one binade covers every a >= 2^-100.
"""

from fractions import Fraction

import pytest
import torch


def _fma_divide(a: torch.Tensor, c: float) -> torch.Tensor:
    rc = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(c, dtype=torch.float32)
    q0 = a * rc
    r = (a.double() - q0.double() * c).float()
    s = q0.double() + r.double() * rc.double()
    q = s.float()
    up = torch.nextafter(q, torch.tensor(float("inf"))).double()
    down = torch.nextafter(q, torch.tensor(0.0)).double()
    qd = q.double()
    close = ((s - (qd + up) / 2).abs() < s.abs() * 2.0 ** -40) | ((s - (qd + down) / 2).abs() < s.abs() * 2.0 ** -40)
    for i in close.nonzero().flatten().tolist():
        exact = Fraction(q0[i].item()) + Fraction(r[i].item()) * Fraction(rc.item())
        cands = [down[i].item(), qd[i].item(), up[i].item()]
        q[i] = min(cands, key=lambda v: (abs(Fraction(v) - exact),
                                         torch.tensor(v, dtype=torch.float32).view(torch.int32).item() & 1))
    return q


@pytest.mark.parametrize("c", [127.0, 448.0, 57344.0, 2688.0])
def test_division_by_constant_is_ieee_for_every_mantissa(c):
    mant = torch.arange(1 << 23, dtype=torch.int32)
    for biased_exp in (127,):                          # a in [1, 2)
        a = ((biased_exp << 23) | mant).view(torch.float32)
        ref = a / torch.tensor(c, dtype=torch.float32)
        assert torch.equal(_fma_divide(a, c), ref)


@pytest.mark.parametrize("c", [448.0, 57344.0])
def test_division_by_constant_at_the_small_end(c):
    # a in [2^-100, 2^-98) directly (no scaling argument), and the kernel's 2^64 rescue below 2^-100 where the
    # quotient is normal
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 1 << 24, (1 << 20,), generator=g, dtype=torch.int32)
    a = ((27 << 23) + bits).view(torch.float32)        # 2^-100 .. 2^-98
    assert torch.equal(_fma_divide(a, c), a / torch.tensor(c, dtype=torch.float32))
    small = ((19 << 23) + bits).view(torch.float32)   # 2^-108 .. 2^-106: the quotient is normal
    rescued = _fma_divide(small * 2.0 ** 64, c) * 2.0 ** -64
    assert torch.equal(rescued, small / torch.tensor(c, dtype=torch.float32))
