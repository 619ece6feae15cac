"""The experiment runner: teacher, sCM / rCM / DMD-only students at 1, 2, 4 steps, over seeds,
on the 2-D Gaussian-mixture toy (exact teacher) and on the sklearn digits (DiT teacher).

    fewer distill toy --preset cpu --out runs/distill_toy          # table + CSV
    fewer distill digits --preset cpu --out runs/distill_digits

Toy: the student and fake score start from a ToyMLP pre-trained by flow matching on the mixture (the
"MLP teacher", shared by all seeds); the tangent and the DMD real score use the ANALYTIC teacher with
CFG. Reference = the analytic teacher's ODE (DDIM, ``ref_steps`` steps) from the same noise.
Digits: a small class-conditional DiT trained by flow matching (the teacher, shared by all seeds),
students start from it; metrics from the foundation's digit classifier (Frechet distance in its
features against the held-out test digits, class accuracy, precision/recall, per-class diversity) and
the paired distance to the teacher's 50-step samples from the same noise.
Seeds vary the distillation (data order, noise, times); teacher / init training is seed 0.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from .. import bench
from ..core.config import Config, check_choice, check_positive_int, check_range
from ..models.denoiser import LogNormalTime, TrigFlowDenoiser, flow_matching_steps, trigflow_loss
from .rcm import DistillConfig, distill
from .samplers import consistency_sample, per_sample_noise, teacher_sample
from .toy import AnalyticGMMTeacher, ToyMLP, ring, toy_metrics

METHOD_CHOICES = ("scm", "rcm", "dmd", "all")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecipeConfig(Config):
    testbed: str = "toy"            # "toy" | "digits"
    methods: str = "all"            # "scm" | "rcm" | "dmd" | "all"
    seeds: int = 3
    steps: int = 600                # distillation: student updates
    lam: float = -1.0               # rCM lambda (>= 0); -1 = the distill preset's
    lam_sweep: str = ""             # comma-separated lambdas for an extra rCM sweep at seed 0 ("" = none)
    guidance_scale: float = 2.0
    init_steps: int = 1500          # toy: MLP flow-matching pre-training; digits: teacher training steps
    num_samples: int = 2000         # evaluation samples (class-balanced)
    teacher_steps: int = 50
    ref_steps: int = 400            # toy: the analytic reference ODE
    student_steps: str = "1,2,4"
    dit_dim: int = 48               # digits teacher size
    dit_depth: int = 2
    batch_size: int = 0             # 0 = the distill preset's
    lr: float = 0.0                 # 0 = the distill preset's
    threads: int = 1

    def validate(self) -> None:
        check_choice(self, "testbed", ("toy", "digits"))
        check_choice(self, "methods", METHOD_CHOICES)
        for name in ("seeds", "steps", "init_steps", "num_samples", "teacher_steps", "ref_steps", "dit_dim",
                     "dit_depth", "threads"):
            check_positive_int(self, name)
        check_range(self, "guidance_scale", 0.0, None)
        check_range(self, "batch_size", 0, None)
        check_range(self, "lr", 0.0, None)
        if self.lam < 0 and self.lam != -1.0:
            raise ValueError(f"RecipeConfig.lam={self.lam} is not allowed: the DMD weight lambda must be >= 0 "
                             "(-1 = use the distill preset's lambda)")
        self.lambdas()
        self.step_list()

    def lambdas(self) -> list[float]:
        out = [float(v) for v in self.lam_sweep.split(",") if v.strip()]
        if any(v < 0 for v in out):
            raise ValueError(f"RecipeConfig.lam_sweep={self.lam_sweep!r}: lambda must be >= 0")
        return out

    def step_list(self) -> list[int]:
        out = [int(v) for v in self.student_steps.split(",") if v.strip()]
        if not out or any(v < 1 for v in out):
            raise ValueError(f"RecipeConfig.student_steps={self.student_steps!r}: give positive integers like '1,2,4'")
        return out

    def distill_config(self, method: str, seed: int, lam: float | None = None) -> DistillConfig:
        preset = "toy-cpu" if self.testbed == "toy" else "digits-cpu"
        over: dict[str, Any] = dict(method=method, seed=seed, steps=self.steps, guidance_scale=self.guidance_scale)
        if lam is not None:
            over["lam"] = lam
        elif self.lam >= 0:
            over["lam"] = self.lam
        if self.batch_size:
            over["batch_size"] = self.batch_size
        if self.lr:
            over["lr"] = self.lr
        return DistillConfig.from_preset(preset, **over)


RecipeConfig.register_preset("cpu", steps=400, init_steps=1000, batch_size=128, num_samples=1000)
RecipeConfig.register_preset("toy-cpu", steps=400, init_steps=1000, batch_size=128, num_samples=1000)
RecipeConfig.register_preset("digits-cpu", testbed="digits", steps=200, init_steps=800, num_samples=300,
                             ref_steps=50, batch_size=32, lam=1.0)
RecipeConfig.register_preset("gpu", steps=4000, init_steps=5000, num_samples=10000)
RecipeConfig.register_preset("digits-gpu", testbed="digits", steps=3000, init_steps=6000, num_samples=2000,
                             dit_dim=128, dit_depth=4, ref_steps=50)


def _summarise(rows: list[dict[str, Any]], keys: tuple[str, ...], metrics: list[str]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    out = []
    for key, members in groups.items():
        s = dict(zip(keys, key))
        s["seeds"] = len(members)
        for m in metrics:
            vals = [float(r[m]) for r in members if r.get(m) is not None]
            if not vals:
                continue
            s[m] = statistics.fmean(vals)
            s[m + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(s)
    return out


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    bench.write_rows(path, rows, float_format=".6g")


def write_sample_csv(samples: dict[str, torch.Tensor], path: Path, per_name: int) -> None:
    """The first ``per_name`` samples of each entry, flattened: columns name, index, v0, v1, ... (for plots)."""
    rows = []
    for name, x in samples.items():
        flat = x[:per_name].reshape(min(per_name, x.shape[0]), -1).double()
        for i, vec in enumerate(flat):
            rows.append({"name": name, "index": i, **{f"v{j}": float(v) for j, v in enumerate(vec)}})
    write_csv(rows, path)


def read_sample_csv(path: Path) -> dict[str, torch.Tensor]:
    """Inverse of ``write_sample_csv``: name -> [N, D] float tensor."""
    out: dict[str, list[list[float]]] = {}
    with open(path) as fh:
        for row in csv.DictReader(fh):
            vals = [float(row[k]) for k in row if k.startswith("v")]
            out.setdefault(row["name"], []).append(vals)
    return {k: torch.tensor(v) for k, v in out.items()}


def _time_it(fn, repeat: int = 3) -> float:
    fn()
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ---------------------------------------------------------------------------------------------
# Toy
# ---------------------------------------------------------------------------------------------

def pretrain_toy(gmm, sigma_d: float, steps: int, seed: int = 0, batch: int = 512, lr: float = 2e-3,
                 class_dropout: float = 0.1) -> TrigFlowDenoiser:
    """A ToyMLP trained by flow matching on mixture samples (labels dropped to null 10 % for CFG)."""
    torch.manual_seed(seed)
    den = TrigFlowDenoiser(ToyMLP(num_classes=gmm.num_classes), sigma_d=sigma_d)
    opt = torch.optim.AdamW(den.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    times = LogNormalTime(-0.8, 1.6, sigma_d)
    for _ in range(steps):
        x0, y, _ = gmm.sample(batch, gen)
        drop = torch.rand(batch, generator=gen) < class_dropout
        y = torch.where(drop, torch.full_like(y, gmm.num_classes), y)
        loss = trigflow_loss(den, x0, y, generator=gen, time_sampler=times).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return den.eval()


def run_toy(cfg: RecipeConfig, progress: bool = True) -> dict[str, Any]:
    torch.set_num_threads(cfg.threads)
    gmm = ring()
    sd = gmm.sigma_d
    teacher = AnalyticGMMTeacher(gmm, sd)
    t0 = time.perf_counter()
    init = pretrain_toy(gmm, sd, cfg.init_steps)
    init_seconds = time.perf_counter() - t0
    n = cfg.num_samples
    labels = torch.arange(n) % gmm.num_classes
    steps_list = cfg.step_list()
    noise = per_sample_noise(range(10_000, 10_000 + n), (gmm.dim,), max(steps_list))
    ref = teacher_sample(teacher, noise[0], labels, steps=cfg.ref_steps, guidance_scale=cfg.guidance_scale)
    rows: list[dict[str, Any]] = []
    samples: dict[str, torch.Tensor] = {"reference": ref}

    def timed(fn):
        return _time_it(fn, 2)

    # teachers (deterministic: one row per seed for a uniform table)
    t_an = teacher_sample(teacher, noise[0], labels, steps=cfg.teacher_steps, guidance_scale=cfg.guidance_scale)
    t_mlp = teacher_sample(init, noise[0], labels, steps=cfg.teacher_steps, guidance_scale=cfg.guidance_scale)
    mlp_seconds = timed(lambda: teacher_sample(init, noise[0], labels, steps=cfg.teacher_steps,
                                               guidance_scale=cfg.guidance_scale))
    samples["teacher (MLP, 50 steps)"] = t_mlp
    for seed in range(cfg.seeds):
        rows.append(dict(method="analytic teacher", steps=cfg.teacher_steps, nfe=2 * cfg.teacher_steps, seed=seed,
                         lam="", **toy_metrics(gmm, t_an, ref)))
        rows.append(dict(method="MLP teacher (init)", steps=cfg.teacher_steps, nfe=2 * cfg.teacher_steps, seed=seed,
                         lam="", **toy_metrics(gmm, t_mlp, ref), sample_seconds=mlp_seconds, speedup=1.0))

    def data_for(dcfg):
        def data_fn(step, gen):
            x0, y, _ = gmm.sample(dcfg.batch_size, gen)
            return x0, y
        return data_fn

    def evaluate(student, method, seed, lam, extra, out_rows):
        for k in steps_list:
            s = consistency_sample(student, noise, labels, steps=k)
            secs = timed(lambda: consistency_sample(student, noise, labels, steps=k))
            out_rows.append(dict(method=method, steps=k, nfe=k, seed=seed, lam=lam, **toy_metrics(gmm, s, ref),
                                 sample_seconds=secs, speedup=mlp_seconds / secs, **extra))
            if seed == 0:
                samples[f"{method} {k}-step" + (f" lam={lam}" if lam != "" and method == "rcm" else "")] = s

    def describe(r):
        return f"{r['steps']}-step prec {r['precision']:.3f} modes {r['modes_covered']:.0f} energy {r['energy']:.4f}"

    sweep_rows = _distill_students(cfg, init, teacher, data_for, evaluate, rows, describe, "toy", progress)
    metrics = ["precision", "modes_covered", "modes_present", "paired_l2", "energy", "sample_seconds", "speedup"]
    return {"rows": rows, "summary": _summarise(rows, ("method", "steps", "nfe", "lam"), metrics),
            "sweep": sweep_rows, "samples": samples, "init_seconds": init_seconds, "sigma_d": sd}


# ---------------------------------------------------------------------------------------------
# Digits
# ---------------------------------------------------------------------------------------------

def train_digits_teacher(data, cfg: RecipeConfig, seed: int = 0) -> TrigFlowDenoiser:
    """A small class-conditional DiT (QK-norm, moderate time scale for stable JVPs) trained with the
    TrigFlow flow-matching loss through fewer's one training loop."""
    from ..models.dit import DiT, DiTConfig
    from ..train import TrainConfig, train

    torch.manual_seed(seed)
    net = DiT(DiTConfig.from_preset("digits8", dim=cfg.dit_dim, depth=cfg.dit_depth, heads=4, qk_norm=True,
                                    time_scale=10.0))
    den = TrigFlowDenoiser(net, sigma_d=0.5)
    get_batch, loss_fn = flow_matching_steps(data, 64, seed, LogNormalTime(-0.8, 1.6, 0.5))

    tcfg = TrainConfig(steps=cfg.init_steps, lr=2e-3, warmup_steps=min(50, cfg.init_steps), schedule="cosine", weight_decay=0.0,
                       grad_clip=1.0, log_every=100, seed=seed, progress=False, device="cpu", resume="never",
                       beta2=0.99)
    train(den, loss_fn, get_batch, tcfg)
    return den.eval()


