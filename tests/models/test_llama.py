import math

import pytest
import torch

from fewer.attention import use_backend
from fewer.core import ConfigError
from fewer.models import KVCache, Llama, LlamaConfig
from fewer.models.llama import apply_rope, rope_table

from .tolerances import TOLERANCES

TINY = dict(vocab_size=61, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=40)


def _model(**overrides) -> Llama:
    torch.manual_seed(0)
    return Llama(LlamaConfig(**{**TINY, **overrides})).eval()


def test_shapes_and_loss():
    model = _model()
    idx = torch.randint(0, 61, (3, 17))
    logits, loss = model(idx)
    assert logits.shape == (3, 17, 61) and logits.dtype == torch.float32 and loss is None
    _, loss = model(idx, idx)
    # a fresh model is close to uniform over the vocabulary
    assert abs(loss.item() - math.log(61)) < 0.5


def test_presets_and_hidden_dim():
    assert LlamaConfig(dim=128, ffn_multiple_of=32).hidden_dim == 352  # 2/3 * 512 = 341 -> 352
    assert LlamaConfig(dim=64, ffn_hidden=100).hidden_dim == 100
    counts = {name: Llama(LlamaConfig.from_preset(name)).num_params() for name in ("tiny", "small")}
    assert 0.3e6 < counts["tiny"] < 0.7e6 and 3e6 < counts["small"] < 7e6
    big = LlamaConfig.from_preset("20m")
    assert all(v % 128 == 0 for v in (big.dim, big.hidden_dim, big.kv_heads * big.head_dim, big.vocab_size))


def test_num_params_and_flops_formula():
    model = _model(tie_embeddings=False)
    cfg = model.cfg
    per_layer = (cfg.dim * cfg.dim * 2 + cfg.dim * cfg.kv_heads * cfg.head_dim * 2 + 3 * cfg.dim * cfg.hidden_dim
                 + 2 * cfg.dim)
    expected = cfg.n_layers * per_layer + 2 * cfg.vocab_size * cfg.dim + cfg.dim
    assert model.num_params() == expected
    assert model.num_params(exclude_embeddings=True) == expected - cfg.vocab_size * cfg.dim
    linear = expected - cfg.vocab_size * cfg.dim - (2 * cfg.n_layers + 1) * cfg.dim
    assert model.estimate_flops_per_token(seq_len=10, training=False) == 2 * linear + 4 * cfg.n_layers * 10 * cfg.dim
    tied = _model(tie_embeddings=True)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert tied.num_params() == expected - cfg.vocab_size * cfg.dim


def test_causal_future_tokens_do_not_change_past_logits():
    model = _model()
    idx = torch.randint(0, 61, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 7) % 61
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_gqa_equals_mha_with_repeated_kv_weights():
    gqa = _model(n_heads=4, n_kv_heads=2)
    mha = _model(n_heads=4, n_kv_heads=None)
    state = gqa.state_dict()
    head_dim = gqa.cfg.head_dim
    for key, value in list(state.items()):
        if key.endswith(("k_proj.weight", "v_proj.weight")):  # [H_kv * D, dim] -> [H * D, dim]
            heads = value.view(2, head_dim, -1).repeat_interleave(2, dim=0)
            state[key] = heads.reshape(4 * head_dim, -1)
    mha.load_state_dict(state)
    idx = torch.randint(0, 61, (2, 19))
    out_gqa, _ = gqa(idx)
    out_mha, _ = mha(idx)
    assert torch.allclose(out_gqa, out_mha, atol=TOLERANCES["fp32_same_math_atol"])


