"""The SLA fine-tuning recipe: the smoke preset end to end, the conversions it compares, config errors."""

import math

import pytest
import torch

from fewer.attention.sla import SLAConfig, projection_parameters
from fewer.attention.sla.recipe import (METHODS, METRICS, LinearOnlyAttention, SLARecipeConfig, convert,
                                        run_sla_recipe, summarize, write_rows)
from fewer.attention.sla.reference import linear_only_reference, sparse_only_reference
from fewer.core import ConfigError
from fewer.models.denoiser import TrigFlowDenoiser
from fewer.models.dit import DiT


def test_smoke_preset_end_to_end(tmp_path):
    cfg = SLARecipeConfig.from_preset("smoke")
    rows = run_sla_recipe(cfg, progress=False)
    # teacher + dense + linear-only (no sparsity to vary) + the two sparse methods
    runs = 1 + len(cfg.seeds) * (2 + (len(METHODS) - 2) * len(cfg.sparsities))
    assert len(rows) == runs
    assert [r["method"] for r in rows] == ["teacher"] + list(METHODS)
    for row in rows:
        for metric in METRICS:
            value = row[metric]
            if row["method"] == "teacher" and metric in ("psnr", "final_loss"):
                continue  # the teacher against itself: identical samples (infinite PSNR), and no fine-tuning
            assert math.isfinite(value), (row["method"], metric, value)
        assert 0.0 <= row["class_accuracy"] <= 1.0 and row["ssim"] <= 1.0 + 1e-6
    by_method = {r["method"]: r for r in rows}
    assert by_method["teacher"]["psnr"] == math.inf and by_method["teacher"]["ssim"] == pytest.approx(1.0)
    # the softmax part computes floor(0.1 * 32) = 3 of 32 key blocks per query block
    assert by_method["sla"]["softmax_density"] == pytest.approx(3 / 32)
    assert by_method["sparse-only"]["softmax_density"] == pytest.approx(3 / 32)
    assert by_method["linear-only"]["softmax_density"] == 0.0

    table = summarize(rows)
    assert [(r["method"], r["sparsity"]) for r in table] == [("teacher", 0.0), ("dense", 0.0), ("sparse-only", 0.9),
                                                              ("linear-only", 1.0), ("sla", 0.9)]
    for row in table:
        assert row["seeds"] == 1
        assert set(f"{m}_{s}" for m in METRICS for s in ("mean", "std")) <= set(row)
    path = write_rows(table, tmp_path / "recipe.csv")
    header = path.read_text().splitlines()[0].split(",")
    assert header[:3] == ["dataset", "method", "sparsity"] and "ssim_std" in header and "gpu" in header


def _denoiser_and_input(cfg):
    torch.manual_seed(0)
    denoiser = TrigFlowDenoiser(DiT(cfg.dit_config()))
    for p in denoiser.parameters():  # leave adaLN-zero's zero init, so attention reaches the output
        torch.nn.init.normal_(p, std=0.1)
    denoiser.eval()  # no class dropout: every forward must see the same condition
    x = torch.randn(3, 1, cfg.image_size, cfg.image_size)
    return denoiser, x, torch.tensor([0.3, 0.9, 1.4]), torch.tensor([1, 4, 7])


def _attention_inputs(model, x, t, y):
    captured = {}
    attn = model.net.blocks[0].attn

    def hook(module, args):
        captured["x"] = args[0]

    handle = attn.register_forward_pre_hook(hook)
    model.raw(x, t, y)
    handle.remove()
    return attn, captured["x"]


def _qkv(attn, x):
    n, length, _ = x.shape
    return [proj(x).view(n, length, attn.heads, attn.head_dim).transpose(1, 2)
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj)]


def test_conversions_compute_the_ablations():
    cfg = SLARecipeConfig.from_preset("smoke")
    denoiser, x, t, y = _denoiser_and_input(cfg)
    dense_out = denoiser.raw(x, t, y)

    linear = convert(denoiser, "linear-only", 0.9, cfg)
    assert isinstance(linear.net.blocks[0].attn, LinearOnlyAttention)
    attn, h = _attention_inputs(linear, x, t, y)
    q, k, v = _qkv(attn, h)
    expected = linear_only_reference(q, k, v, SLAConfig(feature_map=cfg.feature_map))
    got_inner = []
    attn.o_proj.register_forward_hook(lambda m, args, out: got_inner.append(args[0]))
    linear.raw(x, t, y)
    torch.testing.assert_close(got_inner[0], expected.transpose(1, 2).reshape_as(got_inner[0]))

    sparse = convert(denoiser, "sparse-only", 0.9, cfg)
    attn, h = _attention_inputs(sparse, x, t, y)
    q, k, v = _qkv(attn, h)
    sla_cfg = cfg.sla_config(0.9, "sla")
    got_inner = []
    attn.o_proj.register_forward_hook(lambda m, args, out: got_inner.append(args[0]))
    sparse.raw(x, t, y)
    expected = sparse_only_reference(q, k, v, sla_cfg)  # the same critical blocks as SLA, nothing else
    torch.testing.assert_close(got_inner[0], expected.transpose(1, 2).reshape_as(got_inner[0]))

    assert not any(p.requires_grad for p in projection_parameters(sparse))  # no linear branch to learn
    assert all(p.requires_grad for p in projection_parameters(convert(denoiser, "sla", 0.9, cfg)))
    # SLA at conversion (zero projection) equals sparse-only; the converted models differ from dense
    sla = convert(denoiser, "sla", 0.9, cfg)
    torch.testing.assert_close(sla.raw(x, t, y), sparse.raw(x, t, y))
    assert not torch.allclose(sla.raw(x, t, y), dense_out, atol=1e-4)
    # converting works on a copy: the teacher is untouched
    torch.testing.assert_close(denoiser.raw(x, t, y), dense_out)
    with pytest.raises(ValueError, match="unknown method"):
        convert(denoiser, "sparse", 0.9, cfg)


def test_sla_configs_for_each_method():
    cfg = SLARecipeConfig.from_preset("cpu")
    assert cfg.key_blocks == 32
    sla, sparse = cfg.sla_config(0.95, "sla"), cfg.sla_config(0.95, "sparse-only")
    assert sla.block_counts(32) == (1, 0)     # one critical block of 32 (96.9% sparse), SLA skips nothing
    assert sparse.block_counts(32) == (1, 31)  # the same critical block; sparse-only skips every other one
    assert cfg.sla_config(0.9, "sla").block_counts(32) == cfg.sla_config(0.9, "sparse-only").block_counts(32)[:1] + (0,)


@pytest.mark.parametrize("fields, match", [
    ({"dataset": "cifar"}, "dataset"),
    ({"methods": ("sla", "flash")}, "methods"),
    ({"methods": ()}, "methods"),
    ({"sparsities": (0.9, 1.0)}, "sparsities"),
    ({"seeds": (0, -1)}, "seeds"),
    ({"patch_size": 3}, "patch_size"),
    ({"block": 100}, "block"),
    ({"dim": 66}, "dim"),
    ({"finetune_steps": 0}, "finetune_steps"),
    ({"feature_map": "cos"}, "feature_map"),
])
def test_config_errors(fields, match):
    with pytest.raises(ConfigError, match=match):
        SLARecipeConfig.from_preset("cpu", **fields)


def test_run_rejects_other_configs():
    with pytest.raises(TypeError, match="SLARecipeConfig"):
        run_sla_recipe(SLAConfig())