def run_digits(cfg: RecipeConfig, progress: bool = True) -> dict[str, Any]:
    from ..data import load_digits
    from ..eval.image_metrics import SampleEvaluator
    from ..models.classifier import train_classifier

    torch.set_num_threads(cfg.threads)
    data = load_digits()
    t0 = time.perf_counter()
    teacher = train_digits_teacher(data, cfg)
    init_seconds = time.perf_counter() - t0
    classifier = train_classifier(data.train_x, data.train_y, steps=300, seed=0)
    evaluator = SampleEvaluator(classifier, data.test_x)
    n = cfg.num_samples
    labels = torch.arange(n) % data.num_classes
    steps_list = cfg.step_list()
    shape = data.image_shape
    noise = per_sample_noise(range(10_000, 10_000 + n), shape, max(steps_list))
    gs = cfg.guidance_scale
    t_samples = teacher_sample(teacher, noise[0], labels, steps=cfg.teacher_steps, guidance_scale=gs)
    t_seconds = _time_it(lambda: teacher_sample(teacher, noise[0], labels, steps=cfg.teacher_steps,
                                                guidance_scale=gs), 1)
    rows: list[dict[str, Any]] = []
    samples = {"teacher": t_samples.clamp(-1, 1)}
    real = evaluator(data.train_x[:n], data.train_y[:n])

    def metrics_of(x):
        x = x.clamp(-1, 1)
        m = evaluator(x, labels)
        m["paired_l2"] = float((x - t_samples.clamp(-1, 1)).flatten(1).norm(dim=1).mean())
        return {k: m[k] for k in ("frechet_distance", "class_accuracy", "precision", "recall", "diversity",
                                  "paired_l2")}

    t_metrics = metrics_of(t_samples)
    for seed in range(cfg.seeds):
        rows.append(dict(method="real train digits", steps=0, nfe=0, seed=seed, lam="",
                         frechet_distance=real["frechet_distance"], class_accuracy=real["class_accuracy"],
                         precision=real["precision"], recall=real["recall"], diversity=real["diversity"]))
        rows.append(dict(method="DiT teacher", steps=cfg.teacher_steps, nfe=2 * cfg.teacher_steps, seed=seed, lam="",
                         **t_metrics, sample_seconds=t_seconds, speedup=1.0))
    for k in steps_list:  # the teacher with as few steps as the students (no distillation)
        x = teacher_sample(teacher, noise[0], labels, steps=k, guidance_scale=gs)
        m = metrics_of(x)
        for seed in range(cfg.seeds):
            rows.append(dict(method="teacher, few steps", steps=k, nfe=2 * k, seed=seed, lam="", **m))

    def data_for(dcfg):
        def data_fn(step, gen):
            return data.batch(dcfg.batch_size, step, seed=dcfg.seed + 1)
        return data_fn

    def evaluate(student, method, seed, lam, extra, out_rows):
        for k in steps_list:
            s = consistency_sample(student, noise, labels, steps=k)
            secs = _time_it(lambda: consistency_sample(student, noise, labels, steps=k), 1)
            out_rows.append(dict(method=method, steps=k, nfe=k, seed=seed, lam=lam, **metrics_of(s),
                                 sample_seconds=secs, speedup=t_seconds / secs, **extra))
            if seed == 0:
                samples[f"{method} {k}-step" + (f" lam={lam}" if method == "rcm" else "")] = s.clamp(-1, 1)

    def describe(r):
        return f"{r['steps']}-step FD {r['frechet_distance']:.2f} acc {r['class_accuracy']:.3f} div {r['diversity']:.2f}"

    sweep_rows = _distill_students(cfg, teacher, teacher, data_for, evaluate, rows, describe, "digits", progress)
    metrics = ["frechet_distance", "class_accuracy", "precision", "recall", "diversity", "paired_l2",
               "sample_seconds", "speedup"]
    return {"rows": rows, "summary": _summarise(rows, ("method", "steps", "nfe", "lam"), metrics),
            "sweep": sweep_rows, "samples": samples, "init_seconds": init_seconds,
            "real_diversity": real["real_diversity"]}


