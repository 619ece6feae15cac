"""LLaMA-style decoder on Shakespeare: validation loss and perplexity through the one training loop.

    fewer train lm --preset cpu --out runs/lm
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.config import Config, check_choice, check_positive_int
from ..data import eval_batches, load_corpus
from ..data.text import TokenBatches
from ..models.llama import Llama, LlamaConfig
from ..train import TrainConfig, train


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMBaselineConfig(Config):
    model: str = "small"            # a LlamaConfig preset; vocab_size and max_seq_len follow the corpus and seq_len
    corpus: str = "shakespeare"
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 300
    lr: float = 3e-3
    warmup_steps: int = 30
    eval_every: int = 100
    eval_batches: int = 20          # validation windows of seq_len, batch_size per batch (0 = whole split)
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        check_choice(self, "model", LlamaConfig.presets())
        for name in ("seq_len", "batch_size", "steps", "eval_every"):
            check_positive_int(self, name)
        check_choice(self, "device", ("auto", "cpu", "cuda"))


LMBaselineConfig.register_preset("cpu", model="tiny", seq_len=128, batch_size=16, steps=150, lr=3e-3,
                                 warmup_steps=15, eval_every=50, eval_batches=8)
# 500 steps of 64x256 tokens is ~5.5 epochs of the 1.49M training tokens: a 2000-step run (H200) reached its
# best validation perplexity, 71.1, at step 500 and then overfit (252 at step 2000).
LMBaselineConfig.register_preset("gpu", model="small", seq_len=256, batch_size=64, steps=500, lr=2e-3,
                                 warmup_steps=50, eval_every=100, eval_batches=0)


@dataclass
class LMBaselineResult:
    val_loss: float
    val_ppl: float
    params: int
    train_tokens: int
    history: list[dict[str, Any]]
    config: LMBaselineConfig
    model: torch.nn.Module | None = None    # the trained model (eval mode), for follow-up evaluations


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, tokens, seq_len: int, batch_size: int, max_batches: int | None,
                device: torch.device | str) -> dict[str, float]:
    """Mean next-token cross-entropy over contiguous validation windows, and its exponential."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in eval_batches(tokens, batch_size, seq_len, max_batches=max_batches or None, device=device):
        _, loss = model(x, y)
        total += float(loss) * y.numel()
        count += y.numel()
    model.train(was_training)
    loss = total / count
    return {"val_loss": loss, "val_ppl": math.exp(loss)}


def run_lm_baseline(cfg: LMBaselineConfig, out_dir: str | Path = "", progress: bool = True) -> LMBaselineResult:
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    corpus = load_corpus(cfg.corpus)
    model_cfg = LlamaConfig.from_preset(cfg.model, vocab_size=corpus.vocab_size, max_seq_len=cfg.seq_len)
    torch.manual_seed(cfg.seed)
    model = Llama(model_cfg)

    @functools.lru_cache(maxsize=None)
    def stream(rank: int, world_size: int) -> TokenBatches:  # each rank reads its slice of the global batch
        return TokenBatches(corpus.train, cfg.batch_size // world_size, cfg.seq_len, seed=cfg.seed, rank=rank,
                            world_size=world_size)

    def get_batch(step: int, rank: int, world_size: int):
        return stream(rank, world_size).batch(step)

    def loss_fn(m, batch):
        x, y = batch
        _, loss = m(x, y)
        return loss, {"tokens": y.numel()}

    def eval_fn(m):
        return evaluate_lm(m, corpus.val, cfg.seq_len, cfg.batch_size, cfg.eval_batches, device)

    train_cfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps, schedule="cosine",
                            weight_decay=0.1, grad_clip=1.0, eval_every=cfg.eval_every, log_every=10,
                            seed=cfg.seed, out_dir=str(out_dir), progress=progress, device=device.type,
                            resume="never")
    result = train(model, loss_fn, get_batch, train_cfg, eval_fn=eval_fn)
    final = eval_fn(model.to(device))
    return LMBaselineResult(val_loss=final["val_loss"], val_ppl=final["val_ppl"], params=model.num_params(),
                            train_tokens=cfg.steps * cfg.batch_size * cfg.seq_len, history=result.history,
                            config=cfg, model=model.eval())
