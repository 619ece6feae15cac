import math

import pytest
import torch

from fewer.attention import use_backend
from fewer.core import ConfigError
from fewer.models import DiT, DiTConfig
from fewer.models.dit import sincos_position_embedding

from .tolerances import TOLERANCES

IMAGE = dict(input_size=12, in_channels=3, patch_size=3, dim=48, depth=2, heads=4, num_classes=7)
VIDEO = dict(input_size=8, frames=3, in_channels=2, patch_size=4, dim=48, depth=2, heads=4, num_classes=0,
             class_dropout=0.0)


def _randomised(cfg: DiTConfig) -> DiT:
    """A DiT whose zero-initialised layers are filled with noise, so outputs depend on every input."""
    torch.manual_seed(0)
    model = DiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_fresh_dit_outputs_exactly_zero_and_has_right_shapes():
    for cfg in (DiTConfig(**IMAGE), DiTConfig(**VIDEO)):
        model = DiT(cfg)
        x = torch.randn(2, *cfg.input_shape)
        y = torch.randint(0, 7, (2,)) if cfg.num_classes else None
        out = model(x, torch.rand(2) * math.pi / 2, y)
        assert out.shape == x.shape
        assert torch.equal(out, torch.zeros_like(out))  # adaLN-zero: gates and output layer start at 0
    assert DiTConfig(**VIDEO).input_shape == (2, 3, 8, 8) and DiTConfig(**VIDEO).num_tokens == 3 * 2 * 2


def test_presets_build_and_run():
    for name in DiTConfig.presets():
        cfg = DiTConfig.from_preset(name)
        model = DiT(cfg)
        x = torch.randn(1, *cfg.input_shape)
        y = torch.zeros(1, dtype=torch.long) if cfg.num_classes else None
        assert model(x, torch.ones(1), y).shape == x.shape


@pytest.mark.parametrize("cfg", [IMAGE, VIDEO])
def test_patchify_roundtrip_and_patch_locality(cfg):
    model = DiT(DiTConfig(**cfg))
    x = torch.randn(2, *model.cfg.input_shape)
    tokens = model.patchify(x)
    assert tokens.shape == (2, model.cfg.num_tokens, cfg["patch_size"] ** 2 * cfg["in_channels"])
    assert torch.equal(model.unpatchify(tokens), x)
    # token 0 holds exactly the top-left p x p patch of the first frame
    p = cfg["patch_size"]
    first = x[..., :p, :p] if model.cfg.frames == 1 else x[:, :, 0, :p, :p]
    assert torch.equal(tokens[:, 0].sort(dim=-1).values, first.flatten(1).sort(dim=-1).values)


def test_position_embedding_is_distinct_per_token():
    for frames in (1, 3):
        emb = sincos_position_embedding(48, frames, 4, 5)
        assert emb.shape == (frames * 20, 48)
        assert torch.cdist(emb, emb).add(torch.eye(frames * 20) * 10).min() > 1e-3


def test_output_depends_on_time_class_and_every_token():
    model = _randomised(DiTConfig(**IMAGE))
    x = torch.randn(2, 3, 12, 12)
    t = torch.tensor([0.3, 1.2])
    y = torch.tensor([1, 5])
    base = model(x, t, y)
    assert not torch.allclose(base, model(x, t + 0.1, y))
    assert not torch.allclose(base, model(x, t, torch.tensor([2, 2])))
    moved = x.clone()
    moved[:, :, -1, -1] += 1.0  # one pixel in the last patch changes every output token (attention)
    assert (model(moved, t, y) - base).flatten(2).abs().amax(dim=1).gt(0).all()


def test_samples_in_a_batch_are_independent():
    model = _randomised(DiTConfig(**VIDEO))
    x = torch.randn(3, *model.cfg.input_shape)
    t = torch.tensor([0.1, 0.7, 1.5])
    together = model(x, t)
    alone = torch.cat([model(x[i:i + 1], t[i:i + 1]) for i in range(3)])
    assert torch.allclose(together, alone, atol=TOLERANCES["batch_invariance_atol"])