def _distill_students(cfg: RecipeConfig, init, teacher, data_for, evaluate, rows: list, describe, tag: str,
                      progress: bool) -> list[dict[str, Any]]:
    """Distil a copy of ``init`` with every method and seed (rows appended to ``rows`` by ``evaluate``), then
    the rCM lambda sweep on seed 0; returns the sweep's rows. ``data_for(dcfg)`` gives the sCM data stream."""
    methods = ["scm", "rcm", "dmd"] if cfg.methods == "all" else [cfg.methods]

    def run(dcfg, method, lam, out_rows):
        student = copy.deepcopy(init)
        res = distill(student, teacher, data_for(dcfg), dcfg, progress=False)
        before = len(out_rows)
        evaluate(student, method, dcfg.seed, lam, {"train_seconds": res.seconds,
                                                   "nonfinite": res.nonfinite_samples}, out_rows)
        return out_rows[before:], res.seconds

    for seed in range(cfg.seeds):
        for method in methods:
            dcfg = cfg.distill_config(method, seed)
            new, seconds = run(dcfg, method, dcfg.lam if method == "rcm" else "", rows)
            if progress:
                print(f"[{tag}] seed {seed} {method}: " + "; ".join(map(describe, new)) + f" ({seconds:.0f}s)",
                      flush=True)
    sweep_rows: list[dict[str, Any]] = []
    for lam in cfg.lambdas():
        new, _ = run(cfg.distill_config("rcm", 0, lam), "rcm", lam, sweep_rows)
        if progress:
            print(f"[{tag}] lambda {lam}: " + "; ".join(map(describe, new)), flush=True)
    return sweep_rows


