import csv
import json

import pytest

from fewer import bench
from fewer.cli import main


def test_flop_formulas():
    assert bench.attention_flops(1, 2, 3, 5, 7) == 4 * 2 * 3 * 5 * 7
    assert bench.attention_flops(1, 2, 3, 5, 7, causal=True) == 2 * 2 * 3 * 5 * 7
    assert bench.matmul_flops(2, 3, 4) == 48
    assert bench.tflops(2e12, 1000.0) == pytest.approx(2.0)


def test_time_ms_orders_its_quantiles():
    t = bench.time_ms(lambda: sum(range(2000)), warmup=10, rep=50)
    assert 0 < t["p20_ms"] <= t["median_ms"] <= t["p80_ms"]


def test_write_csv_stamps_environment(tmp_path):
    path = bench.write_csv([{"op": "a", "ms": 1.5}, {"op": "b", "extra": 3}], "area", "name", results_dir=tmp_path)
    assert path.parent.name == bench.gpu_slug() and path.name == "area_name.csv"
    rows = list(csv.DictReader(path.open()))
    assert [r["op"] for r in rows] == ["a", "b"] and rows[1]["extra"] == "3" and rows[0]["extra"] == ""
    for key in ("gpu", "torch", "triton", "commit", "date"):
        assert rows[0][key]


def test_named_shape_sets_hold_real_model_shapes():
    assert bench.SHAPES["wan2.1-1.3b"] == [dict(B=1, H=12, L=32760, D=128)]


def test_info_lists_backends_with_reasons(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["torch"]
    cudnn = info["backends"]["attention:cudnn"]
    assert cudnn["ok"] is False and "CUDA" in cudnn["reason"]
    assert info["backends"]["attention:reference"]["ok"] is True


def test_train_dry_run_prints_resolved_config(capsys):
    assert main(["train", "lm", "--preset", "cpu", "--steps", "7", "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["steps"] == 7 and cfg["model"] == "tiny"


def test_bad_flag_value_names_the_field():
    with pytest.raises(ValueError, match="LMBaselineConfig.steps=-3"):
        main(["train", "lm", "--steps", "-3", "--dry-run"])


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "tour" in capsys.readouterr().out
