"""A LLaMA-style decoder in one file: RMSNorm, RoPE, SwiGLU, grouped-query attention.

Module names follow Hugging Face's ``LlamaForCausalLM`` (``embed_tokens``, ``layers.N.self_attn.q_proj``,
``mlp.gate_proj``, ``norm``, ``lm_head``) and RoPE uses the same rotate-half convention, so a HF state
dict maps onto this model by dropping the ``model.`` prefix. Every projection is a plain ``nn.Linear``
(converters swap them) and attention goes through ``fewer.attention.sdpa`` (backends plug in there).

    cfg = LlamaConfig.from_preset("tiny")
    model = Llama(cfg)
    logits, loss = model(idx, targets)          # idx, targets: [B, L] int64
    out = model.generate(idx, max_new_tokens=32, temperature=0.8, top_k=50)
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import sdpa
from ..core.config import Config, ConfigError, check_positive_int, check_range
from .layers import RMSNorm


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig(Config):
    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None     # None = n_heads (plain multi-head attention); 1 = multi-query
    ffn_hidden: int | None = None     # None = LLaMA's rule: 2/3 * 4 * dim, rounded up to ffn_multiple_of
    ffn_multiple_of: int = 32
    max_seq_len: int = 128            # length of the precomputed RoPE table
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False      # share embed_tokens and lm_head weights
    init_std: float = 0.02            # N(0, init_std) for weights; residual outputs get / sqrt(2 * n_layers)

    def validate(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_multiple_of", "max_seq_len"):
            check_positive_int(self, name)
        if self.dim % self.n_heads:
            raise ConfigError(f"LlamaConfig.dim={self.dim} is not allowed: expected a multiple of "
                              f"n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"LlamaConfig.dim={self.dim} is not allowed: head dim dim/n_heads={self.head_dim} "
                              "must be even for RoPE")
        if self.n_kv_heads is not None:
            check_positive_int(self, "n_kv_heads")
            if self.n_heads % self.n_kv_heads:
                raise ConfigError(f"LlamaConfig.n_kv_heads={self.n_kv_heads} is not allowed: expected a divisor "
                                  f"of n_heads={self.n_heads}")
        if self.ffn_hidden is not None:
            check_positive_int(self, "ffn_hidden")
        check_range(self, "rope_theta", 0.0, None, low_open=True)
        check_range(self, "norm_eps", 0.0, None, low_open=True)
        check_range(self, "init_std", 0.0, None, low_open=True)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width: explicit ffn_hidden, else 2/3 of 4*dim rounded up to ffn_multiple_of."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = int(2 * (4 * self.dim) / 3)
        return self.ffn_multiple_of * math.ceil(hidden / self.ffn_multiple_of)


# ~0.4M parameters, for CPU tests.
LlamaConfig.register_preset("tiny", vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                            max_seq_len=128, tie_embeddings=True)
# ~4.5M parameters, byte-level; a CPU training run in minutes.
LlamaConfig.register_preset("small", vocab_size=256, dim=256, n_layers=6, n_heads=8, n_kv_heads=4,
                            max_seq_len=256, tie_embeddings=True)
# ~20M parameters; every matmul dimension a multiple of 128 (NVFP4 blocks of 16, 128-wide tiles).
LlamaConfig.register_preset("20m", vocab_size=4096, dim=512, n_layers=6, n_heads=8, n_kv_heads=4,
                            ffn_multiple_of=128, max_seq_len=512, tie_embeddings=True)


# ---------------------------------------------------------------------------------------------
# Rotary position embedding (rotate-half convention, as in HF and GPT-NeoX)
# ---------------------------------------------------------------------------------------------

def rope_table(head_dim: int, max_seq_len: int, theta: float = 10000.0,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * theta**(-2i/head_dim), each [max_seq_len, head_dim] (halves repeated),
    computed in float64 and returned in ``dtype``."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + D/2]) of x [B, H, L, D] by the angles in cos/sin [L, D]; the math runs
    in float32 (float64 for float64 inputs) and the result has x's dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xc, cos, sin = x.to(compute), cos.to(compute), sin.to(compute)
    half = x.shape[-1] // 2
    rotated = torch.cat([-xc[..., half:], xc[..., :half]], dim=-1)
    return (xc * cos + rotated * sin).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------

class KVCache:
    """Keys and values of the tokens seen so far, one (k, v) pair per layer, each [B, H_kv, L, D]."""

    def __init__(self, n_layers: int):
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers

    @property
    def length(self) -> int:
        return self.past_length(0)

    def past_length(self, layer: int) -> int:
        entry = self.layers[layer]
        return 0 if entry is None else entry[0].shape[-2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past = self.layers[layer]
        if past is not None:
            k = torch.cat([past[0], k], dim=-2)
            v = torch.cat([past[1], v], dim=-2)
        self.layers[layer] = (k, v)
        return k, v


class Attention(nn.Module):
    """Causal grouped-query self-attention; the call site is ``fewer.attention.sdpa``."""

    def __init__(self, cfg: LlamaConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        b, length, _ = x.shape
        q = self.q_proj(x).view(b, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.past_length(self.layer_index)
            k, v = cache.update(self.layer_index, k, v)
        gqa = self.n_kv_heads != self.n_heads
        if past == 0:
            out = sdpa(q, k, v, is_causal=True, enable_gqa=gqa)
        elif length == 1:  # one new token sees every cached key
            out = sdpa(q, k, v, enable_gqa=gqa)
        else:  # a chunk after a prefix: causal mask aligned to the bottom right
            keep = torch.ones(length, past + length, dtype=torch.bool, device=x.device).tril(diagonal=past)
            out = sdpa(q, k, v, attn_mask=keep, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, length, self.n_heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_index)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.hidden_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        if not isinstance(cfg, LlamaConfig):
            raise TypeError(f"Llama expects a LlamaConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_table(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, init_std) everywhere; o_proj and down_proj (which write into the residual stream)
        get init_std / sqrt(2 * n_layers), as in GPT-2, so the residual variance stays ~constant."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for block in self.layers:
            nn.init.normal_(block.self_attn.o_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.down_proj.weight, mean=0.0, std=residual_std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, start_pos: int = 0,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, L, vocab] (float32) and, if targets are given, the mean cross-entropy
        (targets == -100 are ignored). ``start_pos`` offsets the RoPE positions; with a ``cache`` the
        offset is the cache length and the new keys/values are appended to it."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be [batch, length] token ids; got shape {tuple(idx.shape)}")
        if cache is not None:
            start_pos = cache.length
        length = idx.shape[1]
        if start_pos < 0 or start_pos + length > self.cfg.max_seq_len:
            raise ValueError(f"positions {start_pos}..{start_pos + length - 1} exceed max_seq_len="
                             f"{self.cfg.max_seq_len}; raise LlamaConfig.max_seq_len")
        cos = self.rope_cos[start_pos:start_pos + length]
        sin = self.rope_sin[start_pos:start_pos + length]
        x = self.embed_tokens(idx)
        for block in self.layers:
            x = block(x, cos, sin, cache)
        logits = self.lm_head(self.norm(x)).float()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (shared tensors once). ``exclude_embeddings`` drops the input embedding
        table unless it is tied to lm_head (then it still does the output matmul)."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and not self.cfg.tie_embeddings:
            total -= self.embed_tokens.weight.numel()
        return total

    def estimate_flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Matmul FLOPs per token (PaLM appendix B): forward = 2 * N_matmul + 4 * n_layers * seq_len * dim,
        where N_matmul counts every nn.Linear weight (lm_head included) and the second term is
        QK^T and PV over the full (not causally halved) context; training = 3 x forward."""
        seq_len = self.cfg.max_seq_len if seq_len is None else seq_len
        n_matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        forward = 2 * n_matmul + 4 * self.cfg.n_layers * seq_len * self.cfg.dim
        return float(3 * forward if training else forward)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
        """Append ``max_new_tokens`` tokens to idx [B, L]. temperature 0 = greedy. With use_cache the
        whole sequence must fit in max_seq_len; without it the context is cropped to the last
        max_seq_len tokens (slower: every step recomputes the context)."""
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
        if top_k is not None and top_k <= 0:
            raise ValueError(f"top_k={top_k} must be a positive integer or None")
        if use_cache and idx.shape[1] + max_new_tokens > self.cfg.max_seq_len:
            raise ValueError(f"prompt ({idx.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len="
                             f"{self.cfg.max_seq_len}; pass use_cache=False to crop the context instead")
        cache = KVCache(self.cfg.n_layers) if use_cache else None
        step_input = idx
        for _ in range(max_new_tokens):
            if not use_cache:
                step_input = idx[:, -self.cfg.max_seq_len:]
            logits, _ = self(step_input, cache=cache)
            next_token = self._pick(logits[:, -1, :], temperature, top_k, generator)
            idx = torch.cat([idx, next_token], dim=1)
            step_input = next_token
        return idx

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_k: int | None,
              generator: torch.Generator | None) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator)
