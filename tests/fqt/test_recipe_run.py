"""The sweep launcher of fewer.fqt.recipe_run and the step benchmark's CPU mode (benchmarks/fqt/bench_step.py)."""

import csv
import dataclasses
import importlib.util
import math
from pathlib import Path

import pytest

from fewer.fqt import recipe_run as rr

REPO = Path(__file__).resolve().parents[2]
ENGLISH_TRAIN_TOKENS = 22_622_789


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_gpu_plan_budget_and_oscireset_phase():
    p = rr.plan(rr.RUN_PRESETS["gpu"], ENGLISH_TRAIN_TOKENS)
    # d 384, 6 blocks: attention 4 * 384^2 + SwiGLU 3 * 384 * 1024 + 2 norms per block, + the final norm
    assert p["params_non_embedding"] == 6 * (4 * 384 * 384 + 3 * 384 * 1024 + 2 * 384) + 384
    assert p["params_total"] == p["params_non_embedding"] + 2 * 8192 * 384
    assert p["tokens_per_step"] == 64 * 1024
    assert p["steps"] == math.ceil(50 * p["params_non_embedding"] / 65536)
    assert 50 <= p["tokens_per_param"] < 50.01
    assert 23 < p["passes"] < 24                       # reported, not hidden: the two budgets conflict
    assert p["warmup_steps"] == round(0.02 * p["steps"])
    osc = p["oscireset"]
    last_snapshot = max(s for s in range(p["steps"]) if s % osc["period"] == osc["offset"]
                        and s + osc["window"] <= p["steps"])
    assert p["steps"] - (last_snapshot + osc["window"]) == 50          # the last reset 50 steps before the end
    capped = rr.plan(dataclasses.replace(rr.RUN_PRESETS["gpu"], max_passes=4), ENGLISH_TRAIN_TOKENS)
    assert capped["passes"] <= 4 + 65536 / ENGLISH_TRAIN_TOKENS and capped["tokens_per_param"] < 9
    total = rr.plan(dataclasses.replace(rr.RUN_PRESETS["gpu"], param_count="total"), ENGLISH_TRAIN_TOKENS)
    assert total["steps"] == math.ceil(50 * p["params_total"] / 65536)
    with pytest.raises(ValueError, match="param_count"):
        rr.plan(dataclasses.replace(rr.RUN_PRESETS["gpu"], param_count="all"), ENGLISH_TRAIN_TOKENS)


