import dataclasses

import pytest

from fewer.core import Config, ConfigError, check_choice, check_positive_int, check_range


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inner(Config):
    bits: int = 8


@dataclasses.dataclass(frozen=True, kw_only=True)
class Outer(Config):
    block: int = 64
    mode: str = "fast"
    ratio: float = 0.5
    flag: bool = False
    sizes: tuple[int, ...] = (1, 2)
    inner: Inner = dataclasses.field(default_factory=Inner)

    def validate(self):
        check_positive_int(self, "block", multiple_of=16)
        check_choice(self, "mode", ("fast", "exact"))
        check_range(self, "ratio", 0.0, 1.0, low_open=True)


Outer.register_preset("tiny", block=16, mode="exact")


def test_frozen_and_keyword_only():
    cfg = Outer()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.block = 32
    with pytest.raises(TypeError):
        Outer(64)  # positional arguments are refused


def test_round_trip_through_dict_and_json():
    cfg = Outer(block=32, sizes=(3, 4), inner=Inner(bits=4))
    import json
    again = Outer.from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    assert isinstance(again.sizes, tuple) and isinstance(again.inner, Inner)


@pytest.mark.parametrize("kwargs, words", [
    ({"block": 24}, ["Outer.block=24", "multiple of 16"]),
    ({"block": -16}, ["Outer.block=-16", "positive integer"]),
    ({"mode": "slow"}, ["Outer.mode='slow'", "'fast', 'exact'"]),
    ({"ratio": 0.0}, ["Outer.ratio=0.0", "(0.0, 1.0]"]),
    ({"ratio": float("nan")}, ["Outer.ratio=nan", "finite"]),
    ({"flag": 1}, ["Outer.flag=1", "True or False"]),
    ({"block": "64"}, ["Outer.block='64'", "integer"]),
])
def test_bad_values_name_field_value_and_what_is_allowed(kwargs, words):
    with pytest.raises(ValueError) as info:
        Outer(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_presets():
    cfg = Outer.from_preset("tiny", ratio=0.25)
    assert (cfg.block, cfg.mode, cfg.ratio) == (16, "exact", 0.25)
    assert Outer.presets() == ["tiny"]
    assert Inner.presets() == []  # presets are per class
    with pytest.raises(ConfigError, match="no preset 'huge'.*tiny"):
        Outer.from_preset("huge")
    with pytest.raises(ConfigError):
        Outer.register_preset("bad", block=7)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ConfigError, match="no field.*blok"):
        Outer.from_dict({"blok": 16})
