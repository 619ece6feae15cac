"""The SLA recipe's distillation loss, the video-like data set, the linear-branch probes and the
CSV merge: a tiny video preset end to end (a few seconds), and the pieces on their own."""

import copy
import math

import pytest
import torch

from fewer.attention.sla.recipe import (METRICS, SLARecipeConfig, as_frames, convert, linear_branch_capacity,
                                        linear_share, load_images, main, proj_norm, read_rows, run_sla_recipe,
                                        summarize, teacher_steps, write_rows)
from fewer.core import ConfigError
from fewer.models.denoiser import TrigFlowDenoiser
from fewer.models.dit import DiT


def test_smoke_video_teacher_loss_end_to_end():
    cfg = SLARecipeConfig.from_preset("smoke-video")
    assert cfg.loss == "teacher" and cfg.dit_config().num_tokens == 2 * 4 * 4 and cfg.key_blocks == 16
    rows = run_sla_recipe(cfg, progress=False)
    assert [r["method"] for r in rows] == ["teacher", "dense", "sparse-only", "linear-only", "sla"]
    by_method = {r["method"]: r for r in rows}
    # distilling the dense model from itself changes nothing: its samples are the teacher's
    assert by_method["dense"]["psnr"] == math.inf and by_method["dense"]["final_loss"] == 0.0
    for row in rows[2:]:
        for metric in METRICS:
            assert math.isfinite(row[metric]), (row["method"], metric, row[metric])
        assert row["loss"] == "teacher" and row["dataset"] == "video"
    # only SLA has a projection that learns; its linear branch now reaches the output
    assert by_method["sla"]["proj_norm"] > 0 and by_method["sla"]["linear_share"] > 0
    for method in ("sparse-only", "linear-only", "dense"):
        assert by_method[method]["proj_norm"] == 0.0 and by_method[method]["linear_share"] == 0.0


def test_video_data_and_frames():
    data = load_images("video", frames=3, video_train=16, video_test=20)
    assert data.train_x.shape == (16, 1, 3, 16, 16) and data.test_x.shape == (20, 1, 3, 16, 16)
    assert data.train_y.shape == (16,) and float(data.train_x.min()) == -1.0
    frames = as_frames(data.train_x)
    assert frames.shape == (48, 1, 16, 16)
    torch.testing.assert_close(frames[4], data.train_x[1, :, 1])  # clip-major, then time
    assert as_frames(frames) is frames  # images pass through


def _tiny(cfg):
    torch.manual_seed(0)
    denoiser = TrigFlowDenoiser(DiT(cfg.dit_config()))
    for p in denoiser.parameters():  # leave adaLN-zero's zero init, so attention reaches the output
        torch.nn.init.normal_(p, std=0.1)
    return denoiser.eval()


def test_teacher_loss_is_zero_for_the_teacher_and_shares_the_dropped_labels():
    cfg = SLARecipeConfig.from_preset("smoke-video")
    data = load_images("video", frames=cfg.frames, video_train=16, video_test=4)
    teacher = _tiny(cfg)
    get_batch, loss_fn = teacher_steps(data, 8, seed=3, teacher=teacher, class_dropout=0.5)
    x_t, t, y, target = get_batch(0, 0, 1)
    assert (y == teacher.net.null_class).any() and (y != teacher.net.null_class).any()
    torch.testing.assert_close(get_batch(0, 0, 1)[3], target)  # a function of (seed, step)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        assert float(loss_fn(student, (x_t, t, y, target))) == 0.0
        assert float(loss_fn(convert(teacher, "sla", 0.9, cfg), (x_t, t, y, target))) > 0.0


def test_linear_probes():
    cfg = SLARecipeConfig.from_preset("smoke-video")
    teacher = _tiny(cfg)
    x0 = torch.randn(4, *cfg.dit_config().input_shape)
    y = torch.tensor([1, 2, 3, 4])
    sla = convert(teacher, "sla", 0.9, cfg)
    assert proj_norm(sla) == 0.0 and linear_share(sla, x0, y) == 0.0  # zero projection at conversion
    assert proj_norm(teacher) == 0.0 and linear_share(teacher, x0, y) == 0.0  # no SLA layer
    for layer in sla.net.blocks:
        torch.nn.init.eye_(layer.attn.sla.proj.weight)
    assert proj_norm(sla) == pytest.approx(math.sqrt(cfg.dim // cfg.heads))
    assert 0.0 < linear_share(sla, x0, y) < 10.0


def test_linear_branch_capacity():
    cfg = SLARecipeConfig.from_preset("smoke-video", sparsities=(0.5, 0.9))
    rows = linear_branch_capacity(cfg, num=4)
    assert [(r["sparsity"], r["layer"]) for r in rows] == [(0.5, 0), (0.9, 0)]
    for r in rows:
        assert 0.0 < r["mass_kept"] <= 1.0 and 0.0 < r["mass_kept_estimate"] <= 1.0
        # least squares may pick W = 0, b = 0: the fitted projection never does worse than none
        assert r["sla_best_proj_error"] <= r["sparse_only_error"] + 1e-6
        assert math.isfinite(r["mass_weighted_best_proj_error"])
    assert rows[0]["mass_kept"] > rows[1]["mass_kept"]  # more critical blocks keep more mass


def test_linear_scope_all_reaches_only_sla():
    cfg = SLARecipeConfig.from_preset("smoke-video", linear_scope="all")
    assert cfg.sla_config(0.9, "sla").linear_scope == "all"
    assert cfg.sla_config(0.9, "sparse-only").linear_scope == "complement"


def test_rows_round_trip_and_merge(tmp_path):
    rows = [{"dataset": "video", "method": m, "sparsity": s, "seed": seed, "loss": "teacher",
             "linear_scope": "complement", "finetune_steps": 2,
             **{metric: 0.5 + seed for metric in METRICS}}
            for m, s in (("teacher", 0.0), ("sla", 0.9)) for seed in (0, 1)]
    write_rows(rows[:1] + rows[2:3], tmp_path / "a_runs.csv")
    write_rows(rows[:1] + rows[3:], tmp_path / "b_runs.csv")
    back = read_rows(tmp_path / "a_runs.csv")
    assert back[1]["method"] == "sla" and back[1]["sparsity"] == 0.9 and back[1]["seed"] == 0
    assert main(["--merge", str(tmp_path / "a_runs.csv"), str(tmp_path / "b_runs.csv"),
                 "--out", str(tmp_path / "m")]) == 0
    merged = read_rows(tmp_path / "m_runs.csv")
    assert [r["method"] for r in merged] == ["teacher", "sla", "sla"]  # the shards' teacher rows kept once
    table = {r["method"]: r for r in summarize(merged)}
    assert table["sla"]["seeds"] == 2 and table["sla"]["psnr_mean"] == pytest.approx(1.0)


@pytest.mark.parametrize("fields, match", [
    ({"loss": "kl"}, "loss"),
    ({"linear_scope": "some"}, "linear_scope"),
    ({"dataset": "video", "patch_size": 3}, "patch_size"),
    ({"dataset": "video", "frames": 0}, "frames"),
])
def test_config_errors(fields, match):
    with pytest.raises(ConfigError, match=match):
        SLARecipeConfig.from_preset("smoke-video", **fields)