def test_summary_gap_closed_and_paired_differences():
    losses = {"bf16": [3.0, 3.1, 3.2], "nvidia_nvfp4": [3.2, 3.3, 3.45], "tetrajet_v2": [3.1, 3.21, 3.34],
              "tetrajet_v2_full": [3.05, 3.16, 3.29]}
    runs = [{"arm": a, "seed": s, "complete": True, "final_val_loss": v}
            for a, vals in losses.items() for s, v in enumerate(vals)]
    runs.append({"arm": "tetrajet_v2_full", "seed": 3, "complete": False, "final_val_loss": None})
    rows = {r["arm"]: r for r in rr.summarize(runs)}
    tj = rows["tetrajet_v2"]
    mean = sum(losses["tetrajet_v2"]) / 3
    assert tj["n_seeds"] == 3 and tj["val_loss_mean"] == pytest.approx(mean)
    assert tj["val_loss_std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in losses["tetrajet_v2"]) / 2))
    per_seed = [0.1 / 0.2, 0.09 / 0.2, 0.11 / 0.25]
    assert tj["gap_closed_mean"] == pytest.approx(sum(per_seed) / 3)
    means = {a: sum(v) / 3 for a, v in losses.items()}
    assert tj["gap_closed_of_means"] == pytest.approx((means["nvidia_nvfp4"] - mean)
                                                      / (means["nvidia_nvfp4"] - means["bf16"]))
    assert rows["bf16"]["gap_closed_mean"] == pytest.approx(1.0)
    assert rows["nvidia_nvfp4"]["gap_closed_mean"] == pytest.approx(0.0)
    # paired differences against NVIDIA: -0.1, -0.09, -0.11 -> mean -0.1, std 0.01, t = -17.3 > 4.303
    assert tj["diff_vs_nvidia_nvfp4_mean"] == pytest.approx(-0.1)
    assert tj["diff_vs_nvidia_nvfp4_std"] == pytest.approx(0.01)
    assert tj["diff_vs_nvidia_nvfp4_significant95"] is True
    # ... but not outside the seed spread (the arms' own std is 0.12-0.13)
    assert tj["diff_vs_nvidia_nvfp4_outside_spread"] is False
    full = rows["tetrajet_v2_full"]
    assert full["n_seeds"] == 3                        # the incomplete run is left out
    assert full["diff_vs_tetrajet_v2_mean"] == pytest.approx(-0.05)
    assert "diff_vs_tetrajet_v2_mean" not in tj


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    from fewer.data.text import load_corpus

    corpus = load_corpus("shakespeare")
    preset = dataclasses.replace(rr.RUN_PRESETS["tiny_sweep"], ckpt_every=3)
    straight = rr.run_arm("tetrajet_v2_full", preset, corpus, seed=0, run_dir=str(tmp_path / "a"), device="cpu")
    # stop after step 4 (an OsciReset window is open: snapshot at 4, decision at 5), then resume
    first = rr.run_arm("tetrajet_v2_full", preset, corpus, seed=0, run_dir=str(tmp_path / "b"), device="cpu",
                       stop_at=4)
    assert not first["complete"] and first["steps_done"] == 4
    assert not (tmp_path / "b" / "final.json").exists()
    resumed = rr.run_arm("tetrajet_v2_full", preset, corpus, seed=0, run_dir=str(tmp_path / "b"), device="cpu")
    assert resumed["complete"]
    for key in ("train_loss", "val_loss", "final_val_loss", "last_reset_step", "frac_reset_last",
                "outcontrol_selected_at", "oscillation_windows"):
        assert resumed[key] == straight[key], key
    def numbers(rows):                                 # everything but the throughput
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]

    assert numbers(_rows(tmp_path / "a" / "curve.csv")) == numbers(_rows(tmp_path / "b" / "curve.csv"))
    assert _rows(tmp_path / "a" / "oscireset.csv") == _rows(tmp_path / "b" / "oscireset.csv")
    assert _rows(tmp_path / "a" / "layers.csv") == _rows(tmp_path / "b" / "layers.csv")


def test_sweep_tiny_on_cpu(tmp_path, capsys):
    out, export = tmp_path / "runs", tmp_path / "export"
    rr.main(["--sweep", "--tiny", "--out-dir", str(out), "--export", str(export)])
    folder = export / "cpu"
    runs = _rows(folder / "fqt_sweep_runs.csv")
    assert {(r["arm"], r["seed"]) for r in runs} == {(a, s) for a in ("bf16", "tetrajet_v2_full") for s in "01"}
    assert all(r["complete"] == "True" and math.isfinite(float(r["final_val_loss"])) for r in runs)
    # the same seed is the same init and batches: the first training loss is the same in both arms
    curves = _rows(folder / "fqt_sweep_curves.csv")
    first = {(c["arm"], c["seed"]): float(c["loss"]) for c in curves if c["kind"] == "train" and c["step"] == "1"}
    assert first[("bf16", "0")] == pytest.approx(first[("tetrajet_v2_full", "0")], abs=0.05)
    assert first[("bf16", "0")] != first[("bf16", "1")]
    assert {c["kind"] for c in curves} == {"train", "eval"}
    osc = _rows(folder / "fqt_sweep_oscireset.csv")
    assert {r["seed"] for r in osc if r["arm"] == "tetrajet_v2_full"} == {"0", "1"}
    layers = _rows(folder / "fqt_sweep_layers.csv")
    assert all(int(r["nonfinite_forward"]) == 0 and int(r["nonfinite_backward"]) == 0 for r in layers)
    assert {int(r["fp8_channels"]) for r in layers if r["arm"] == "tetrajet_v2_full"} == {32}
    summary = {r["arm"]: r for r in _rows(folder / "fqt_sweep_summary.csv")}
    assert summary["bf16"]["n_seeds"] == "2" and summary["tetrajet_v2_full"]["n_seeds"] == "2"
    assert (folder / "fqt_sweep_logs.tar.gz").is_file()
    # a second call finds every run done and only aggregates
    capsys.readouterr()
    rr.main(["--sweep", "--tiny", "--out-dir", str(out), "--export", str(export)])
    assert "4 runs, 4 done" in capsys.readouterr().out