def run_recipe(cfg: RecipeConfig, out_dir: str | Path = "", progress: bool = True) -> dict[str, Any]:
    result = run_toy(cfg, progress) if cfg.testbed == "toy" else run_digits(cfg, progress)
    if out_dir:
        out = Path(out_dir)
        write_csv(result["rows"], out / f"distill_{cfg.testbed}_runs.csv")
        write_csv(result["summary"], out / f"distill_{cfg.testbed}.csv")
        if result["sweep"]:
            write_csv(result["sweep"], out / f"distill_{cfg.testbed}_lambda.csv")
        write_sample_csv(result["samples"], out / f"distill_{cfg.testbed}_samples.csv",
                         per_name=400 if cfg.testbed == "toy" else 20)
        (out / f"distill_{cfg.testbed}_config.json").write_text(cfg.to_json())
    return result


# ---------------------------------------------------------------------------------------------
# Sampling speed (interleaved, min over repeats, so CPU contention hits teacher and students alike)
# ---------------------------------------------------------------------------------------------

def speed_table(repeats: int = 5, num_samples: int = 500, teacher_steps: int = 50, guidance_scale: float = 2.0,
                dit_dim: int = 48, dit_depth: int = 2, threads: int = 1) -> list[dict[str, Any]]:
    """Wall-clock of the teacher's 50-step CFG ODE sampler vs 1/2/4-step consistency sampling of the same
    network (weights do not change the cost), toy MLP and digits DiT, batch ``num_samples``. Each repeat
    times every sampler once in turn; the minimum per sampler is reported."""
    from ..models.dit import DiT, DiTConfig

    torch.set_num_threads(threads)
    nets = {"toy MLP": (TrigFlowDenoiser(ToyMLP(), sigma_d=0.68).eval(), (2,)),
            "digits DiT": (TrigFlowDenoiser(DiT(DiTConfig.from_preset(
                "digits8", dim=dit_dim, depth=dit_depth, heads=4, qk_norm=True, time_scale=10.0)), 0.5).eval(),
                           (1, 8, 8))}
    rows = []
    for name, (net, shape) in nets.items():
        labels = torch.arange(num_samples) % 2
        noise = per_sample_noise(range(num_samples), shape, 4)
        runs = {"teacher": lambda: teacher_sample(net, noise[0], labels, steps=teacher_steps,
                                                  guidance_scale=guidance_scale)}
        for k in (1, 2, 4):
            runs[f"student {k}"] = (lambda k=k: consistency_sample(net, noise, labels, steps=k))
        best = {key: math.inf for key in runs}
        for fn in runs.values():
            fn()
        for _ in range(repeats):
            for key, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                best[key] = min(best[key], time.perf_counter() - t0)
        for key, secs in best.items():
            steps = teacher_steps if key == "teacher" else int(key.split()[1])
            nfe = 2 * steps if key == "teacher" else steps
            rows.append({"model": name, "sampler": key, "steps": steps, "nfe": nfe, "batch": num_samples,
                         "seconds": secs, "speedup": best["teacher"] / secs, "nfe_ratio": 2 * teacher_steps / nfe,
                         "threads": threads})
    return rows


