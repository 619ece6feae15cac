import math

import pytest
import torch

from fewer.formats import E2M1, E4M3, E5M2, INT8_ELEMENT, cast_fp8, representable_values, round_to_element
from fewer.formats.rounding import counter_uniform, stream_key, uniform_noise

from .tolerances import BIAS_DETECT_Z, SR_DRAWS, UNBIASED_MAX_MEAN_ABS_Z

ELEMENTS = [INT8_ELEMENT, E4M3, E5M2, E2M1]


@pytest.mark.parametrize("element", ELEMENTS, ids=lambda e: e.name)
@pytest.mark.parametrize("mode", ["nearest", "stochastic"])
def test_every_representable_value_round_trips(element, mode):
    values = representable_values(element)
    noise = torch.rand(values.shape, generator=torch.Generator().manual_seed(0)) if mode == "stochastic" else None
    assert torch.equal(round_to_element(values, element, mode, noise), values)


def test_representable_value_counts():
    assert representable_values(E2M1).numel() == 15           # +-{0.5..6} and 0
    assert representable_values(E4M3).numel() == 2 * 127 - 1  # 127 finite magnitudes incl. 0
    assert representable_values(E5M2).numel() == 2 * 124 - 1
    assert representable_values(INT8_ELEMENT).numel() == 255
    assert representable_values(E4M3).max() == 448 and representable_values(E5M2).max() == 57344


@pytest.mark.parametrize("element", [E4M3, E5M2], ids=lambda e: e.name)
def test_nearest_matches_torch_cast_in_range(element):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20000, generator=g) * torch.exp2(torch.randint(-20, 16, (20000,), generator=g).float())
    x = x.clamp(-element.max_value, element.max_value)
    ours = round_to_element(x, element).to(element.storage)
    assert torch.equal(ours.view(torch.uint8), x.to(element.storage).view(torch.uint8))


def test_e2m1_ties_follow_transformer_engine_thresholds():
    # <=0.25 -> 0, <0.75 -> 0.5, <=1.25 -> 1, <1.75 -> 1.5, <=2.5 -> 2, <3.5 -> 3, <=5 -> 4, >5 -> 6
    a = torch.tensor([0.25, 0.2500001, 0.75, 0.7499999, 1.25, 1.75, 2.5, 3.5, 5.0, 5.0000005, 100.0])
    want = torch.tensor([0.0, 0.5, 1.0, 0.5, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0])
    assert torch.equal(round_to_element(a, E2M1), want)
    assert torch.equal(round_to_element(-a, E2M1), -want)


def test_special_values():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e6, -1e6])
    e4 = round_to_element(x, E4M3)
    assert math.isnan(e4[0]) and e4[1] == 448 and e4[2] == -448 and e4[4] == 448 and e4[5] == -448
    e5 = round_to_element(x, E5M2)
    assert math.isnan(e5[0]) and e5[1] == math.inf and e5[2] == -math.inf and e5[4] == 57344
    for element in (E4M3, E5M2, E2M1):          # -0 keeps its sign bit
        assert torch.signbit(round_to_element(x[3:4], element)).item()
    # torch's own cast (2.13, CPU) differs for E5M2: finite overflow becomes Inf; ours saturates (satfinite)
    assert torch.tensor([1e5]).to(torch.float8_e5m2).float().item() == math.inf
    assert cast_fp8(torch.tensor([1e5]), "e5m2").float().item() == 57344
    assert cast_fp8(torch.tensor([1e6])).float().item() == 448


@pytest.mark.parametrize("element", [E4M3, E5M2], ids=lambda e: e.name)
def test_subnormals(element):
    tiny = element.smallest_subnormal
    x = torch.tensor([tiny, 3 * tiny, tiny / 2, tiny * 0.75, tiny * 1.5])
    want = torch.tensor([tiny, 3 * tiny, 0.0, tiny, 2 * tiny])   # tiny/2 is a tie -> even (0); 1.5 tiny -> 2 tiny
    assert torch.equal(round_to_element(x, element), want)


def _sr_mean_abs_z(quantize_fn, x, grid, draws=SR_DRAWS):
    """Mean |z| of the SR sample mean against x, with SR's exact std sqrt((x - lo)(hi - x))."""
    samples = torch.stack([quantize_fn(x, i) for i in range(draws)])
    lo = grid[torch.searchsorted(grid, x, right=True) - 1]
    hi = grid[torch.searchsorted(grid, x, right=False)]
    std = ((x - lo) * (hi - x)).clamp_min(0).sqrt()
    return ((samples.mean(0) - x).abs() / (std / math.sqrt(draws))).mean().item()


