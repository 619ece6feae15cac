import math

import pytest
import torch

from fewer.core import (AUTO, BackendUnavailable, Capability, MissingDependency, cos_sim, deterministic,
                        has_cuda, has_module, per_sample_generators, randn_per_sample, rel_l1, require,
                        resolve_backend, rmse, seed_everything, sqnr_db)


def test_capabilities_return_ok_and_reason():
    for cap in (has_cuda(), has_module("torch"), has_module("surely_not_a_module_xyz")):
        ok, reason = cap
        assert isinstance(ok, bool) and reason
    assert not has_module("surely_not_a_module_xyz")


def test_resolve_backend_auto_explicit_and_unavailable():
    cands = {"fast": lambda: Capability(False, "no GPU here"), "slow": lambda: Capability(True, "ok")}
    assert resolve_backend("op", AUTO, cands) == "slow"
    assert resolve_backend("op", "slow", cands) == "slow"
    with pytest.raises(BackendUnavailable, match="'fast' cannot run here: no GPU here"):
        resolve_backend("op", "fast", cands)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        resolve_backend("op", "nope", cands)
    with pytest.raises(BackendUnavailable, match="no backend can run"):
        resolve_backend("op", AUTO, {"fast": cands["fast"]})


def test_numerics_against_hand_computed_values():
    ref = torch.tensor([1.0, -2.0, 3.0, 4.0])
    out = torch.tensor([1.0, -2.0, 3.0, 5.0])
    assert rel_l1(out, ref) == pytest.approx(1 / 10)
    assert rmse(out, ref) == pytest.approx(0.5)
    assert sqnr_db(out, ref) == pytest.approx(10 * math.log10(30 / 1))
    assert cos_sim(out, ref) == pytest.approx(float(out @ ref / (out.norm() * ref.norm())))
    assert sqnr_db(ref, ref) == math.inf
    assert cos_sim(-ref, ref) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        rel_l1(out, ref[:3])


def test_seeding_is_reproducible_and_validated():
    seed_everything(3)
    a = torch.randn(4)
    seed_everything(3)
    assert torch.equal(a, torch.randn(4))
    with pytest.raises(ValueError, match="non-negative integer"):
        seed_everything(-1)


def test_per_sample_noise_does_not_depend_on_batch():
    full = randn_per_sample(per_sample_generators(range(4)), (3,))
    part = randn_per_sample(per_sample_generators([2, 3]), (3,))
    assert torch.equal(full[2:], part)


def test_deterministic_restores_state():
    before = torch.are_deterministic_algorithms_enabled()
    with deterministic():
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() == before


def test_missing_optional_dependency_names_the_extra():
    with pytest.raises(MissingDependency, match=r"pip install 'fewer\[all\]'"):
        require("surely_not_a_module_xyz")
