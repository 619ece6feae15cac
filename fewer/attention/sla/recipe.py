"""The SLA fine-tuning recipe (issue 5, item 4): dense DiT -> sparse-only / linear-only / SLA.

    from fewer.attention.sla.recipe import SLARecipeConfig, run_sla_recipe, summarize
    rows = run_sla_recipe(SLARecipeConfig.from_preset("cpu-video"))  # one row per (method, sparsity, seed)
    table = summarize(rows)                                          # mean and std over seeds

    python -m fewer.attention.sla.recipe --preset cpu-mnist16 --out benchmarks/results/cpu/sla_recipe_mnist16
    python -m fewer.attention.sla.recipe --preset cpu-video --out benchmarks/results/cpu/sla_recipe_video

Steps: train one dense class-conditional DiT (the teacher) with the TrigFlow flow-matching loss;
for every method, sparsity and seed, convert a copy and fine-tune it for the same number of steps,
lr and loss: ``loss="data"`` (flow matching on data, the paper's black-box recipe) or
``loss="teacher"`` (MSE to the frozen dense teacher's output at the same noisy input, label and
time: TurboDiffusion's recipe); sample every model from the same noise and score the samples with
the digit classifier (class accuracy, Frechet distance against the real test set) and against the
teacher's own samples (PSNR, SSIM). Video clips are scored frame by frame. Each converted model also
reports ``proj_norm`` (Frobenius norm of the SLA projections) and ``linear_share``
(||proj(O_l)|| / ||O|| on a fixed noisy batch): how much the linear branch contributes. Methods:

- ``dense``: no conversion (fine-tuning alone, the reference row; with the teacher loss it is the
  teacher itself: zero loss, zero gradients);
- ``sparse-only``: the same critical blocks as SLA, no linear branch (the marginal blocks are
  declared negligible, so the linear part is exactly zero);
- ``linear-only``: linear attention with phi over all tokens, no softmax part (one run per seed,
  reported at sparsity 1: it has no softmax part to sparsify);
- ``sla``: critical blocks by softmax, the rest by linear attention through the zero-initialised
  projection (``linear_scope`` "complement" as the paper, or "all" as the official main branch).

Data sets: ``mnist16`` / ``mnist32`` / ``digits`` images, and ``video``: clips of ``frames`` frames
of one scikit-learn digit moving over a 16x16 canvas (``fewer.data.video.moving_digits``), labelled
by the digit.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...core.config import Config, ConfigError, check_choice, check_positive_int, check_range
from ...core.seed import per_sample_generators, randn_per_sample
from ...models.denoiser import LogNormalTime, TrigFlowDenoiser, flow_matching_steps, noisy_sample, sample_ode
from ...models.dit import Attention, DiT, DiTConfig
from .config import SLAConfig
from .module import convert_to_sla_, projection_parameters, sla_modules
from .reference import linear_only_reference, sla_parts_reference

METHODS = ("dense", "sparse-only", "linear-only", "sla")
DATASETS = ("digits", "mnist16", "mnist32", "video")
LOSSES = ("data", "teacher")
METRICS = ("class_accuracy", "frechet_distance", "psnr", "ssim", "final_loss", "skipped_updates", "softmax_density",
           "proj_norm", "linear_share")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SLARecipeConfig(Config):
    """What the recipe trains and measures.

    The DiT sees ``(image side / patch_size)^2`` tokens; SLA groups them in blocks of ``block``
    tokens, and a sparsity s keeps floor((1 - s) * blocks) >= 1 critical key blocks per query
    block, so 90% and 95% need about 20 or more key blocks per row.
    """

    dataset: str = "mnist16"          # "digits" (8x8), "mnist16" (MNIST averaged to 16x16), "mnist32" (padded),
                                      # "video" (moving 8x8 digits on a 16x16 canvas, ``frames`` frames)
    frames: int = 8                   # video only: frames per clip (tokens = frames * (16 / patch_size)^2)
    video_train: int = 6000           # video only: clips generated for training
    video_test: int = 2000            # video only: test clips (the real set of the Frechet distance)
    dim: int = 64
    depth: int = 3
    heads: int = 2
    patch_size: int = 2
    block: int = 2                    # SLA block_q = block_k (tokens)
    teacher_steps: int = 3000
    teacher_lr: float = 2e-3
    finetune_steps: int = 150
    finetune_lr: float = 5e-4
    loss: str = "data"                # fine-tuning loss: "data" (flow matching on data) or "teacher" (MSE to the
                                      # frozen dense teacher's output at the same noisy input, as TurboDiffusion)
    linear_scope: str = "complement"  # SLA's linear branch: "complement" (paper) or "all" (official main branch)
    batch_size: int = 64              # the teacher's batch, and fine-tuning's unless finetune_batch is set
    finetune_batch: int = 0           # 0: batch_size
    methods: tuple[str, ...] = METHODS
    sparsities: tuple[float, ...] = (0.90, 0.95)
    seeds: tuple[int, ...] = (0, 1, 2)
    feature_map: str = "softmax"      # phi of the linear branch (SLA and linear-only)
    classifier_steps: int = 400
    num_samples: int = 200            # class-balanced samples per model, from the same noise for every model
    sample_steps: int = 8             # Heun steps (2 * steps - 1 network calls)
    guidance_scale: float = 2.0
    sigma_d: float = 0.5
    teacher_cache: str = ""           # a .pt path: reuse the teacher trained with the same settings

    def validate(self) -> None:
        check_choice(self, "dataset", DATASETS)
        check_choice(self, "loss", LOSSES)
        if isinstance(self.finetune_batch, bool) or not isinstance(self.finetune_batch, int) or self.finetune_batch < 0:
            raise ConfigError(f"SLARecipeConfig.finetune_batch={self.finetune_batch!r} is not allowed: expected an "
                              "integer >= 0 (0 = batch_size)")
        check_choice(self, "linear_scope", ("complement", "all"))
        for name in ("dim", "depth", "heads", "patch_size", "block", "teacher_steps", "finetune_steps",
                     "batch_size", "classifier_steps", "num_samples", "sample_steps", "frames", "video_train",
                     "video_test"):
            check_positive_int(self, name)
        for name in ("teacher_lr", "finetune_lr", "sigma_d"):
            check_range(self, name, 0.0, None, low_open=True)
        check_range(self, "guidance_scale", 0.0, None)
        check_choice(self, "feature_map", ("softmax", "elu", "relu"))
        if not self.methods or any(m not in METHODS for m in self.methods):
            raise ConfigError(f"SLARecipeConfig.methods={self.methods!r} is not allowed: expected a non-empty "
                              f"tuple drawn from {METHODS}")
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ConfigError(f"SLARecipeConfig.seeds={self.seeds!r} is not allowed: expected a non-empty tuple "
                              "of integers >= 0")
        if not self.sparsities or any(not 0.0 < s < 1.0 for s in self.sparsities):
            raise ConfigError(f"SLARecipeConfig.sparsities={self.sparsities!r} is not allowed: expected a "
                              "non-empty tuple of fractions in (0, 1)")
        side = self.image_size
        if side % self.patch_size:
            raise ConfigError(f"SLARecipeConfig.patch_size={self.patch_size} is not allowed: the {self.dataset} "
                              f"images are {side}x{side}; expected a divisor of {side}")
        tokens = (self.frames if self.dataset == "video" else 1) * (side // self.patch_size) ** 2
        if self.block > tokens:
            raise ConfigError(f"SLARecipeConfig.block={self.block} is not allowed: the DiT sees only {tokens} "
                              "tokens; expected a block no larger than that")
        if self.dim % self.heads or self.dim % 4:
            raise ConfigError(f"SLARecipeConfig.dim={self.dim} is not allowed: expected a multiple of 4 and of "
                              f"heads={self.heads}")

    @property
    def image_size(self) -> int:
        return {"digits": 8, "mnist16": 16, "mnist32": 32, "video": 16}[self.dataset]

    @property
    def key_blocks(self) -> int:
        return math.ceil(self.dit_config().num_tokens / self.block)

    def dit_config(self) -> DiTConfig:
        return DiTConfig(input_size=self.image_size, frames=self.frames if self.dataset == "video" else 1,
                         in_channels=1, patch_size=self.patch_size, dim=self.dim, depth=self.depth, heads=self.heads,
                         num_classes=10)

    def sla_config(self, sparsity: float, method: str) -> SLAConfig:
        """sla: critical = floor((1 - sparsity) * blocks) >= 1 top blocks, linear over all the rest;
        sparse-only: the same critical blocks, every other block negligible (skipped). The fractions
        are given as exact block ratios so that floor() cannot leave a stray marginal block."""
        blocks = self.key_blocks
        critical = max(1, math.floor((1.0 - sparsity) * blocks + 1e-9))
        negligible = (blocks - critical) / blocks if method == "sparse-only" else 0.0
        scope = self.linear_scope if method == "sla" else "complement"
        return SLAConfig(block_q=self.block, block_k=self.block, topk=critical / blocks, negligible=negligible,
                         feature_map=self.feature_map, linear_scope=scope, backend="reference")


# What was run on this 2-core CPU: MNIST 16x16, patch 2 -> 64 tokens, blocks of 2 -> 32 key blocks per row.
SLARecipeConfig.register_preset("cpu")
# The fair test (issue 5 item 4), both data sets: 64 key blocks per row, so 90% keeps 6 and 95% keeps 3;
# every arm distils from the frozen dense teacher (TurboDiffusion's loss) for the same 200 steps at
# batch 32 and lr 1e-3. Images: MNIST 16x16, patch 2 -> 64 tokens, 1-token blocks (the teacher of the
# "cpu" preset). Video: 8 frames of one moving 8x8 digit on 16x16, patch 4 -> 128 tokens, 2-token
# blocks (4 tokens = one row of a frame's token grid).
_FAIR = dict(loss="teacher", finetune_batch=32, finetune_steps=200, finetune_lr=1e-3, sample_steps=6)
SLARecipeConfig.register_preset("cpu-mnist16", block=1, **_FAIR)
SLARecipeConfig.register_preset("cpu-video", dataset="video", frames=8, patch_size=4, block=2, teacher_steps=2000,
                                num_samples=100, **_FAIR)
# Seconds-long, for tests: 8x8 digits, patch 1 -> 64 tokens in 32 blocks, a one-block DiT.
SLARecipeConfig.register_preset("smoke", dataset="digits", dim=16, depth=1, heads=2, patch_size=1, block=2,
                                teacher_steps=4, finetune_steps=2, batch_size=8, sparsities=(0.9,), seeds=(0,),
                                classifier_steps=5, num_samples=20, sample_steps=1)
# Seconds-long video, for tests: 2 frames of 16x16, patch 4 -> 32 tokens in 16 blocks, teacher loss.
SLARecipeConfig.register_preset("smoke-video", dataset="video", frames=2, video_train=64, video_test=200, dim=16,
                                depth=1, heads=2, patch_size=4, block=2, teacher_steps=4, finetune_steps=2,
                                batch_size=8, sparsities=(0.9,), seeds=(0,), classifier_steps=5, num_samples=20,
                                sample_steps=1, loss="teacher")


# ---------------------------------------------------------------------------------------------
# Linear-only attention (the ablation): a DiT Attention layer whose softmax is replaced
# ---------------------------------------------------------------------------------------------

class LinearOnlyAttention(Attention):
    """fewer's DiT Attention with phi(Q) (phi(K)^T V) / (phi(Q) sum phi(K)) in place of softmax."""

    linear_config: SLAConfig

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = (proj(x).view(n, length, self.heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = linear_only_reference(self.q_norm(q), self.k_norm(k), v, self.linear_config)
        return self.o_proj(out.transpose(1, 2).reshape(n, length, dim))


def convert_to_linear_only_(model: nn.Module, config: SLAConfig) -> list[str]:
    """Swap every DiT Attention layer of ``model`` (in place) to linear-only attention."""
    converted = []
    for name, module in model.named_modules():
        if type(module) is Attention:
            module.__class__ = LinearOnlyAttention
            module.linear_config = config
            converted.append(name)
    if not converted:
        raise ValueError("convert_to_linear_only_ found no fewer DiT Attention layer")
    return converted


def convert(denoiser: TrigFlowDenoiser, method: str, sparsity: float, cfg: SLARecipeConfig) -> TrigFlowDenoiser:
    """A converted deep copy of ``denoiser`` (the dense weights are shared by value, not by reference)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    model = copy.deepcopy(denoiser)
    if method in ("sparse-only", "sla"):
        convert_to_sla_(model, cfg.sla_config(sparsity, method))
    if method == "sparse-only":  # no linear branch: its projection (bias included) stays zero
        for p in projection_parameters(model):
            p.requires_grad_(False)
    elif method == "linear-only":
        convert_to_linear_only_(model, cfg.sla_config(sparsity, method))
    return model


# ---------------------------------------------------------------------------------------------
# Training, sampling, scoring
# ---------------------------------------------------------------------------------------------

def load_images(name: str, frames: int = 8, video_train: int = 6000, video_test: int = 2000):
    """The data set as an ImageSet; for "video", clips [N, 1, T, 16, 16] of one moving 8x8 digit
    (scikit-learn digits at their own 8x8 size, 1-3 px per frame, bouncing off the edges), labelled
    by their digit; train clips use the train sprites, test clips the test sprites."""
    from ...data import load_digits, load_mnist
    from ...data.images import ImageSet
    from ...data.video import moving_digits
    if name == "digits":
        return load_digits()
    if name == "video":
        clips = {}
        for split, count, seed in (("train", video_train, 0), ("test", video_test, 1)):
            x, y = moving_digits(count, frames=frames, size=16, digits_per_video=1, seed=seed, source="digits",
                                 digit_size=8, split=split)
            clips[split] = (x.transpose(1, 2).contiguous(), y[:, 0])  # [N, T, 1, H, W] -> DiT's [N, C, T, H, W]
        return ImageSet(train_x=clips["train"][0], train_y=clips["train"][1], test_x=clips["test"][0],
                        test_y=clips["test"][1], num_classes=10, name=f"video{frames}x16")
    return load_mnist(size=16 if name == "mnist16" else 32)


def as_frames(x: torch.Tensor) -> torch.Tensor:
    """Images pass through; video [N, C, T, H, W] becomes its frames [N * T, C, H, W] (clip-major)."""
    return x if x.dim() == 4 else x.transpose(1, 2).flatten(0, 1)


def teacher_steps(data, batch_size: int, seed: int, teacher: TrigFlowDenoiser, class_dropout: float):
    """(get_batch, loss_fn) for distillation from the frozen dense teacher (TurboDiffusion's SLA
    fine-tuning): the student's output F(x_t / sigma_d, t, y) is pulled (MSE) to the teacher's at the
    same noisy input x_t, time and label. Class dropout (for CFG) is drawn here, once for both models,
    so the student must be run without its own (``net.y_embedder.dropout = 0``)."""
    times = LogNormalTime(sigma_d=teacher.sigma_d)
    null_class = teacher.net.null_class

    def get_batch(step: int, rank: int, world_size: int):
        x0, y = data.batch(batch_size, step, seed=seed)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        noise, t = torch.randn(x0.shape, generator=gen), times(x0.shape[0], gen)
        drop = torch.rand(y.shape, generator=gen) < class_dropout
        y = torch.where(drop, torch.full_like(y, null_class), y)
        x_t = noisy_sample(x0, teacher.sigma_d * noise, t)
        with torch.no_grad():
            target = teacher.raw(x_t, t, y)
        return x_t, t, y, target

    def loss_fn(model, batch):
        x_t, t, y, target = batch
        return (model.raw(x_t, t, y).float() - target.float()).pow(2).mean()

    return get_batch, loss_fn


def flow_matching_train(denoiser: TrigFlowDenoiser, data, steps: int, lr: float, batch_size: int, seed: int,
                        warmup_steps: int, teacher: TrigFlowDenoiser | None = None) -> list[dict[str, Any]]:
    """fewer.train with the TrigFlow loss on data, or (``teacher`` given) with the distillation loss of
    ``teacher_steps``; batches, noise and times are functions of (seed, step)."""
    from ...train import TrainConfig, train

    if teacher is None:
        get_batch, loss_fn = flow_matching_steps(data, batch_size, seed, LogNormalTime(sigma_d=denoiser.sigma_d))
    else:
        teacher.eval()
        class_dropout = denoiser.net.y_embedder.dropout
        denoiser.net.y_embedder.dropout = 0.0  # drawn in get_batch, the same for teacher and student
        get_batch, loss_fn = teacher_steps(data, batch_size, seed, teacher, class_dropout)

    train_cfg = TrainConfig(steps=steps, lr=lr, warmup_steps=warmup_steps, schedule="cosine", weight_decay=0.0,
                            grad_clip=1.0, log_every=max(1, steps // 10), seed=seed, out_dir="", progress=False,
                            device="cpu", resume="never", beta2=0.99,
                            # a non-finite update is skipped and counted (reported as skipped_updates), not fatal
                            on_nonfinite="skip", max_skipped=steps)
    denoiser.train()
    history = train(denoiser, loss_fn, get_batch, train_cfg).history
    denoiser.eval()
    if teacher is not None:
        denoiser.net.y_embedder.dropout = class_dropout
    return history


@torch.no_grad()
def samples_from_fixed_noise(denoiser: TrigFlowDenoiser, cfg: SLARecipeConfig, image_shape: tuple[int, ...],
                             num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced samples whose noise depends only on the sample index (the same for every model)."""
    labels = torch.arange(cfg.num_samples) % num_classes
    noise = randn_per_sample(per_sample_generators([100_000 + i for i in range(cfg.num_samples)]), image_shape)
    x = sample_ode(denoiser, noise, labels, steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale)
    return x.float().clamp(-1, 1), labels


def train_teacher(cfg: SLARecipeConfig, data) -> TrigFlowDenoiser:
    """The dense DiT (seed 0), cached at ``cfg.teacher_cache`` when given (keyed by the settings it depends on)."""
    key = {"dit": cfg.dit_config().to_dict(), "dataset": cfg.dataset, "steps": cfg.teacher_steps,
           "lr": cfg.teacher_lr, "batch_size": cfg.batch_size, "sigma_d": cfg.sigma_d}
    if cfg.dataset == "video":
        key["video_train"] = cfg.video_train
    torch.manual_seed(0)
    denoiser = TrigFlowDenoiser(DiT(cfg.dit_config()), sigma_d=cfg.sigma_d)
    if cfg.teacher_cache and os.path.exists(cfg.teacher_cache):
        saved = torch.load(cfg.teacher_cache, map_location="cpu", weights_only=False)
        if saved.get("key") == key:
            denoiser.load_state_dict(saved["state_dict"])
            return denoiser.eval()
    flow_matching_train(denoiser, data, cfg.teacher_steps, cfg.teacher_lr, cfg.batch_size, seed=0,
                        warmup_steps=min(50, cfg.teacher_steps // 10))
    if cfg.teacher_cache:
        Path(cfg.teacher_cache).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "state_dict": denoiser.state_dict()}, cfg.teacher_cache)
    return denoiser.eval()


def softmax_density(model: nn.Module, method: str) -> float:
    """Computed softmax token pairs / L^2 over the SLA layers' last forward (1 dense, 0 linear-only)."""
    if method == "dense":
        return 1.0
    if method == "linear-only":
        return 0.0
    layers = sla_modules(model)
    return sum(layer.last_density() for layer in layers) / len(layers)


def proj_norm(model: nn.Module) -> float:
    """Mean Frobenius norm of the SLA layers' projection weights (0 at conversion; 0 if no SLA layer)."""
    layers = sla_modules(model)
    return sum(float(layer.proj.weight.detach().norm()) for layer in layers) / len(layers) if layers else 0.0


@torch.no_grad()
def linear_share(model: TrigFlowDenoiser, x0: torch.Tensor, y: torch.Tensor, t: float = 0.8) -> float:
    """How much the linear branch contributes: ||proj(O_l)|| / ||O_s + proj(O_l)|| per SLA layer
    (Frobenius over the batch), averaged over layers, on one fixed noisy batch (x_t at time t from
    fixed noise). 0 with no SLA layer or a zero projection."""
    layers = sla_modules(model)
    if not layers:
        return 0.0
    shares: list[float] = []

    def hook(module, args, output):
        q, k, v = args[:3]
        out_sparse, out_linear = sla_parts_reference(q, k, v, module.config, plan=module.last_plan)
        linear = torch.nn.functional.linear(out_linear, module.proj.weight, module.proj.bias)
        shares.append(float(linear.norm() / (out_sparse + linear).norm().clamp_min(1e-30)))

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        gen = torch.Generator().manual_seed(12345)
        noise = torch.randn(x0.shape, generator=gen)
        times = torch.full((x0.shape[0],), t)
        model.raw(noisy_sample(x0, model.sigma_d * noise, times), times, y)
    finally:
        for handle in handles:
            handle.remove()
    return sum(shares) / len(shares)


def linear_branch_capacity(cfg: SLARecipeConfig, num: int = 128) -> list[dict[str, Any]]:
    """What the linear branch could add at best, on the dense teacher's own q, k, v (no fine-tuning).

    One noisy test batch (times uniform in [0.1, 1.5]); per layer and sparsity, relative Frobenius
    errors against dense attention O of: sparse-only O_s (softmax renormalised over the critical
    blocks, as SLA computes it); SLA with the least-squares best projection, O_s + W O_l + b (W shared
    by the heads, as the module); and, for comparison, the mass-weighted split a O_s + W O_l + b with
    a = the critical blocks' share of the compressed map P_c (which SLA already computes), i.e. the
    paper's Eq. 1 split P = P*M + P*(1-M) with P's own normaliser. ``mass_kept`` is the mean softmax
    mass of the critical blocks in the teacher's attention.
    """
    data = load_images(cfg.dataset, cfg.frames, cfg.video_train, cfg.video_test)
    teacher = train_teacher(cfg, data)
    with torch.no_grad():
        return _capacity_rows(cfg, teacher, data, num)


def _capacity_rows(cfg: SLARecipeConfig, teacher: TrigFlowDenoiser, data, num: int) -> list[dict[str, Any]]:
    import dataclasses as dc

    from .reference import CRITICAL, compressed_attention_map, plan_blocks

    captured: list[list[torch.Tensor]] = []

    def hook(module, args, output):
        x = args[0]
        n, length, _ = x.shape
        captured.append([proj(x).view(n, length, module.heads, module.head_dim).transpose(1, 2)
                         for proj in (module.q_proj, module.k_proj, module.v_proj)])

    handles = [block.attn.register_forward_hook(hook) for block in teacher.net.blocks]
    gen = torch.Generator().manual_seed(1)
    x0, y = data.batch(num, 0, seed=7, split="test")
    t = torch.rand(num, generator=gen) * 1.4 + 0.1
    teacher.raw(noisy_sample(x0, teacher.sigma_d * torch.randn(x0.shape, generator=gen), t), t, y)
    for handle in handles:
        handle.remove()

    def best_fit_error(target: torch.Tensor, out_linear: torch.Tensor, norm: torch.Tensor) -> float:
        d = target.shape[-1]
        design = torch.cat([out_linear.reshape(-1, d), torch.ones(out_linear.numel() // d, 1)], dim=1)
        residual = target.reshape(-1, d)
        fit = design @ torch.linalg.lstsq(design, residual).solution
        return float((residual - fit).norm() / norm)

    rows = []
    for sparsity in cfg.sparsities:
        sla_cfg = dc.replace(cfg.sla_config(sparsity, "sla"), linear_scope="complement")
        for layer, (q, k, v) in enumerate(captured):
            probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
            dense = probs @ v
            plan = plan_blocks(q, k, sla_cfg)
            out_sparse, out_linear = sla_parts_reference(q, k, v, sla_cfg, plan=plan)
            critical_blocks = (plan.classes == CRITICAL).float()
            token_critical = critical_blocks.repeat_interleave(sla_cfg.block_q, dim=-2)[..., :q.shape[-2], :]
            token_critical = token_critical.repeat_interleave(sla_cfg.block_k, dim=-1)[..., :k.shape[-2]]
            mass_kept = (probs * token_critical).sum(-1, keepdim=True)
            share = (compressed_attention_map(q, k, sla_cfg) * critical_blocks).sum(-1, keepdim=True)
            share = share.repeat_interleave(sla_cfg.block_q, dim=-2)[..., :q.shape[-2], :]
            norm = dense.norm()
            rows.append({"dataset": cfg.dataset, "sparsity": sparsity, "layer": layer,
                         "mass_kept": float(mass_kept.mean()), "mass_kept_estimate": float(share.mean()),
                         "sparse_only_error": float((dense - out_sparse).norm() / norm),
                         "sla_best_proj_error": best_fit_error(dense - out_sparse, out_linear, norm),
                         "mass_weighted_best_proj_error": best_fit_error(dense - share * out_sparse, out_linear,
                                                                         norm)})
    return rows


def run_sla_recipe(cfg: SLARecipeConfig, progress: bool = True) -> list[dict[str, Any]]:
    """One row per (method, sparsity, seed) plus the teacher's row; see the module docstring."""
    from ...eval.image_metrics import SampleEvaluator, psnr, ssim
    from ...models.classifier import train_classifier

    if not isinstance(cfg, SLARecipeConfig):
        raise TypeError(f"run_sla_recipe expects an SLARecipeConfig, got {type(cfg).__name__}")
    data = load_images(cfg.dataset, cfg.frames, cfg.video_train, cfg.video_test)
    image_shape = tuple(data.train_x.shape[1:])
    frames_per_sample = 1 if data.train_x.dim() == 4 else data.train_x.shape[2]
    # video: the classifier, the Frechet distance and PSNR/SSIM work on frames (each labelled by its clip)
    classifier = train_classifier(as_frames(data.train_x), data.train_y.repeat_interleave(frames_per_sample),
                                  steps=cfg.classifier_steps, seed=0)
    evaluator = SampleEvaluator(classifier, as_frames(data.test_x))
    probe_x, probe_y = data.batch(32, 0, seed=7, split="test")  # the fixed batch of linear_share

    start = time.perf_counter()
    teacher = train_teacher(cfg, data)
    teacher_samples, labels = samples_from_fixed_noise(teacher, cfg, image_shape, data.num_classes)

    def score(samples: torch.Tensor) -> dict[str, float]:
        nonfinite = int((~torch.isfinite(samples.flatten(1))).any(dim=1).sum())
        if nonfinite:  # a diverged model: report it instead of failing the whole table
            return {"class_accuracy": float("nan"), "frechet_distance": float("nan"), "psnr": float("nan"),
                    "ssim": float("nan"), "nonfinite_samples": nonfinite}
        frames, teacher_frames = as_frames(samples), as_frames(teacher_samples)
        quality = evaluator(frames, labels.repeat_interleave(frames_per_sample))
        return {"class_accuracy": quality["class_accuracy"], "frechet_distance": quality["frechet_distance"],
                "psnr": float(psnr(frames, teacher_frames, data_range=2.0)),
                "ssim": float(ssim(frames, teacher_frames, data_range=2.0)), "nonfinite_samples": 0}

    common = {"dataset": cfg.dataset, "tokens": cfg.dit_config().num_tokens, "key_blocks": cfg.key_blocks,
              "finetune_steps": cfg.finetune_steps, "num_samples": cfg.num_samples, "loss": cfg.loss,
              "linear_scope": cfg.linear_scope}
    rows = [{**common, "method": "teacher", "sparsity": 0.0, "seed": 0, "finetune_steps": 0, **score(teacher_samples),
             "final_loss": float("nan"), "skipped_updates": 0, "softmax_density": 1.0, "proj_norm": 0.0,
             "linear_share": 0.0, "seconds": time.perf_counter() - start}]
    if progress:
        print(_format_row(rows[-1]), flush=True)
    for method in cfg.methods:
        # linear-only has no softmax part, so no sparsity to vary: one run per seed (sparsity 1)
        for sparsity in {"dense": (0.0,), "linear-only": (1.0,)}.get(method, cfg.sparsities):
            for seed in cfg.seeds:
                start = time.perf_counter()
                model = convert(teacher, method, sparsity, cfg)
                if method == "dense" and cfg.loss == "teacher":
                    # distilling the dense model from itself: the loss and every gradient are exactly 0
                    # (no dropout besides the class dropout, drawn once for both), so it stays the teacher
                    history, samples = [{"loss": 0.0, "skipped": 0}], teacher_samples
                else:
                    history = flow_matching_train(model, data, cfg.finetune_steps, cfg.finetune_lr,
                                                  cfg.finetune_batch or cfg.batch_size,
                                                  seed=1 + seed, warmup_steps=min(10, cfg.finetune_steps // 10),
                                                  teacher=teacher if cfg.loss == "teacher" else None)
                    samples, _ = samples_from_fixed_noise(model, cfg, image_shape, data.num_classes)
                rows.append({**common, "method": method, "sparsity": sparsity, "seed": seed, **score(samples),
                             "final_loss": float(history[-1]["loss"]) if history else float("nan"),
                             "skipped_updates": int(history[-1].get("skipped", 0)) if history else 0,
                             "softmax_density": softmax_density(model, method),
                             "proj_norm": proj_norm(model), "linear_share": linear_share(model, probe_x, probe_y),
                             "seconds": time.perf_counter() - start})
                if progress:
                    print(_format_row(rows[-1]), flush=True)
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and (sample) std over seeds per (dataset, method, sparsity), over finite values only
    (``failed_runs`` counts runs with non-finite samples); std is 0 for one value."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["method"], row["sparsity"]), []).append(row)
    table = []
    for (dataset, method, sparsity), members in groups.items():
        out: dict[str, Any] = {"dataset": dataset, "method": method, "sparsity": sparsity, "seeds": len(members),
                               "finetune_steps": members[0]["finetune_steps"]}
        # a run whose samples are not finite (diverged) is counted, and left out of the means
        out["failed_runs"] = sum(1 for m in members if m.get("nonfinite_samples", 0))
        for metric in METRICS:
            values = [float(m[metric]) for m in members if math.isfinite(float(m[metric]))]
            out[f"{metric}_mean"] = statistics.fmean(values) if values else float("nan")
            out[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        table.append(out)
    return table


def _format_row(row: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def write_rows(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """CSV with the environment columns of fewer.bench appended."""
    from ...bench import environment

    env = environment()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys([c for row in rows for c in row] + list(env)))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({**env, **{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}})
    return path


_TEXT_COLUMNS = ("dataset", "method", "loss", "linear_scope")


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a CSV written by ``write_rows`` (numbers back to int/float, the environment
    columns dropped); inverse of write_rows for summarize."""
    from ...bench import environment

    env = set(environment())
    rows = []
    with Path(path).open(newline="") as fh:
        for raw in csv.DictReader(fh):
            row: dict[str, Any] = {}
            for key, value in raw.items():
                if key in env:
                    continue
                try:
                    number = float(value)
                except ValueError:  # a text column (dataset, method, ...)
                    row[key] = value
                    continue
                if key in _TEXT_COLUMNS:
                    row[key] = value
                else:
                    row[key] = int(number) if number.is_integer() and "." not in value and "e" not in value else number
            rows.append(row)
    return rows


def print_summary(table: list[dict[str, Any]]) -> None:
    print(f"{'method':<12} {'sparsity':>8} {'n':>2} {'class acc':>15} {'Frechet':>15} {'PSNR dB':>15} "
          f"{'SSIM':>15} {'density':>7}")
    for r in table:
        cells = [f"{r[f'{m}_mean']:.3f}+-{r[f'{m}_std']:.3f}" for m in ("class_accuracy", "frechet_distance",
                                                                        "psnr", "ssim")]
        print(f"{r['method']:<12} {r['sparsity']:>8.2f} {r['seeds']:>2} " + " ".join(f"{c:>15}" for c in cells)
              + f" {r['softmax_density_mean']:>7.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", choices=SLARecipeConfig.presets())
    parser.add_argument("--teacher-cache", default="")
    parser.add_argument("--out", default="benchmarks/results/cpu/sla_recipe",
                        help="writes <out>.csv (summary) and <out>_runs.csv (every run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="", help="comma-separated subset of the preset's methods")
    parser.add_argument("--sparsities", default="", help="comma-separated subset of the preset's sparsities")
    parser.add_argument("--seeds", default="", help="comma-separated subset of the preset's seeds")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field (a JSON value, else a string), "
                             "e.g. --set loss=data --set finetune_steps=300")
    parser.add_argument("--capacity", action="store_true",
                        help="run nothing but linear_branch_capacity on the teacher: writes <out>_capacity.csv")
    parser.add_argument("--merge", nargs="+", default=[], metavar="RUNS_CSV",
                        help="run nothing: merge these *_runs.csv files (e.g. parallel shards) into <out>*.csv")
    args = parser.parse_args(argv)
    if args.merge:
        rows = [row for path in args.merge for row in read_rows(path)]
        rows = [r for i, r in enumerate(rows) if r["method"] != "teacher"
                or all(o["method"] != "teacher" for o in rows[:i])]  # each shard repeats the teacher's row
        table = summarize(rows)
        write_rows(rows, f"{args.out}_runs.csv")
        print("wrote", write_rows(table, f"{args.out}.csv"))
        print_summary(table)
        return 0
    torch.set_num_threads(args.threads)
    overrides: dict[str, Any] = {"teacher_cache": args.teacher_cache}
    if args.methods:
        overrides["methods"] = tuple(args.methods.split(","))
    if args.sparsities:
        overrides["sparsities"] = tuple(float(v) for v in args.sparsities.split(","))
    if args.seeds:
        overrides["seeds"] = tuple(int(v) for v in args.seeds.split(","))
    for item in args.set:
        field, _, value = item.partition("=")
        try:
            overrides[field] = json.loads(value)
        except json.JSONDecodeError:  # a bare string: --set loss=teacher
            overrides[field] = value
    cfg = SLARecipeConfig.from_preset(args.preset, **overrides)
    if args.capacity:
        rows = linear_branch_capacity(cfg)
        print("wrote", write_rows(rows, f"{args.out}_capacity.csv"))
        for r in rows:
            print(_format_row(r))
        return 0
    print(cfg.to_json())
    rows = run_sla_recipe(cfg)
    table = summarize(rows)
    write_rows(rows, f"{args.out}_runs.csv")
    print("wrote", write_rows(table, f"{args.out}.csv"))
    print_summary(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
