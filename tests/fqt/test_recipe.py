import pytest

from fewer.core import ConfigError
from fewer.fqt import PRESETS, OsciResetConfig, OutControlConfig, Recipe, RoleConfig, describe_presets, get_recipe


def test_presets_exist_and_roundtrip():
    assert set(PRESETS) == set(Recipe.presets())
    for name in PRESETS:
        r = get_recipe(name)
        assert r.label == name
        assert Recipe.from_dict(r.to_dict()) == r
    assert len(describe_presets()) == len(PRESETS)


def test_preset_contents():
    nv = get_recipe("nvidia_nvfp4")
    assert nv.w.spec_name == "nvfp4_2d" and nv.w_dgrad.spec_name == "nvfp4_2d"
    assert nv.dy_dgrad.rounding == "stochastic" and not nv.dy_dgrad.hadamard
    assert nv.dy_wgrad.hadamard and nv.x_wgrad.hadamard and nv.x_wgrad.rounding == "nearest"
    assert nv.x_wgrad.source == "master" and nv.hadamard_signs == "fixed" and nv.bf16_last_fraction > 0
    tj = get_recipe("tetrajet_v2")
    for role in ("x", "w"):
        assert getattr(tj, role).spec_name == "nvfp4_double" and getattr(tj, role).rounding == "nearest"
    for role in ("dy_dgrad", "w_dgrad", "dy_wgrad", "x_wgrad"):
        rc = getattr(tj, role)
        assert rc.spec_name == "nvfp4_double" and rc.rounding == "stochastic" and rc.hadamard
    assert tj.w_dgrad.source == tj.x_wgrad.source == "forward"
    assert get_recipe("tetrajet_v2_released").dy_dgrad.formats_scale_rounding in (None, "nearest")
    full = get_recipe("tetrajet_v2_full")
    assert full.outcontrol.enabled and full.oscireset.enabled
    assert (full.outcontrol.ratio, full.outcontrol.record_start, full.outcontrol.record_iters) == (0.1, 501, 50)
    assert (full.oscireset.window, full.oscireset.threshold, full.oscireset.period) == (50, 8.0, 200)
    naive = get_recipe("nvfp4_naive")
    assert all(getattr(naive, r).spec_name == "nvfp4" and getattr(naive, r).rounding == "nearest"
               for r in ("x", "w", "dy_dgrad", "w_dgrad", "dy_wgrad", "x_wgrad"))
    assert not get_recipe("bf16").quantizes


def test_shorthands():
    assert RoleConfig(format="nvfp4_2d") == RoleConfig(format="nvfp4", block="16x16")
    assert RoleConfig(format="nvfp4_double") == RoleConfig(format="nvfp4", second_level="outer128")


@pytest.mark.parametrize("make, match", [
    (lambda: get_recipe("nope"), "unknown recipe preset"),
    (lambda: Recipe.from_preset("nope"), "no preset"),
    (lambda: OsciResetConfig(threshold=0.5), "threshold"),
    (lambda: OsciResetConfig(threshold=float("nan")), "threshold"),
    (lambda: OsciResetConfig(start_fraction=1.5), "start_fraction"),
    (lambda: OsciResetConfig(window=0), "window"),
    (lambda: OsciResetConfig(window=200, period=200), "window"),
    (lambda: OsciResetConfig(offset=300), "offset"),
    (lambda: OutControlConfig(ratio=0.0), "ratio"),
    (lambda: OutControlConfig(ratio=1.0), "ratio"),
    (lambda: OutControlConfig(granularity=48), "granularity"),
    (lambda: RoleConfig(format="nvfp5"), "format"),
    (lambda: RoleConfig(format="nvfp4", block="16x16", second_level="outer128"), "16x16"),
    (lambda: RoleConfig(format="nvfp4", headroom=1.2), "headroom"),
    (lambda: RoleConfig(format="nvfp4", headroom=17 / 16, scale_rounding="up"), "choose one"),
    (lambda: RoleConfig(format="mxfp8", block="16x16"), "block"),
    (lambda: RoleConfig(format="bf16", rounding="stochastic"), "bf16"),
    (lambda: Recipe(dy_wgrad=RoleConfig(format="nvfp4", hadamard=True)), "Hadamard"),
    (lambda: Recipe(x_wgrad=RoleConfig(format="nvfp4", source="forward")), "forward"),
    (lambda: Recipe(x=RoleConfig(format="nvfp4", source="forward")), "source"),
    (lambda: Recipe(oscireset=OsciResetConfig(enabled=True)), "oscireset"),
    (lambda: Recipe(hadamard_signs="sometimes"), "hadamard_signs"),
    (lambda: Recipe(keep_bf16="lm_head"), "keep_bf16"),
    (lambda: get_recipe("tetrajet_v2").with_roles(("dz",), rounding="nearest"), "unknown role"),
])
def test_bad_configs_raise(make, match):
    with pytest.raises(ConfigError, match=match):
        make()
