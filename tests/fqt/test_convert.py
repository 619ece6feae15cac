import pytest
import torch
from torch import nn

from fewer.fqt import (PRESETS, FQTController, QuantLinear, convert_for_training, fqt_state_dict, get_recipe,
                       load_fqt_state_dict)
from fewer.models.llama import Llama, LlamaConfig

CFG = LlamaConfig(vocab_size=256, dim=128, n_layers=2, n_heads=4, ffn_hidden=256, max_seq_len=64)


def _model() -> Llama:
    torch.manual_seed(0)
    return Llama(CFG)


def _step(model, idx):
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    return loss


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_trains_a_tiny_llama(preset):
    model = _model()
    keys = list(model.state_dict())
    report = convert_for_training(model, preset)
    assert list(model.state_dict()) == keys
    assert "lm_head" in report.kept
    idx = torch.randint(0, CFG.vocab_size, (2, 65))
    loss = _step(model, idx)
    assert torch.isfinite(loss)
    for name, layer in report.converted.items():
        assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all(), name
    assert report.nonfinite_total() == 0


def test_report_and_layer_choice():
    model = _model()
    report = convert_for_training(model, "nvidia_nvfp4")
    # 2 blocks, bf16_last_fraction 0.15 -> the last block stays in bf16, and the LM head
    assert report.blocks == "layers"
    assert all(name.startswith("layers.0.") for name in report.converted)
    assert len(report.converted) == 7
    assert any(name.startswith("layers.1.") for name in report.kept)
    assert type(model.layers[1].mlp.up_proj) is nn.Linear
    assert isinstance(model.layers[0].mlp.up_proj, QuantLinear)
    assert "quantized" in report.summary()
    # seeds differ per layer
    assert len({l.fqt_seed for l in report.converted.values()}) == 7


def test_tetrajet_converts_every_block_linear():
    model = _model()
    report = convert_for_training(model, "tetrajet_v2", keep_bf16=("lm_head", "*.o_proj"))
    assert len(report.converted) == 12 and "layers.0.self_attn.o_proj" in report.kept


def test_optimizer_built_before_conversion_still_updates():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    convert_for_training(model, "tetrajet_v2")
    before = model.layers[0].mlp.up_proj.weight.detach().clone()
    _step(model, torch.randint(0, CFG.vocab_size, (2, 65)))
    opt.step()
    assert not torch.equal(before, model.layers[0].mlp.up_proj.weight)


def test_unaligned_layer_error_or_kept():
    model = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 72))
    with pytest.raises(ValueError, match="'1'.*out_features=72"):
        convert_for_training(model, "tetrajet_v2", keep_bf16=())
    report = convert_for_training(model, "tetrajet_v2", keep_bf16=(), unaligned="keep_bf16")
    assert list(report.converted) == ["0"] and "out_features=72" in report.kept["1"]


def test_bad_inputs():
    with pytest.raises(ValueError, match="nn.Module"):
        convert_for_training("model", "tetrajet_v2")
    with pytest.raises(ValueError, match="unknown recipe preset"):
        convert_for_training(_model(), "fp3")
    with pytest.raises(ValueError, match="no QuantLinear"):
        FQTController(_model())


def test_fqt_state_roundtrip():
    model = _model()
    convert_for_training(model, "tetrajet_v2_outcontrol")
    model.layers[0].mlp.up_proj.fp8_channels = torch.arange(0, 128, 4)
    state = fqt_state_dict(model)
    other = _model()
    convert_for_training(other, "tetrajet_v2_outcontrol")
    load_fqt_state_dict(other, state)
    assert torch.equal(other.layers[0].mlp.up_proj.fp8_channels, torch.arange(0, 128, 4))


def test_controller_as_a_train_callback():
    from fewer.fqt import OsciResetConfig, OutControlConfig
    from fewer.train import TrainConfig, train

    model = _model()
    recipe = get_recipe("tetrajet_v2_full").replace(
        outcontrol=OutControlConfig(enabled=True, record_start=2, record_iters=2),
        oscireset=OsciResetConfig(enabled=True, window=2, period=3, start_step=3))
    report = convert_for_training(model, recipe)
    ctrl = FQTController(report, total_steps=8)
    data = torch.randint(0, CFG.vocab_size, (8, 2, 65))

    def loss_fn(m, batch):
        return m(batch[:, :-1], batch[:, 1:])[1]

    cfg = TrainConfig(steps=8, lr=1e-3, progress=False, device="cpu", precision="fp32", log_every=4)
    train(model, loss_fn, lambda step, rank, world: data[step], cfg, callbacks=[ctrl])
    rep = ctrl.report()
    assert rep["outcontrol"]["selected_at"] == 3
    assert all(layer.outcontrol_selected for layer in report.converted.values())
    assert [h["step"] for h in rep["oscireset"]["history"]] == [5, 8]
    assert rep["oscireset"]["last_reset_step"] == 8 and rep["oscireset"]["steps_before_end"] == 0
    assert rep["nonfinite"] == {} and set(rep["calls"].values()) == {8}