def test_plain_cli_still_runs_the_arms_in_process(tmp_path):
    rows = rr.main(["--preset", "tiny", "--arms", "bf16", "--steps", "2", "--out", str(tmp_path / "r.csv")])
    assert rows[0]["arm"] == "bf16" and math.isfinite(rows[0]["val_loss"])
    assert (tmp_path / "r.csv").is_file()


def test_bench_step_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_step", REPO / "benchmarks" / "fqt" / "bench_step.py")
    bench_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_step)
    rows, pieces, ops = bench_step.main(["--tiny", "--arms", "bf16", "tetrajet_v2", "--results-dir", str(tmp_path)])
    by_arm = {r["arm"]: r for r in rows}
    assert by_arm["bf16"]["ratio_to_bf16"] == 1.0 and not by_arm["bf16"]["error"]
    assert not by_arm["tetrajet_v2"]["error"] and by_arm["tetrajet_v2"]["ratio_to_bf16"] > 1
    tj = {p["piece"]: p for p in pieces if p["arm"] == "tetrajet_v2"}
    assert tj["quantize"]["ms_per_step"] > 0 and tj["hadamard"]["ms_per_step"] > 0 and tj["gemm"]["ms_per_step"] > 0
    assert sum(p["share"] for p in tj.values()) == pytest.approx(1.0, abs=1e-3)
    for name in ("fqt_step.csv", "fqt_step_breakdown.csv", "fqt_step_ops.csv"):
        assert (tmp_path / "cpu" / name).is_file()
    assert ops


def test_gpu_minutes_from_the_step_benchmark_csv(tmp_path):
    p = rr.plan(rr.RUN_PRESETS["gpu"], ENGLISH_TRAIN_TOKENS)
    path = tmp_path / "fqt_step.csv"
    rows = [("sweep", "bf16", "-", 65536, 60.0, ""), ("sweep", "tetrajet_v2", "triton", 65536, 90.0, ""),
            ("sweep", "tetrajet_v2", "torch", 65536, 900.0, ""), ("sweep", "nvfp4_naive", "triton", 32768, 40.0, ""),
            ("sweep", "nvidia_nvfp4", "triton", 65536, 1.0, "RuntimeError: x"), ("d1024", "bf16", "-", 32768, 5.0, "")]
    with open(path, "w") as f:
        f.write("shape,arm,backend,tokens_per_step,median_ms,error\n")
        f.writelines(",".join(str(v) for v in r) + "\n" for r in rows)
    minutes = rr.estimate_minutes(p, str(path))
    assert minutes["bf16"] == pytest.approx(p["steps"] * 60.0 / 6e4)
    assert minutes["tetrajet_v2"] == pytest.approx(p["steps"] * 90.0 / 6e4)          # triton, not torch
    assert minutes["nvfp4_naive"] == pytest.approx(p["steps"] * 80.0 / 6e4)          # scaled to 65536 tokens
    assert "nvidia_nvfp4" not in minutes                                             # failed rows are skipped


def test_deadline_stops_and_saves_the_fqt_state(tmp_path):
    import time
    import types

    import torch

    saver = rr._Saver(str(tmp_path), every=100, steps=1000, model=torch.nn.Linear(2, 2), ctrl=None,
                      deadline=time.time() + 3600, stop_at=None)
    state = types.SimpleNamespace(step=7, stop=False)
    saver(state)
    assert not state.stop and not (tmp_path / "fqt_state").exists()        # far from the deadline, not a ckpt step
    saver.deadline = time.time() + 10                                      # inside the 30 s margin
    state = types.SimpleNamespace(step=8, stop=False)
    saver(state)
    assert state.stop and (tmp_path / "fqt_state" / "step_00000008.pt").is_file()