def test_stochastic_rounding_is_unbiased_and_a_biased_one_is_caught():
    x = torch.linspace(0.0123, 5.9, 97)                   # off-grid magnitudes inside E2M1's range
    grid = representable_values(E2M1)
    assert not torch.isin(x, grid).any()

    def sr(v, i):
        return round_to_element(v, E2M1, "stochastic", uniform_noise(v.shape, seed=i))

    def biased(v, i):                                      # noise skewed upward by 0.1: rounds up too often
        return round_to_element(v, E2M1, "stochastic", (uniform_noise(v.shape, seed=i) - 0.1).clamp(0, 1))

    assert _sr_mean_abs_z(sr, x, grid) < UNBIASED_MAX_MEAN_ABS_Z
    assert _sr_mean_abs_z(biased, x, grid) > BIAS_DETECT_Z


def test_stochastic_rounding_needs_exactly_one_source():
    with pytest.raises(ValueError, match="generator"):
        uniform_noise((4,))
    with pytest.raises(ValueError, match="both"):
        uniform_noise((4,), seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="noise"):
        round_to_element(torch.ones(3), E2M1, "stochastic")


def test_generator_and_seed_streams_are_reproducible_and_distinct():
    a = uniform_noise((1000,), generator=torch.Generator().manual_seed(3))
    b = uniform_noise((1000,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    s1, s2 = uniform_noise((1000,), seed=3), uniform_noise((1000,), seed=4)
    assert torch.equal(s1, uniform_noise((1000,), seed=3)) and not torch.equal(s1, s2)
    assert not torch.equal(s1, uniform_noise((1000,), seed=3, stream=1))
    assert 0 <= s1.min() and s1.max() < 1 and abs(s1.mean().item() - 0.5) < 0.03


def test_counter_stream_is_uniform():
    # 8 random bits per element: 256 levels (r + 1/2)/256, each equally likely; neighbours (bytes of one hash word
    # and across words) uncorrelated
    u = counter_uniform(stream_key(11), torch.arange(262144))
    levels = torch.floor(u * 256)
    assert torch.equal(u, (levels + 0.5) / 256)
    hist = torch.bincount(levels.to(torch.int64), minlength=256).float()
    expected = 262144 / 256
    chi2 = ((hist - expected) ** 2 / expected).sum().item()
    assert chi2 < 330                                      # 255 dof: p ~ 0.001
    assert abs(u[:-1].sub(0.5).mul(u[1:].sub(0.5)).mean().item()) < 0.002   # no lag-1 correlation
    assert abs(u[:-4].sub(0.5).mul(u[4:].sub(0.5)).mean().item()) < 0.002   # nor between words


def test_one_hash_word_serves_four_elements_along_the_last_dim():
    from fewer.formats.rounding import SR_BITS, counter_bits, hash32
    key = stream_key(5, 1)
    index = torch.arange(24).view(2, 12) * 7 + 3               # any source indices (e.g. a transposed view)
    u = counter_uniform(key, index)
    for r in range(2):
        for c in range(12):
            word = hash32(torch.tensor((index[r, c - c % 4].item() ^ key) & 0xFFFFFFFF))
            byte = (word >> (SR_BITS * (c % 4))) & 255
            assert u[r, c].item() == (byte.item() + 0.5) / 256
    assert torch.equal(counter_bits(key, index[:, :1], torch.zeros(2, 1)), torch.floor(u[:, :1] * 256).long())


def test_sr_residual_bias_is_below_the_documented_bound():
    """SR with 8 random bits: |E[SR(a)] - a| <= 2^-9 of a grid step, computed exactly over all 256 values of r."""
    from fewer.formats.rounding import SR_BITS, round_magnitude
    g = torch.Generator().manual_seed(0)
    levels = (torch.arange(256, dtype=torch.float32) + 0.5) / 256          # every value of r once: the exact mean
    for element in ELEMENTS:
        grid = representable_values(element)
        grid = grid[grid >= 0]
        lo_idx = torch.randint(0, grid.numel() - 1, (400,), generator=g)
        lo, hi = grid[lo_idx], grid[lo_idx + 1]
        frac = torch.cat([torch.rand(392, generator=g), torch.tensor([0.5, 1 / 512, 3 / 512, 0.25 + 1 / 1024,
                                                                      1 - 1 / 512, 1e-6, 0.999999, 0.75])])
        a = (lo + frac * (hi - lo)).to(torch.float32)
        a = torch.minimum(torch.maximum(a, lo), hi)
        q = round_magnitude(a[:, None].expand(-1, 256), element, "stochastic", levels[None, :].expand(a.numel(), -1))
        assert ((q == lo[:, None]) | (q == hi[:, None])).all()                   # only the two neighbours
        bias = (q.double().mean(1) - a.double()) / (hi - lo).double()
        bound = 2.0 ** -(SR_BITS + 1) + 2.0 ** -16          # + the float32 pre-rounding below the smallest normal
        assert bias.abs().max().item() <= bound, (element.name, bias.abs().max().item())
        # and the rule is centred: over many fractions the residual averages out (not one-sided like truncation)
        assert abs(bias.mean().item()) < 2.0 ** -(SR_BITS + 4)