def test_rope_depends_only_on_relative_position():
    head_dim = 16
    cos, sin = rope_table(head_dim, 64, theta=10000.0, dtype=torch.float64)
    q = torch.randn(1, 1, 1, head_dim, dtype=torch.float64)
    k = torch.randn(1, 1, 1, head_dim, dtype=torch.float64)

    def score(m, n):
        return float((apply_rope(q, cos[m:m + 1], sin[m:m + 1]) * apply_rope(k, cos[n:n + 1], sin[n:n + 1])).sum())

    assert abs(score(9, 4) - score(35, 30)) < TOLERANCES["rope_relative_atol"]
    assert abs(score(9, 4) - score(9, 5)) > 1e-3
    # a rotation keeps the norm
    assert torch.allclose(apply_rope(q, cos[7:8], sin[7:8]).norm(), q.norm())


def test_position_offset_leaves_logits_unchanged():
    """Attention sees only relative positions, so shifting every position changes nothing."""
    model = _model()
    idx = torch.randint(0, 61, (2, 15))
    a, _ = model(idx)
    b, _ = model(idx, start_pos=11)
    assert torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(idx, start_pos=30)


def test_kv_cache_matches_full_forward():
    model = _model()
    idx = torch.randint(0, 61, (2, 23))
    full, _ = model(idx)
    cache = KVCache(model.cfg.n_layers)
    parts = [model(idx[:, :9], cache=cache)[0], model(idx[:, 9:10], cache=cache)[0], model(idx[:, 10:], cache=cache)[0]]
    assert cache.length == 23
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=TOLERANCES["fp32_same_math_atol"])


def test_generate_cache_and_no_cache_agree_and_seeded_sampling_repeats():
    model = _model()
    prompt = torch.randint(0, 61, (2, 5))
    greedy = model.generate(prompt, 12, temperature=0)
    assert greedy.shape == (2, 17) and torch.equal(greedy[:, :5], prompt)
    assert torch.equal(greedy, model.generate(prompt, 12, temperature=0, use_cache=False))
    a = model.generate(prompt, 12, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 12, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="use_cache=False"):
        model.generate(prompt, 40)
    longer = model.generate(prompt, 40, temperature=0, use_cache=False)  # crops the context
    assert longer.shape == (2, 45)


def test_top_k_restricts_choices():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0, 3.0]])
    picks = {int(Llama._pick(logits, 1.0, 2, torch.Generator().manual_seed(s))) for s in range(50)}
    assert picks == {1, 2}


def test_training_steps_reduce_loss():
    model = _model().train()
    idx = torch.randint(0, 61, (4, 24))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < TOLERANCES["train_loss_ratio"] * losses[0]


def test_attention_routes_through_fewer_sdpa():
    model = _model()
    idx = torch.randint(0, 61, (2, 13))
    default, _ = model(idx)
    with use_backend("reference"):
        reference, _ = model(idx)
    assert torch.allclose(default, reference, atol=TOLERANCES["fp32_same_math_atol"])
    calls = []
    from fewer.attention import dispatch

    original = dispatch._REGISTRY["reference"]
    dispatch.register_backend("reference", lambda *a: calls.append(1) or original.fn(*a), original.check,
                              description=original.description)
    try:
        with use_backend("reference"):
            model(idx)
    finally:
        dispatch._REGISTRY["reference"] = original
    assert len(calls) == model.cfg.n_layers


@pytest.mark.parametrize("field, value, message", [
    ("dim", 50, "multiple of n_heads"),
    ("n_kv_heads", 3, "divisor of n_heads"),
    ("dim", 12, "must be even for RoPE"),   # 12 / 4 heads = 3
    ("vocab_size", 0, "positive integer"),
    ("rope_theta", -1.0, "rope_theta"),
    ("tie_embeddings", 1, "True or False"),
])
def test_bad_configs_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message) as err:
        LlamaConfig(**{**TINY, field: value})
    assert field in str(err.value) or "dim" in str(err.value)


def test_bad_inputs():
    model = _model()
    with pytest.raises(ValueError, match="batch, length"):
        model(torch.randint(0, 61, (5,)))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 3, temperature=-1)
    with pytest.raises(TypeError, match="LlamaConfig"):
        Llama({"dim": 8})
