"""Train fewer's LLaMA-style model once per quantized-training arm and print the final losses.

    python -m fewer.fqt.recipe_run --preset tiny                  # CPU smoke: 7 arms x 40 steps, minutes
    python -m fewer.fqt.recipe_run --preset tiny --arms bf16 tetrajet_v2 --steps 20 --out runs/fqt_tiny.csv

Every arm starts from the same initial weights (``--seed``) and reads the same batches (``--corpus``:
the Shakespeare corpus of fewer.data by default, or ``english``; prepared by ``fewer data prepare``). OutControl and OsciReset windows are scaled
to the run length in the run preset (the released 501-550 / every-200-steps defaults need thousands
of steps). Numbers from the tiny preset are a smoke test of the machinery, not evidence about the
methods: a few dozen steps of a 1M-parameter model cannot separate them.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import time
from typing import Any

import torch

from ..models.llama import Llama, LlamaConfig
from .controller import FQTController
from .convert import convert_for_training
from .recipe import get_recipe

ARMS = ("bf16", "nvfp4_naive", "nvidia_nvfp4", "tetrajet_v2", "tetrajet_v2_outcontrol", "tetrajet_v2_oscireset",
        "tetrajet_v2_full")


@dataclasses.dataclass(frozen=True)
class RunPreset:
    model: dict
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup_steps: int
    outcontrol: dict
    oscireset: dict
    eval_batches: int


RUN_PRESETS = {
    # every linear dim a multiple of 128 (TetraJet-v2's 1x128 outer blocks); untied embeddings, LM head in bf16
    "tiny": RunPreset(model=dict(vocab_size=4096, dim=128, n_layers=2, n_heads=4, ffn_hidden=256, max_seq_len=128,
                                 tie_embeddings=False),
                      steps=40, batch_size=8, seq_len=128, lr=3e-3, warmup_steps=4,
                      outcontrol=dict(record_start=5, record_iters=5),
                      oscireset=dict(window=5, period=10, start_fraction=0.5),
                      eval_batches=4),
}


def run_arm(arm: str, preset: RunPreset, corpus, *, seed: int = 0, steps: int | None = None,
            distributed: str = "none") -> dict[str, Any]:
    from ..data.text import TokenBatches, eval_batches
    from ..train import TrainConfig, train

    steps = steps or preset.steps
    recipe = get_recipe(arm)
    if recipe.outcontrol.enabled:
        recipe = recipe.replace(outcontrol=recipe.outcontrol.replace(**preset.outcontrol))
    if recipe.oscireset.enabled:
        recipe = recipe.replace(oscireset=recipe.oscireset.replace(**preset.oscireset))
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(**{**preset.model, "vocab_size": corpus.vocab_size}))
    report = convert_for_training(model, recipe)
    ctrl = FQTController(report, total_steps=steps) if report.converted else None
    batches = TokenBatches(corpus.train, preset.batch_size, preset.seq_len, seed=seed)

    def get_batch(step: int, rank: int, world_size: int):
        if preset.batch_size % world_size:
            raise ValueError(f"batch_size={preset.batch_size} is not divisible by world_size={world_size}")
        share = preset.batch_size // world_size
        x, y = batches.batch(step)                   # the global batch; this rank's share of it
        return x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]

    def loss_fn(m, batch):
        x, y = batch
        _, loss = m(x, y)
        return loss

    def eval_fn(m):
        losses = [m(x, y)[1].item() for x, y in eval_batches(corpus.val, preset.batch_size, preset.seq_len,
                                                              max_batches=preset.eval_batches)]
        return {"loss": sum(losses) / len(losses)}

    cfg = TrainConfig(steps=steps, lr=preset.lr, warmup_steps=min(preset.warmup_steps, steps // 2), schedule="cosine",
                      log_every=max(1, steps // 4), eval_every=steps, progress=False, seed=seed, device="cpu",
                      precision="fp32", distributed=distributed)
    began = time.perf_counter()
    result = train(model, loss_fn, get_batch, cfg, eval_fn=eval_fn, callbacks=[ctrl] if ctrl else [])
    row = {"arm": arm, "seed": seed, "steps": steps, "train_loss": result.final.get("loss"),
           "val_loss": result.final.get("eval_loss"), "seconds": round(time.perf_counter() - began, 1),
           "quantized_layers": len(report.converted), "bf16_layers": len(report.kept)}
    if ctrl is not None:
        rep = ctrl.report()
        row["nonfinite"] = sum(v["forward"] + v["backward"] for v in rep["nonfinite"].values())
        if "outcontrol" in rep:
            row["outcontrol_selected_at"] = rep["outcontrol"]["selected_at"]
        if "oscireset" in rep:
            row["last_reset_step"] = rep["oscireset"]["last_reset_step"]
            hist = rep["oscireset"]["history"]
            row["frac_reset_last"] = hist[-1]["frac_reset"] if hist else None
    return row


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m fewer.fqt.recipe_run", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(RUN_PRESETS))
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--corpus", default="shakespeare", help="a corpus of fewer.data.text (shakespeare, english)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=0, help="override the preset's step count")
    parser.add_argument("--out", default="", help="CSV file for the rows")
    parser.add_argument("--distributed", default="none", choices=("none", "ddp", "fsdp2"),
                        help="under torchrun: DDP or FSDP2 (gloo on CPU)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: on a small shared CPU more threads only contend)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for arm in args.arms:
        get_recipe(arm)                          # fail fast on a bad name
    from ..data.text import load_corpus
    corpus = load_corpus(args.corpus)
    preset = RUN_PRESETS[args.preset]
    rows = []
    for arm in args.arms:
        row = run_arm(arm, preset, corpus, seed=args.seed, steps=args.steps or None, distributed=args.distributed)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(row), flush=True)
        rows.append(row)
    if int(os.environ.get("RANK", "0")) != 0:
        return rows
    print(f"\n{'arm':<24}{'train loss':>12}{'val loss':>10}{'seconds':>9}")
    for row in rows:
        print(f"{row['arm']:<24}{row['train_loss']:>12.4f}{row['val_loss']:>10.4f}{row['seconds']:>9.1f}")
    if args.out:
        keys = sorted({k for r in rows for k in r})
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