def test_cfg_scale_one_is_conditional_and_formula_holds():
    model = _randomised(DiTConfig(**IMAGE))
    x, t, y = torch.randn(3, 3, 12, 12), torch.rand(3), torch.tensor([0, 3, 6])
    cond = model(x, t, y)
    uncond = model(x, t, torch.full_like(y, model.null_class))
    assert torch.equal(model.forward_with_cfg(x, t, y, 1.0), cond)
    assert torch.equal(model(x, t, None), uncond)  # no labels = the null class
    guided = model.forward_with_cfg(x, t, y, 3.0)
    assert torch.allclose(guided, uncond + 3.0 * (cond - uncond), atol=TOLERANCES["cfg_atol"])
    assert torch.allclose(model.forward_with_cfg(x, t, y, 0.0), uncond, atol=TOLERANCES["cfg_atol"])


def test_class_dropout_only_in_training():
    model = _randomised(DiTConfig(**{**IMAGE, "class_dropout": 0.5}))
    x, t, y = torch.randn(64, 3, 12, 12), torch.rand(64), torch.randint(0, 7, (64,))
    uncond = model(x, t, torch.full_like(y, model.null_class))
    cond = model(x, t, y)
    model.train()
    torch.manual_seed(1)
    mixed = model(x, t, y)
    dropped = (mixed - uncond).flatten(1).abs().amax(1) < 1e-5
    kept = (mixed - cond).flatten(1).abs().amax(1) < 1e-5
    assert bool((dropped | kept).all()) and 10 < int(dropped.sum()) < 54


def test_attention_routes_through_fewer_sdpa():
    model = _randomised(DiTConfig(**{**VIDEO, "qk_norm": True}))
    x, t = torch.randn(2, *model.cfg.input_shape), torch.rand(2)
    default = model(x, t)
    with use_backend("reference"):
        reference = model(x, t)
    assert torch.allclose(default, reference, atol=TOLERANCES["fp32_same_math_atol"])
    with use_backend("math"):
        assert torch.allclose(model(x, t), default, atol=TOLERANCES["fp32_same_math_atol"])
    names = [n for n, m in model.named_modules() if type(m).__name__ == "Attention"]
    assert names == ["blocks.0.attn", "blocks.1.attn"]


def test_training_steps_reduce_loss():
    model = DiT(DiTConfig(**IMAGE)).train()
    x, t, y = torch.randn(8, 3, 12, 12), torch.rand(8), torch.randint(0, 7, (8,))
    target = torch.sin(x) * 0.5
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(10):
        loss = (model(x, t, y) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < TOLERANCES["train_loss_ratio"] * losses[0]


@pytest.mark.parametrize("overrides, field, message", [
    ({"input_size": 13}, "input_size", "multiple of patch_size"),
    ({"dim": 50}, "dim", "multiple of heads"),
    ({"dim": 18, "heads": 3}, "dim", "multiple of 4"),
    ({"dim": 8, "heads": 2, "frames": 2}, "dim", ">= 12"),
    ({"num_classes": -1}, "num_classes", "integer >= 0"),
    ({"class_dropout": 1.0}, "class_dropout", r"\[0.0, 1.0\)"),
    ({"mlp_ratio": 0.0}, "mlp_ratio", r"\(0.0, inf\)"),
    ({"patch_size": 0}, "patch_size", "positive integer"),
    ({"qk_norm": "yes"}, "qk_norm", "True or False"),
])
def test_bad_configs_name_the_field(overrides, field, message):
    with pytest.raises(ConfigError, match=message) as err:
        DiTConfig(**{**IMAGE, **overrides})
    assert f"DiTConfig.{field}=" in str(err.value)


def test_bad_inputs_are_rejected():
    model = DiT(DiTConfig(**IMAGE))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        model(torch.randn(2, 3, 10, 10), torch.rand(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="one time per sample"):
        model(torch.randn(2, 3, 12, 12), torch.rand(3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must lie"):
        model(torch.randn(2, 3, 12, 12), torch.rand(2), torch.tensor([0, 8]))
    video = DiT(DiTConfig(**VIDEO))
    with pytest.raises(ValueError, match="unconditional"):
        video(torch.randn(1, 2, 3, 8, 8), torch.rand(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="class-conditional"):
        video.forward_with_cfg(torch.randn(1, 2, 3, 8, 8), torch.rand(1), torch.zeros(1, dtype=torch.long), 2.0)
    with pytest.raises(ValueError, match=r"\[N, C, T, H, W\]"):
        video(torch.randn(1, 3, 2, 8, 8), torch.rand(1))