# ---------------------------------------------------------------------------------------------
# sCM switches on the toy (one table row per variant)
# ---------------------------------------------------------------------------------------------

SCM_VARIANTS: dict[str, dict[str, Any]] = {
    "default (l2, no warm-up)": {},
    "warm-up sCM style, H=200": {"warmup": "scm", "warmup_steps": 200},
    "warm-up rCM style, H=200": {"warmup": "rcm", "warmup_steps": 200},
    "clip normalisation": {"normalization": "clip"},
    "rms normalisation": {"normalization": "rms"},
    "no normalisation": {"normalization": "none"},
    "adaptive weighting": {"adaptive": True},
    "prior weighting 1/(sigma_d tan t)": {"prior_weighting": True},
    "discrete, N=64": {"variant": "discrete", "discrete_steps": 64},
    "finite-difference tangent": {"tangent": "fd"},
}


def toy_scm_ablation(cfg: RecipeConfig, variants: dict[str, dict[str, Any]] | None = None,
                     progress: bool = True) -> list[dict[str, Any]]:
    """sCM on the toy under each switch (cfg.seeds seeds, the same init and evaluation as ``run_toy``)."""
    torch.set_num_threads(cfg.threads)
    gmm = ring()
    sd = gmm.sigma_d
    teacher = AnalyticGMMTeacher(gmm, sd)
    init = pretrain_toy(gmm, sd, cfg.init_steps)
    n = cfg.num_samples
    labels = torch.arange(n) % gmm.num_classes
    steps_list = cfg.step_list()
    noise = per_sample_noise(range(10_000, 10_000 + n), (gmm.dim,), max(steps_list))
    ref = teacher_sample(teacher, noise[0], labels, steps=cfg.ref_steps, guidance_scale=cfg.guidance_scale)
    rows = []
    for name, over in (variants or SCM_VARIANTS).items():
        for seed in range(cfg.seeds):
            dcfg = cfg.distill_config("scm", seed).replace(**over)
            student = copy.deepcopy(init)
            res = distill(student, teacher, lambda step, gen: gmm.sample(dcfg.batch_size, gen)[:2], dcfg)
            for k in steps_list:
                s = consistency_sample(student, noise, labels, steps=k)
                rows.append(dict(variant=name, steps=k, seed=seed, **toy_metrics(gmm, s, ref),
                                 nonfinite=res.nonfinite_samples, train_seconds=res.seconds))
            if progress:
                print(f"[ablation] {name} seed {seed}: " + "; ".join(
                    f"{r['steps']}-step prec {r['precision']:.3f} energy {r['energy']:.4f}"
                    for r in rows[-len(steps_list):]), flush=True)
    return rows
