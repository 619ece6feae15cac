"""Train fewer's LLaMA-style model once per quantized-training arm; the paired-seed sweep of issue #8.

    python -m fewer.fqt.recipe_run --preset tiny                  # CPU smoke: 7 arms x 40 steps, minutes
    python -m fewer.fqt.recipe_run --preset tiny --arms bf16 tetrajet_v2 --steps 20 --out runs/fqt_tiny.csv
    python -m fewer.fqt.recipe_run --preset gpu --plan            # budget: params, tokens, steps, passes
    python -m fewer.fqt.recipe_run --preset gpu --sweep --budget-min 9 --export $OUT     # the table's runs
    python -m fewer.fqt.recipe_run --sweep --tiny                 # CPU: 2 arms x 2 seeds x 6 steps, 2 workers

Every arm starts from the same initial weights (``--seed``) and reads the same batches (``--corpus``:
the preset's corpus, Shakespeare for ``tiny`` and english for ``gpu``; prepared by ``fewer data prepare``).
OutControl and OsciReset windows are scaled to the run length in the tiny presets (the released 501-550 /
every-200-steps defaults need thousands of steps; the gpu preset keeps them). Numbers from the tiny
presets are a smoke test of the machinery, not evidence about the methods: a few dozen steps of a
1M-parameter model cannot separate them.

The sweep (``--sweep``) runs arms x seeds as independent runs in worker processes, one per visible GPU
(or ``--procs-per-gpu`` per GPU; ``--workers`` CPU processes without a GPU), each taking the next run from
a queue ordered seed by seed, so that complete paired seeds come first. Seed s means the same initial weights and the same
batch order in every arm. Each run writes into ``<out-dir>/<arm>_s<seed>/``: the training loop's
``metrics.jsonl`` and checkpoints, ``curve.csv`` (train loss every ``log_every`` steps, validation loss
every ``eval_every``), ``oscireset.csv`` (every OsciReset window per layer: ratio quantiles, flip rate,
fraction reset; measure-only in FP4 arms without OsciReset), ``layers.csv`` (calls, non-finite counts,
OutControl channels and their share of the recorded channel norm) and, when it completes, ``final.json``
(final validation loss and perplexity on the whole validation split). A wall-clock budget
(``--budget-min``) stops the queue: runs still going checkpoint and stop, and a later call with the same
``--out-dir`` resumes them from the checkpoint and skips finished runs. At the end the launcher
aggregates every run under ``--out-dir`` into ``fqt_sweep_*.csv`` (runs, curves, oscireset, layers,
summary) under ``--export/<gpu-slug>/``; the summary has mean +- std per arm, the fraction of the bf16
gap each arm closes relative to nvidia_nvfp4 (per seed pair, then averaged, and from the means), and
paired differences with whether they exceed the seed spread.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
import tarfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import torch

from ..bench import write_rows
from ..models.llama import Llama, LlamaConfig
from .controller import FQTController
from .convert import convert_for_training, fqt_state_dict, load_fqt_state_dict
from .recipe import OsciResetConfig, get_recipe

ARMS = ("bf16", "nvfp4_naive", "nvidia_nvfp4", "tetrajet_v2", "tetrajet_v2_outcontrol", "tetrajet_v2_oscireset",
        "tetrajet_v2_full")
PARAM_COUNTS = ("non_embedding", "total")


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
    # ---- the sweep's budget and cadence (0 / None = off; the tiny smoke preset uses none of them) ----
    corpus: str = "shakespeare"
    tokens_per_param: float = 0.0        # > 0: steps = ceil(tokens_per_param * params / tokens per step)
    param_count: str = "non_embedding"   # which params tokens_per_param counts: non_embedding | total
    max_passes: float = 0.0              # > 0: cap the tokens at this many passes over the training split
    warmup_fraction: float = 0.0         # > 0: warmup_steps = round(fraction * steps)
    reset_before_end: int = 0            # > 0: OsciReset's offset puts the last reset this many steps before the end
    eval_every: int = 0                  # validation curve cadence (0: only at the end)
    log_every: int = 0                   # train curve cadence (0: steps // 4)
    ckpt_every: int = 0                  # checkpoints for resume (sweep only)
    weight_decay: float = 0.1
    measure_oscillation: bool = False    # FP4 arms without OsciReset log its statistics (reset=False)
    final_eval_batches: int = 0          # the final validation loss: 0 = the whole validation split


RUN_PRESETS = {
    # every linear dim a multiple of 128 (TetraJet-v2's 1x128 outer blocks); untied embeddings, LM head in bf16
    "tiny": RunPreset(model=dict(vocab_size=4096, dim=128, n_layers=2, n_heads=4, ffn_hidden=256, max_seq_len=128,
                                 tie_embeddings=False),
                      steps=40, batch_size=8, seq_len=128, lr=3e-3, warmup_steps=4,
                      outcontrol=dict(record_start=5, record_iters=5),
                      oscireset=dict(window=5, period=10, start_fraction=0.5),
                      eval_batches=4),
    # the sweep's CPU smoke (--sweep --tiny): one block, a few steps, every log and the resume path exercised
    "tiny_sweep": RunPreset(model=dict(vocab_size=4096, dim=128, n_layers=1, n_heads=4, ffn_hidden=256,
                                       max_seq_len=64, tie_embeddings=False),
                            steps=6, batch_size=4, seq_len=64, lr=3e-3, warmup_steps=1,
                            outcontrol=dict(record_start=2, record_iters=2),
                            oscireset=dict(window=1, period=2, start_fraction=0.3),
                            eval_batches=2, eval_every=3, log_every=1, measure_oscillation=True,
                            final_eval_batches=2),
    # issue #8's table (see fewer/fqt/README.md, "GPU runs"): the notes' 10M-non-embedding body (d 384,
    # 6 blocks, SwiGLU 1024; 16.9M with the untied 8192-entry embedding and LM head), 50 tokens per
    # non-embedding parameter = 531M tokens = 8104 steps of 64 x 1024 tokens = 23.5 passes over the
    # 22.6M-token english corpus. AdamW (0.9, 0.95), wd 0.1, warmup 2 %, cosine to 10 %, clip 1
    # (TetraJet-v2's settings); lr 1e-3 for a 65k-token batch. OutControl: the released 501-550 window.
    # OsciReset: released window 50 / threshold 8 / period 200 from 60 %, last reset 50 steps before the end.
    "gpu": RunPreset(model=dict(vocab_size=8192, dim=384, n_layers=6, n_heads=6, ffn_hidden=1024, max_seq_len=1024,
                                tie_embeddings=False),
                     steps=0, batch_size=64, seq_len=1024, lr=1e-3, warmup_steps=0,
                     outcontrol=dict(record_start=501, record_iters=50),
                     oscireset=dict(window=50, period=200, threshold=8.0, start_fraction=0.6),
                     eval_batches=8, corpus="english", tokens_per_param=50.0, warmup_fraction=0.02,
                     reset_before_end=50, eval_every=250, log_every=50, ckpt_every=500, measure_oscillation=True),
}


# ---------------------------------------------------------------------------------------------
# budget

def count_params(model_cfg: dict) -> dict[str, int]:
    """Total and non-embedding parameters (non-embedding leaves out the token embedding and the LM head)."""
    model = Llama(LlamaConfig(**model_cfg))        # on the CPU: a meta-device init imports torch._dynamo (s)
    total = sum(p.numel() for p in model.parameters())
    emb = model.embed_tokens.weight.numel()
    head = 0 if model.cfg.tie_embeddings else model.lm_head.weight.numel()
    return {"total": total, "non_embedding": total - emb - head}


def plan(preset: RunPreset, train_tokens: int, *, steps: Optional[int] = None) -> dict[str, Any]:
    """Steps, tokens, passes over the training split, warmup and the OsciReset phase of a run."""
    if preset.param_count not in PARAM_COUNTS:
        raise ValueError(f"param_count={preset.param_count!r} is not allowed: choose one of {PARAM_COUNTS}")
    params = count_params(preset.model)
    per_step = preset.batch_size * preset.seq_len
    if steps:
        n_steps = int(steps)
    elif preset.tokens_per_param > 0:
        tokens = preset.tokens_per_param * params[preset.param_count]
        if preset.max_passes > 0:
            tokens = min(tokens, preset.max_passes * train_tokens)
        n_steps = max(1, math.ceil(tokens / per_step))
    else:
        n_steps = preset.steps
    if n_steps <= 0:
        raise ValueError("the run has no steps: set steps, or tokens_per_param > 0")
    tokens = n_steps * per_step
    warmup = round(preset.warmup_fraction * n_steps) if preset.warmup_fraction > 0 else preset.warmup_steps
    out = {"steps": n_steps, "tokens": tokens, "tokens_per_step": per_step, "params_total": params["total"],
           "params_non_embedding": params["non_embedding"], "param_count": preset.param_count,
           "tokens_per_param": tokens / params[preset.param_count], "train_tokens": int(train_tokens),
           "passes": tokens / train_tokens, "warmup_steps": min(warmup, n_steps // 2)}
    osc = dict(preset.oscireset)
    if preset.reset_before_end > 0:
        last_snapshot = n_steps - preset.reset_before_end - osc["window"]
        if last_snapshot > 0:
            osc["offset"] = last_snapshot % osc["period"]
    out["oscireset"] = osc
    return out


def estimate_minutes(plan_: dict[str, Any], step_csv: str, shape: str = "sweep") -> dict[str, float]:
    """Minutes per run of each arm from benchmarks/fqt/bench_step.py's CSV (rows of ``shape``; triton backend,
    bf16 as itself); evaluation (a few % at the gpu preset's cadence) is not included."""
    minutes = {}
    with open(step_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("shape") != shape or row.get("error"):
                continue
            if row["arm"] != "bf16" and row["backend"] != "triton":
                continue
            ms = float(row["median_ms"])
            if int(row["tokens_per_step"]) != plan_["tokens_per_step"]:
                ms *= plan_["tokens_per_step"] / int(row["tokens_per_step"])
            minutes[row["arm"]] = plan_["steps"] * ms / 6e4
    return minutes


# ---------------------------------------------------------------------------------------------
# one run

def run_arm(arm: str, preset: RunPreset, corpus, *, seed: int = 0, steps: int | None = None,
            distributed: str = "none", run_dir: str = "", deadline: Optional[float] = None,
            stop_at: Optional[int] = None, device: str = "auto") -> dict[str, Any]:
    """Train one arm. With ``run_dir`` (the sweep) the run writes its files there, checkpoints every
    ``preset.ckpt_every`` steps, resumes from the latest checkpoint, and stops (checkpointing) before the
    wall-clock ``deadline`` (time.time()) or after ``stop_at`` updates; the row's ``complete`` says which."""
    from ..data.text import TokenBatches, eval_batches
    from ..train import TrainConfig, train
    from ..train import checkpoint as ckpt

    p = plan(preset, corpus.train.size, steps=steps)
    steps = p["steps"]
    recipe = get_recipe(arm)
    if recipe.outcontrol.enabled:
        recipe = recipe.replace(outcontrol=recipe.outcontrol.replace(**preset.outcontrol))
    if recipe.oscireset.enabled:
        recipe = recipe.replace(oscireset=recipe.oscireset.replace(**p["oscireset"]))
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(**{**preset.model, "vocab_size": corpus.vocab_size}))
    report = convert_for_training(model, recipe)
    measure = None
    if report.converted and recipe.w.quantized and not recipe.oscireset.enabled and preset.measure_oscillation:
        measure = OsciResetConfig(enabled=True, reset=False, **p["oscireset"])
    batches = TokenBatches(corpus.train, preset.batch_size, preset.seq_len, seed=seed)

    start = 0
    side: dict[str, Any] = {}
    if run_dir and preset.ckpt_every:
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is not None:
            start = int(ckpt.read_meta(latest)["step"])
            side = torch.load(Path(run_dir) / "fqt_state" / f"step_{start:08d}.pt", weights_only=False)
            load_fqt_state_dict(model, side["fqt"])
    ctrl = FQTController(report, total_steps=steps, step=start, oscireset=measure) if report.converted else None
    if ctrl is not None and side:
        _restore_controller(ctrl, side)

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
        dev = next(m.parameters()).device
        losses = [m(x, y)[1].item() for x, y in eval_batches(corpus.val, preset.batch_size, preset.seq_len,
                                                              max_batches=preset.eval_batches, device=dev)]
        return {"loss": sum(losses) / len(losses)}

    callbacks: list = [ctrl] if ctrl else []
    if run_dir:
        callbacks.append(_Saver(run_dir, preset.ckpt_every, steps, model, ctrl, deadline, stop_at))
    cfg = TrainConfig(steps=steps, lr=preset.lr, warmup_steps=p["warmup_steps"], schedule="cosine",
                      log_every=preset.log_every or max(1, steps // 4), eval_every=preset.eval_every or steps,
                      progress=False, seed=seed, device=device if run_dir else "cpu",
                      precision="auto" if run_dir else "fp32", distributed=distributed,
                      weight_decay=preset.weight_decay, out_dir=run_dir,
                      ckpt_every=preset.ckpt_every if run_dir else 0, keep_last=1,
                      # the sweep counts a non-finite update and goes on (reported as skipped_updates)
                      on_nonfinite="skip" if run_dir else "raise", max_skipped=50)
    began = time.perf_counter()
    result = train(model, loss_fn, get_batch, cfg, eval_fn=eval_fn, callbacks=callbacks)
    complete = not result.stopped_early and result.step >= steps
    row = {"arm": arm, "seed": seed, "steps": steps, "steps_done": result.step, "complete": complete,
           "train_loss": result.final.get("loss"), "val_loss": result.final.get("eval_loss"),
           "seconds": round(time.perf_counter() - began, 1),
           "quantized_layers": len(report.converted), "bf16_layers": len(report.kept)}
    if run_dir:
        row.update(tokens=p["tokens"], passes=round(p["passes"], 3), tokens_per_param=round(p["tokens_per_param"], 2),
                   skipped_updates=result.final.get("skipped", 0))
    if ctrl is not None:
        rep = ctrl.report()
        row["nonfinite"] = sum(v["forward"] + v["backward"] for v in rep["nonfinite"].values())
        if "outcontrol" in rep:
            row["outcontrol_selected_at"] = rep["outcontrol"]["selected_at"]
        if "oscireset" in rep:
            hist = rep["oscireset"]["history"]
            row["last_reset_step"] = rep["oscireset"]["last_reset_step"]
            row["frac_reset_last"] = hist[-1]["frac_reset"] if hist and hist[-1]["reset"] else None
            row["oscillation_windows"] = len(hist)
    if run_dir:
        _write_run_files(run_dir, row, result.history, ctrl, report, preset.seq_len, p["tokens_per_step"])
        if complete:
            row.update(_final_eval(model, corpus, preset))
            _write_json(Path(run_dir) / "final.json", row)
    return row


class _Saver:
    """The sweep's callback: saves the fqt state where the loop checkpoints, and stops before the deadline."""

    def __init__(self, run_dir: str, every: int, steps: int, model: torch.nn.Module, ctrl: Optional[FQTController],
                 deadline: Optional[float], stop_at: Optional[int], margin_s: float = 30.0):
        self.dir = Path(run_dir) / "fqt_state"
        self.every, self.steps, self.model, self.ctrl = every, steps, model, ctrl
        self.deadline, self.stop_at, self.margin_s = deadline, stop_at, margin_s
        self.last_t: Optional[float] = None
        self.step_s = 0.0

    def __call__(self, state) -> None:
        now = time.time()
        if self.last_t is not None:
            self.step_s = max(self.step_s * 0.9, now - self.last_t)     # a slowly forgetting maximum
        self.last_t = now
        if self.stop_at is not None and state.step >= self.stop_at:
            state.stop = True
        if self.deadline is not None and now + 2 * self.step_s + self.margin_s > self.deadline:
            state.stop = True
        if self.every and (state.step % self.every == 0 or state.step == self.steps or state.stop):
            self.save(state.step)

    def save(self, step: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        side: dict[str, Any] = {"step": step}
        if self.ctrl is not None:
            side["fqt"] = fqt_state_dict(self.model)
            if self.ctrl.outcontrol is not None:
                side["outcontrol_selected_at"] = self.ctrl.outcontrol.selected_at
            osc = self.ctrl.oscireset
            if osc is not None:
                side["oscireset"] = {"snapshot_step": osc.snapshot_step, "last_reset_step": osc.last_reset_step,
                                     "history": osc.history,
                                     "tracks": {n: dict(vars(t)) for n, t in osc.tracks.items()}}
        else:
            side["fqt"] = {}
        tmp = self.dir / f"step_{step:08d}.pt.tmp"
        torch.save(side, tmp)
        os.replace(tmp, self.dir / f"step_{step:08d}.pt")
        for old in sorted(self.dir.glob("step_*.pt"))[:-2]:      # the loop keeps the last checkpoint; keep two
            old.unlink()


def _restore_controller(ctrl: FQTController, side: dict[str, Any]) -> None:
    from .oscireset import _Track

    if ctrl.outcontrol is not None and "outcontrol_selected_at" in side:
        ctrl.outcontrol.selected_at = side["outcontrol_selected_at"]
        ctrl.outcontrol._set_recording(next_step=ctrl.step + 1)
    osc = ctrl.oscireset
    if osc is not None and "oscireset" in side:
        s = side["oscireset"]
        osc.snapshot_step, osc.last_reset_step, osc.history = s["snapshot_step"], s["last_reset_step"], s["history"]
        osc.tracks = {}
        for name, fields in s["tracks"].items():
            track = _Track.__new__(_Track)
            track.__dict__.update(fields)
            osc.tracks[name] = track


def _final_eval(model, corpus, preset: RunPreset) -> dict[str, float]:
    """Loss on the validation split (every non-overlapping window, or the first ``final_eval_batches``
    batches of them), under the training autocast."""
    from ..data.text import eval_batches

    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad(), autocast:
        for x, y in eval_batches(corpus.val, preset.batch_size, preset.seq_len, device=device,
                                 max_batches=preset.final_eval_batches or None):
            _, loss = model(x, y)
            total += loss.item() * y.numel()
            count += y.numel()
    model.train()
    val = total / count
    return {"final_val_loss": val, "final_val_ppl": math.exp(val), "final_val_tokens": count}


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return str(v)




def _write_run_files(run_dir: str, row: dict[str, Any], history: list[dict], ctrl: Optional[FQTController],
                     report, seq_len: int, tokens_per_step: int) -> None:
    d = Path(run_dir)
    curve = []
    for h in history:
        sps = h.get("samples_per_s")
        curve.append({"arm": row["arm"], "seed": row["seed"], "kind": h["kind"], "step": h["step"],
                      "tokens": h["step"] * tokens_per_step, "loss": h.get("loss"), "lr": h.get("lr"),
                      "grad_norm": h.get("grad_norm"), "tokens_per_s": None if sps is None else round(sps * seq_len),
                      "skipped": h.get("skipped")})
    write_rows(d / "curve.csv", curve)
    osc_rows, layer_rows = [], []
    if ctrl is not None and ctrl.oscireset is not None:
        for w in ctrl.oscireset.history:
            base = {"arm": row["arm"], "seed": row["seed"], "step": w["step"], "snapshot": w["snapshot"],
                    "reset": w["reset"]}
            osc_rows.append({**base, "layer": "(all)", "frac_reset": w["frac_reset"]})
            for name, stats in w["layers"].items():
                osc_rows.append({**base, "layer": name, **stats})
    if osc_rows:
        write_rows(d / "oscireset.csv", osc_rows)
    for name, layer in report.converted.items():
        sums = layer.channel_norm_sum.float()
        sel = layer.fp8_channels
        share = float(sums[sel].sum() / sums.sum()) if sel.numel() and float(sums.sum()) > 0 else None
        layer_rows.append({"arm": row["arm"], "seed": row["seed"], "layer": name, "calls": layer.fqt_stats.calls,
                           "nonfinite_forward": layer.fqt_stats.nonfinite_forward,
                           "nonfinite_backward": layer.fqt_stats.nonfinite_backward,
                           "fp8_channels": int(sel.numel()), "fp8_norm_share": share})
    if layer_rows:
        write_rows(d / "layers.csv", layer_rows)
    _write_json(d / "status.json", row)


# ---------------------------------------------------------------------------------------------
# summary statistics

# two-sided 95 % Student t critical values by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def _mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def summarize(runs: list[dict[str, Any]], *, metric: str = "final_val_loss", baseline: str = "bf16",
              reference: str = "nvidia_nvfp4") -> list[dict[str, Any]]:
    """One row per arm over its complete runs: mean +- std (sample std) of the final validation loss and
    perplexity; the fraction of the bf16 gap closed relative to ``reference``,
    (L_ref - L_arm) / (L_ref - L_bf16), per seed (seeds where all three ran), averaged, and from the means
    (also in perplexity, the paper's unit); paired differences (arm - reference, and arm - tetrajet_v2 for
    the TetraJet-v2 variants): mean, std, t = mean / (std / sqrt(n)), whether |t| exceeds the two-sided 95 %
    Student t value, and whether |mean| exceeds the larger of the two arms' seed std ("outside the spread")."""
    done = [r for r in runs if r.get("complete") and r.get(metric) is not None]
    by_arm: dict[str, dict[int, float]] = {}
    for r in done:
        by_arm.setdefault(r["arm"], {})[int(r["seed"])] = float(r[metric])
    order = [a for a in ARMS if a in by_arm] + sorted(a for a in by_arm if a not in ARMS)
    stats = {a: _mean_std(list(by_arm[a].values())) for a in order}
    out = []
    for arm in order:
        vals = by_arm[arm]
        mean, std = stats[arm]
        ppl = [math.exp(v) for v in vals.values()]
        pm, ps = _mean_std(ppl)
        row: dict[str, Any] = {"arm": arm, "n_seeds": len(vals), "seeds": " ".join(str(s) for s in sorted(vals)),
                               "val_loss_mean": mean, "val_loss_std": std, "val_ppl_mean": pm, "val_ppl_std": ps}
        if baseline in by_arm and reference in by_arm:
            b, c = by_arm[baseline], by_arm[reference]
            per_seed = [(c[s] - vals[s]) / (c[s] - b[s]) for s in vals if s in b and s in c and c[s] != b[s]]
            row["gap_closed_mean"], row["gap_closed_std"] = _mean_std(per_seed)
            denom = stats[reference][0] - stats[baseline][0]
            row["gap_closed_of_means"] = (stats[reference][0] - mean) / denom if denom else float("nan")
            bp, cp = math.exp(stats[baseline][0]), math.exp(stats[reference][0])
            row["gap_closed_ppl_of_means"] = (cp - math.exp(mean)) / (cp - bp) if cp != bp else float("nan")
        refs = [reference] + (["tetrajet_v2"] if arm.startswith("tetrajet_v2_") else [])
        for ref in refs:
            if ref == arm or ref not in by_arm:
                continue
            diffs = [vals[s] - by_arm[ref][s] for s in vals if s in by_arm[ref]]
            dm, ds = _mean_std(diffs)
            tag = f"diff_vs_{ref}"
            row[f"{tag}_mean"], row[f"{tag}_std"], row[f"{tag}_n"] = dm, ds, len(diffs)
            t = dm / (ds / math.sqrt(len(diffs))) if len(diffs) > 1 and ds > 0 else float("nan")
            row[f"{tag}_t"] = t
            row[f"{tag}_significant95"] = bool(abs(t) > T95.get(len(diffs) - 1, 1.96)) if math.isfinite(t) else None
            spread = max(std, stats[ref][1])
            row[f"{tag}_outside_spread"] = bool(abs(dm) > spread) if math.isfinite(spread) else None
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------
# the sweep launcher

def _run_name(arm: str, seed: int) -> str:
    return f"{arm}_s{seed}"


def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    try:
        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:                                  # no driver
        return []


def sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    deadline = t0 + args.budget_min * 60 if args.budget_min > 0 else None
    seeds = args.seeds
    jobs = [(arm, s) for s in seeds for arm in args.arms]                    # seed-major: paired seeds first
    done = {j for j in jobs if (out_dir / _run_name(*j) / "final.json").is_file()}
    started = [j for j in jobs if j not in done and (out_dir / _run_name(*j) / "checkpoints").is_dir()]
    queue = started + [j for j in jobs if j not in done and j not in started]       # resume unfinished runs first
    gpus = _visible_gpus() if args.device != "cpu" else []
    slots = [g for g in gpus for _ in range(args.procs_per_gpu)] if gpus else [None] * max(1, args.workers)
    print(f"sweep: {len(jobs)} runs, {len(done)} done, {len(started)} to resume, {len(slots)} slots "
          f"({'GPUs ' + ','.join(gpus) if gpus else 'CPU'}), budget "
          f"{args.budget_min or 'none'} min, out {out_dir}", flush=True)
    lock = threading.Lock()

    def take() -> Optional[tuple[str, int]]:
        with lock:
            time_left = deadline - time.time() if deadline else float("inf")
            if not queue or time_left <= args.min_start_s:
                return None
            return queue.pop(0)

    def serve(slot: Optional[str]) -> None:
        """One slot: a long-lived worker process (imports, corpus and compiled kernels are paid once) that
        runs the queue's next job until none is left or the budget is near; a fresh one after a failure."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot
        proc = None
        while (job := take()) is not None:
            run_dir = out_dir / _run_name(*job)
            run_dir.mkdir(parents=True, exist_ok=True)
            spec = {"arm": job[0], "seed": job[1], "preset": args.preset, "corpus": args.corpus,
                    "steps": args.steps, "run_dir": str(run_dir), "deadline": deadline, "threads": args.threads,
                    "preset_changes": args.preset_changes, "device": "cuda" if slot is not None else "cpu"}
            if proc is None:
                proc = subprocess.Popen([sys.executable, "-m", "fewer.fqt.recipe_run", "--worker-loop"], env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
            print(f"[{time.time() - t0:7.1f}s] start {_run_name(*job)} on {slot or 'cpu'}", flush=True)
            proc.stdin.write(json.dumps(spec) + "\n")
            proc.stdin.flush()
            rc = -1                                      # -1: the worker died without an answer
            while line := proc.stdout.readline():
                reply = line.split()
                if len(reply) == 2 and reply[0] == "RESULT":
                    rc = int(reply[1])
                    break
                print(f"[{slot or 'cpu'}] {line.rstrip()}", flush=True)    # stray output, not the protocol
            status = {0: "complete", 3: "stopped (checkpointed)"}.get(rc, f"failed ({rc}, see log.txt)")
            print(f"[{time.time() - t0:7.1f}s] {status}: {_run_name(*job)}", flush=True)
            if rc not in (0, 3):                         # a failed job may leave the process unusable
                proc.kill()
                proc.wait()
                proc = None
        if proc is not None:
            proc.stdin.close()
            proc.wait()

    threads = [threading.Thread(target=serve, args=(slot,), daemon=True) for slot in slots]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if queue:
        print(f"budget: {len(queue)} runs not started (less than {args.min_start_s}s left)", flush=True)
    rows = aggregate(out_dir, args.export, args.arms, seeds)
    return rows


def _read_csv(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def aggregate(out_dir: Path, export: str, arms: list[str], seeds: list[int]) -> list[dict[str, Any]]:
    """Collect every run under out_dir into fqt_sweep_{runs,curves,oscireset,layers,summary}.csv (stamped by
    fewer.bench.write_csv, under ``export``/<gpu-slug>/ or out_dir/<gpu-slug>/) plus fqt_sweep_logs.tar.gz."""
    from ..bench import write_csv

    runs, curves, osc, layers = [], [], [], []
    for arm in arms:
        for seed in seeds:
            d = out_dir / _run_name(arm, seed)
            final, status = d / "final.json", d / "status.json"
            if final.is_file():
                runs.append(json.loads(final.read_text()))
            elif status.is_file():
                runs.append(json.loads(status.read_text()))
            else:
                runs.append({"arm": arm, "seed": seed, "complete": False, "steps_done": 0})
            curves += _read_csv(d / "curve.csv")
            osc += _read_csv(d / "oscireset.csv")
            layers += _read_csv(d / "layers.csv")
    summary = summarize(runs)
    target = Path(export) if export else out_dir
    paths = [write_csv(runs, "fqt", "sweep_runs", target)]
    for rows, name in ((curves, "sweep_curves"), (osc, "sweep_oscireset"), (layers, "sweep_layers"),
                       (summary, "sweep_summary")):
        if rows:
            paths.append(write_csv(rows, "fqt", name, target))
    tar_path = paths[0].parent / "fqt_sweep_logs.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        for d in sorted(out_dir.iterdir()):
            if not d.is_dir():
                continue
            for name in ("final.json", "status.json", "curve.csv", "oscireset.csv", "layers.csv", "log.txt",
                         "metrics.jsonl", "config.json", "env.json"):
                if (d / name).is_file():
                    tar.add(d / name, arcname=f"{d.name}/{name}")
    print(f"\n{'arm':<24}{'seed':>5}{'done':>7}{'steps':>8}{'val loss':>10}{'ppl':>9}{'min':>7}")
    for r in runs:
        v = r.get("final_val_loss")
        print(f"{r['arm']:<24}{r['seed']:>5}{str(bool(r.get('complete'))):>7}{r.get('steps_done') or 0:>8}"
              f"{v if v is None else format(float(v), '.4f'):>10}"
              f"{'' if v is None else format(math.exp(float(v)), '.2f'):>9}"
              f"{float(r.get('seconds', 0) or 0) / 60:>7.1f}")
    if summary:
        print(f"\n{'arm':<24}{'n':>3}{'val loss':>18}{'gap closed':>12}{'vs nvidia':>11}{'outside':>9}")
        for s in summary:
            gc = s.get("gap_closed_mean")
            dv = s.get("diff_vs_nvidia_nvfp4_mean")
            print(f"{s['arm']:<24}{s['n_seeds']:>3}{s['val_loss_mean']:>10.4f} +-{s['val_loss_std']:>6.4f}"
                  f"{'' if gc is None else format(gc, '.3f'):>12}{'' if dv is None else format(dv, '+.4f'):>11}"
                  f"{str(s.get('diff_vs_nvidia_nvfp4_outside_spread', '')):>9}")
    for p in paths + [tar_path]:
        print("wrote", p)
    return runs


def _worker(spec: dict[str, Any], corpora: dict[str, Any]) -> int:
    """Run one sweep job; 0 if it completed, 3 if it stopped before the end (checkpointed)."""
    from ..data.text import load_corpus

    torch.set_num_threads(int(spec.get("threads") or 1))
    preset = dataclasses.replace(RUN_PRESETS[spec["preset"]], **(spec.get("preset_changes") or {}))
    name = spec.get("corpus") or preset.corpus
    if name not in corpora:
        corpora[name] = load_corpus(name)
    row = run_arm(spec["arm"], preset, corpora[name], seed=int(spec["seed"]), steps=spec.get("steps") or None,
                  run_dir=spec["run_dir"], deadline=spec.get("deadline"), device=spec.get("device", "auto"))
    print(json.dumps(row, default=str), flush=True)
    return 0 if row["complete"] else 3


def _worker_loop() -> None:
    """Read job specs (JSON lines) from stdin, run each with its output in <run_dir>/log.txt, answer
    ``RESULT <code>`` on stdout (1: the job raised; its traceback is in the log)."""
    sys.stdout.flush()
    proto = os.fdopen(os.dup(1), "w")        # the answers go to the pipe; anything written to fd 1 from C
    os.dup2(2, 1)                             # code (kernels, profilers) goes to stderr instead
    sys.stdout = os.fdopen(1, "w", closefd=False)
    corpora: dict[str, Any] = {}
    for line in sys.stdin:
        if not line.strip():
            continue
        spec = json.loads(line)
        with open(Path(spec["run_dir"]) / "log.txt", "a") as log:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                try:
                    rc = _worker(spec, corpora)
                except Exception:
                    traceback.print_exc()
                    rc = 1
        proto.write(f"RESULT {rc}\n")
        proto.flush()


# ---------------------------------------------------------------------------------------------
# command line

def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m fewer.fqt.recipe_run", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(RUN_PRESETS))
    parser.add_argument("--arms", nargs="+", default=None, help="default: all 7 (the --sweep --tiny: 2)")
    parser.add_argument("--corpus", default="", help="a corpus of fewer.data.text (shakespeare, english); "
                                                     "default: the preset's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="the sweep's paired seeds (default 0 1 2)")
    parser.add_argument("--steps", type=int, default=0, help="override the preset's step count / token budget")
    parser.add_argument("--out", default="", help="CSV file for the rows")
    parser.add_argument("--distributed", default="none", choices=("none", "ddp", "fsdp2"),
                        help="under torchrun: DDP or FSDP2 (gloo on CPU)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: on a small shared CPU more threads only contend)")
    sw = parser.add_argument_group("budget and sweep")
    sw.add_argument("--tokens-per-param", type=float, default=None, help="override the preset's (gpu: 50)")
    sw.add_argument("--param-count", choices=PARAM_COUNTS, default=None, help="which params (gpu: non_embedding)")
    sw.add_argument("--max-passes", type=float, default=None, help="cap tokens at this many passes (0: no cap)")
    sw.add_argument("--plan", action="store_true", help="print the budget (and GPU minutes with --step-csv) and exit")
    sw.add_argument("--step-csv", default="", help="benchmarks/results/<gpu>/fqt_step.csv for --plan's estimate")
    sw.add_argument("--sweep", action="store_true", help="arms x seeds as worker processes, one per GPU slot")
    sw.add_argument("--tiny", action="store_true", help="with --sweep: CPU, 2 arms x 2 seeds x 6 steps, Shakespeare")
    sw.add_argument("--out-dir", default="runs/fqt_sweep", help="per-run folders (resume: the same folder)")
    sw.add_argument("--export", default="", help="aggregated CSVs under <export>/<gpu-slug>/ (e.g. $OUT)")
    sw.add_argument("--budget-min", type=float, default=0.0, help="wall-clock budget of this call in minutes")
    sw.add_argument("--min-start-s", type=float, default=90.0, help="start no run with less time left")
    sw.add_argument("--procs-per-gpu", type=int, default=1)
    sw.add_argument("--workers", type=int, default=2, help="CPU worker processes when no GPU is visible")
    sw.add_argument("--device", default="auto", choices=("auto", "cpu"))
    sw.add_argument("--worker-loop", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_loop:
        _worker_loop()
        return []
    if args.tiny:
        if not args.sweep:
            parser.error("--tiny is the sweep's CPU mode: add --sweep (the plain smoke run is --preset tiny)")
        args.preset, args.device = "tiny_sweep", "cpu"
        args.arms = args.arms or ["bf16", "tetrajet_v2_full"]
        args.seeds = args.seeds or [0, 1]
    args.arms = args.arms or list(ARMS)
    args.seeds = args.seeds or [0, 1, 2]
    for arm in args.arms:
        get_recipe(arm)                          # fail fast on a bad name
    preset = RUN_PRESETS[args.preset]
    changes = {k: v for k, v in (("tokens_per_param", args.tokens_per_param), ("param_count", args.param_count),
                                 ("max_passes", args.max_passes)) if v is not None}
    if args.corpus:
        changes["corpus"] = args.corpus
    preset = dataclasses.replace(preset, **changes)
    args.corpus, args.preset_changes = preset.corpus, changes         # the workers apply the same changes
    if args.plan:
        from ..data.text import load_corpus
        p = plan(preset, load_corpus(preset.corpus).train.size, steps=args.steps or None)
        print(json.dumps(p, indent=1))
        if args.step_csv:
            minutes = estimate_minutes(p, args.step_csv)
            total = sum(minutes.get(a, float("nan")) for a in args.arms) * len(args.seeds)
            for arm in args.arms:
                print(f"{arm:<24}{minutes.get(arm, float('nan')):8.1f} GPU-min per run")
            print(f"sweep: {total:.0f} GPU-min for {len(args.arms)} arms x {len(args.seeds)} seeds "
                  f"(step time only; + ~3 % evaluation, + OsciReset windows)")
        return [p]
    if args.sweep:
        return sweep(args)
    torch.set_num_threads(args.threads)
    from ..data.text import load_corpus
    corpus = load_corpus(preset.corpus)
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
