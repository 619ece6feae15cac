"""A Diffusion Transformer (DiT, Peebles & Xie 2023) in one file, for images and video token grids.

Layout: images are [N, C, H, W]; video is [N, C, T, H, W] (channels first, then frames, as in Wan's
latents). Each frame is cut into p x p patches (no temporal patching), so a video becomes
T * (H/p) * (W/p) tokens in (t, h, w) order. Positions get a fixed sin-cos embedding (2-D for images,
3-D for video), time a sinusoidal embedding plus an MLP, classes a learned table with one extra
"null" row used for classifier-free guidance. Blocks use adaLN-zero: every residual branch is gated
by a modulation that starts at zero, so a freshly built DiT outputs exactly zero.

Time: ``t`` is a float tensor with one value per sample. The model does not care which schedule it
comes from; with TrigFlow (``fewer.models.denoiser``) t is in [0, pi/2] and the default
``time_scale = 1000 / (pi/2)`` maps it to DiT's usual 0..1000 range before the sinusoid. sCM-style
training that differentiates through time prefers a small scale (c_noise = t): set ``time_scale=1``.

Every projection is a plain ``nn.Linear`` and each attention call site is an ``Attention`` module
(q, k, v, o projections around ``fewer.attention.sdpa``), so converters can swap or wrap them.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..attention import sdpa
from ..core.config import Config, ConfigError, check_positive_int, check_range
from .layers import RMSNorm, sincos_1d


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiTConfig(Config):
    input_size: int = 8          # H = W of the input (pixels or latents)
    frames: int = 1              # 1 = images [N, C, H, W]; > 1 = video [N, C, T, H, W]
    in_channels: int = 1
    patch_size: int = 2
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10        # 0 = unconditional
    class_dropout: float = 0.1   # probability of the null class during training (for CFG)
    qk_norm: bool = False        # RMSNorm on q and k per head (stabilises sCM-style training)
    time_scale: float = 2000.0 / math.pi  # the embedding sees time_scale * t
    time_freq_dim: int = 256     # width of the sinusoidal time features

    def validate(self) -> None:
        for name in ("input_size", "frames", "in_channels", "patch_size", "dim", "depth", "heads", "time_freq_dim"):
            check_positive_int(self, name)
        if self.input_size % self.patch_size:
            raise ConfigError(f"DiTConfig.input_size={self.input_size} is not allowed: expected a multiple of "
                              f"patch_size={self.patch_size}")
        if self.dim % self.heads:
            raise ConfigError(f"DiTConfig.dim={self.dim} is not allowed: expected a multiple of heads={self.heads}")
        if self.dim % 4:
            raise ConfigError(f"DiTConfig.dim={self.dim} is not allowed: expected a multiple of 4 "
                              "(the 2-D sin-cos position embedding splits it in even halves)")
        if self.frames > 1 and self.dim < 12:
            raise ConfigError(f"DiTConfig.dim={self.dim} is not allowed for video (frames={self.frames}): expected "
                              ">= 12 so the 3-D position embedding gives every axis channels")
        if self.time_freq_dim % 2:
            raise ConfigError(f"DiTConfig.time_freq_dim={self.time_freq_dim} is not allowed: expected an even number")
        check_range(self, "mlp_ratio", 0.0, None, low_open=True)
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ConfigError(f"DiTConfig.num_classes={self.num_classes!r} is not allowed: expected an integer >= 0 "
                              "(0 = unconditional)")
        check_range(self, "class_dropout", 0.0, 1.0, high_open=True)
        check_range(self, "time_scale", 0.0, None, low_open=True)

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (T, H/p, W/p)."""
        side = self.input_size // self.patch_size
        return self.frames, side, side

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample: (C, H, W) for images, (C, T, H, W) for video."""
        c, s = self.in_channels, self.input_size
        return (c, s, s) if self.frames == 1 else (c, self.frames, s, s)


# sklearn 8x8 digits: 16 tokens of 2x2 pixels.
DiTConfig.register_preset("digits8", input_size=8, in_channels=1, patch_size=2, dim=128, depth=4, heads=4,
                          num_classes=10)
# MNIST padded to 32x32: 64 tokens of 4x4 pixels.
DiTConfig.register_preset("mnist", input_size=32, in_channels=1, patch_size=4, dim=256, depth=6, heads=8,
                          num_classes=10)
# A video-like token grid: 8 frames of 32x32 (4 latent channels), 8 x 8 x 8 = 512 tokens.
DiTConfig.register_preset("video", input_size=32, frames=8, in_channels=4, patch_size=4, dim=256, depth=4,
                          heads=8, num_classes=0, class_dropout=0.0)


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------

def sincos_position_embedding(dim: int, frames: int, height: int, width: int) -> torch.Tensor:
    """Fixed sin-cos embedding of a (t, h, w) token grid, [frames*height*width, dim], (t, h, w) order.

    Images (frames == 1): half the channels encode h, half w (MAE/DiT). Video: h and w get
    2*(dim//6) channels each and t the rest, so all three axes are resolved.
    """
    tt, hh, ww = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    if frames == 1:
        parts = [sincos_1d(dim // 2, hh.flatten().float()), sincos_1d(dim // 2, ww.flatten().float())]
    else:
        spatial = 2 * (dim // 6)
        parts = [sincos_1d(dim - 2 * spatial, tt.flatten().float()),
                 sincos_1d(spatial, hh.flatten().float()), sincos_1d(spatial, ww.flatten().float())]
    return torch.cat(parts, dim=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of time_scale * t (float64 angles), then Linear-SiLU-Linear."""

    def __init__(self, dim: int, freq_dim: int, time_scale: float):
        super().__init__()
        self.freq_dim, self.time_scale = freq_dim, time_scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = sincos_1d(self.freq_dim, t.to(torch.float64) * self.time_scale)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class table with one extra row (index num_classes) for "no class", used by CFG."""

    def __init__(self, num_classes: int, dim: int, dropout: float):
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        self.table = nn.Embedding(num_classes + 1, dim)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout > 0:
            drop = torch.rand(y.shape, device=y.device) < self.dropout
            y = torch.where(drop, torch.full_like(y, self.null_class), y)
        return self.table(y)


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention over tokens [N, L, dim]; the call site is ``fewer.attention.sdpa``."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = False):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = (proj(x).view(n, length, self.heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = sdpa(self.q_norm(q), self.k_norm(k), v)
        return self.o_proj(out.transpose(1, 2).reshape(n, length, dim))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose norms, residual gates and shifts come from the condition c."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if not isinstance(cfg, DiTConfig):
            raise TypeError(f"DiT expects a DiTConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        p, c = cfg.patch_size, cfg.in_channels
        self.patch_embed = nn.Linear(p * p * c, cfg.dim)   # a linear patchify (same as a stride-p conv)
        self.register_buffer("pos_embed", sincos_position_embedding(cfg.dim, *cfg.grid), persistent=False)
        self.t_embedder = TimestepEmbedder(cfg.dim, cfg.time_freq_dim, cfg.time_scale)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout) if cfg.num_classes else None
        self.blocks = nn.ModuleList(DiTBlock(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.qk_norm) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg.dim, p * p * c)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """DiT's init: xavier-uniform linears with zero bias, N(0, 0.02) for the time MLP and the class
        table, and zeros for every adaLN modulation and the output projection (adaLN-zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(linear.weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for linear in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    @property
    def null_class(self) -> int | None:
        return None if self.y_embedder is None else self.y_embedder.null_class

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- patchify / unpatchify: features of a patch are ordered (p_h, p_w, C) ----
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] or [N, C, T, H, W] -> tokens [N, T*(H/p)*(W/p), p*p*C]."""
        x = self._as_video(x)
        n, c, frames, height, width = x.shape
        p = self.cfg.patch_size
        x = x.reshape(n, c, frames, height // p, p, width // p, p)
        x = x.permute(0, 2, 3, 5, 4, 6, 1)          # N, T, H/p, W/p, p, p, C
        return x.reshape(n, frames * (height // p) * (width // p), p * p * c)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """Inverse of patchify; returns the layout of the input ([N, C, H, W] for images)."""
        n = tokens.shape[0]
        frames, gh, gw = self.cfg.grid
        p, c = self.cfg.patch_size, self.cfg.in_channels
        x = tokens.reshape(n, frames, gh, gw, p, p, c).permute(0, 6, 1, 2, 4, 3, 5)
        x = x.reshape(n, c, frames, gh * p, gw * p)
        return x[:, :, 0] if self.cfg.frames == 1 else x

    def _as_video(self, x: torch.Tensor) -> torch.Tensor:
        expected = self.cfg.input_shape
        if x.dim() != len(expected) + 1 or tuple(x.shape[1:]) != expected:
            layout = "[N, C, H, W]" if self.cfg.frames == 1 else "[N, C, T, H, W]"
            raise ValueError(f"DiT expects input {layout} with per-sample shape {expected}; got {tuple(x.shape)}")
        return x.unsqueeze(2) if self.cfg.frames == 1 else x

    # ---- forward ----
    def condition(self, t: torch.Tensor, y: torch.Tensor | None, batch: int) -> torch.Tensor:
        """The vector c fed to every adaLN: time embedding plus class embedding ([N, dim])."""
        t = torch.as_tensor(t, device=self.pos_embed.device)
        if t.dim() == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must hold one time per sample, shape ({batch},); got {tuple(t.shape)}")
        c = self.t_embedder(t)
        if self.y_embedder is None:
            if y is not None:
                raise ValueError("this DiT is unconditional (num_classes=0) but labels y were given")
            return c
        if y is None:  # no labels: the unconditional (null-class) model
            y = torch.full((batch,), self.null_class, dtype=torch.long, device=c.device)
        if y.shape != (batch,) or y.dtype != torch.long:
            raise ValueError(f"y must be int64 labels of shape ({batch},); got {y.dtype} {tuple(y.shape)}")
        if int(y.min()) < 0 or int(y.max()) > self.null_class:
            raise ValueError(f"labels must lie in [0, {self.cfg.num_classes}] ({self.cfg.num_classes} = null class)")
        return c + self.y_embedder(y)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: [N, C, H, W] (or [N, C, T, H, W]); t: [N] float; y: [N] int64 or None -> same shape as x."""
        tokens = self.patch_embed(self.patchify(x)) + self.pos_embed.to(x.dtype)
        c = self.condition(t, y, x.shape[0]).to(tokens.dtype)
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.unpatchify(self.final_layer(tokens, c))

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                         guidance_scale: float) -> torch.Tensor:
        """Classifier-free guidance: uncond + s * (cond - uncond), both halves in one batch.
        Scale 1 is exactly the conditional output (one forward, no null-class pass)."""
        if self.y_embedder is None:
            raise ValueError("classifier-free guidance needs a class-conditional DiT (num_classes > 0)")
        if y is None:
            raise ValueError("forward_with_cfg needs labels y")
        if guidance_scale == 1.0:
            return self(x, t, y)
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        null = torch.full_like(y, self.null_class)
        both = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = both.chunk(2)
        return uncond + guidance_scale * (cond - uncond)
