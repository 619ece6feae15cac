import pytest
import torch
from torch import nn

from fewer.fqt import FQTController, OsciReset, OsciResetConfig, convert_for_training, get_recipe, oscillation_ratio

K = N = 128
CFG = OsciResetConfig(enabled=True, window=4, period=10, start_step=10, threshold=8.0)


def _layer(oscireset=CFG, preset="tetrajet_v2_oscireset"):
    model = nn.Sequential(nn.Linear(K, N, bias=False))
    report = convert_for_training(model, get_recipe(preset).replace(oscireset=oscireset), keep_bf16=())
    return report, report.converted["0"]


def _base_weight() -> torch.Tensor:
    """Every 16-block holds a fixed max of 6, so s_out = 6/2688 and s_in = 448: the grid is E2M1 itself."""
    w = torch.full((N, K), 0.3)
    w[:, ::16] = 6.0
    return w


def _masks():
    g = torch.Generator().manual_seed(0)
    free = torch.ones(N, K, dtype=torch.bool)
    free[:, ::16] = False
    idx = free.flatten().nonzero().flatten()
    perm = idx[torch.randperm(idx.numel(), generator=g)]
    osc = torch.zeros(N * K, dtype=torch.bool)
    osc[perm[:500]] = True
    mover = torch.zeros(N * K, dtype=torch.bool)
    mover[perm[500:1000]] = True
    inbin = torch.zeros(N * K, dtype=torch.bool)
    inbin[perm[1000:1500]] = True
    return osc.view(N, K), mover.view(N, K), inbin.view(N, K)


def _weight_at(step: int, osc, mover, inbin) -> torch.Tensor:
    w = _base_weight()
    sign = 1.0 if step % 2 else -1.0
    w[osc] = 1.25 + 0.01 * sign          # crosses the 1 | 1.5 boundary every step: |dQ| = 0.5, |dw| = 0.02
    w[mover] = 0.1 + 0.3 * step          # monotone: |dQ| roughly follows |dw|
    w[inbin] = 1.1 + 0.01 * sign         # wiggles inside the bin of 1: Q never changes
    return w


def _drive(layer, ctrl, steps):
    osc, mover, inbin = _masks()
    for step in steps:
        with torch.no_grad():
            layer.weight.copy_(_weight_at(step, osc, mover, inbin))
        before = layer.weight.detach().clone()
        ctrl.after_step(step)
        yield step, before, (osc, mover, inbin)


def test_resets_exactly_the_oscillating_weights():
    report, layer = _layer()
    ctrl = FQTController(report, total_steps=40)
    osc = None
    for step, before, (osc, mover, inbin) in _drive(layer, ctrl, range(1, 15)):
        after = layer.weight.detach()
        if step < 14:
            assert torch.equal(before, after), step
    assert ctrl.oscireset.last_reset_step == 14
    expected = before.clone()
    expected[osc] = 1.0                     # step 14 is even: w = 1.24 -> Q = 1.0
    assert torch.equal(layer.weight.detach(), expected)
    row = ctrl.oscireset.history[-1]["layers"]["0"]
    assert row["frac_reset"] == pytest.approx(500 / (N * K))
    assert row["flip_rate"] == pytest.approx((500 + 500 / 4) / (N * K))   # movers cross one bin edge (3.5) once
    assert row["frac_ge_threshold"] == pytest.approx(500 / (N * K))
    assert ctrl.report()["oscireset"]["last_reset_step"] == 14


def test_measure_only_changes_nothing():
    report, layer = _layer(CFG.replace(reset=False))
    ctrl = FQTController(report, total_steps=40)
    for step, before, _ in _drive(layer, ctrl, range(1, 15)):
        assert torch.equal(before, layer.weight.detach())
    assert ctrl.oscireset.last_reset_step is None
    assert ctrl.oscireset.history[-1]["layers"]["0"]["frac_ge8"] == pytest.approx(500 / (N * K))


def test_measure_in_an_arm_without_oscireset():
    report, layer = _layer(OsciResetConfig(), preset="tetrajet_v2")
    ctrl = FQTController(report, total_steps=40, oscireset=CFG.replace(reset=False), keep_ratios=True)
    list(_drive(layer, ctrl, range(1, 15)))
    osc, mover, _ = _masks()
    ratios = ctrl.oscireset.ratios["0"]
    assert (ratios[osc] >= 8).all() and (ratios[mover] < 8).all()


def test_outcontrol_columns_are_not_reset():
    report, layer = _layer(preset="tetrajet_v2_full")
    layer.fp8_channels = torch.arange(32, 64)
    ctrl = FQTController(report, total_steps=40)
    *_, (step, before, (osc, _, _)) = _drive(layer, ctrl, range(1, 15))
    changed = layer.weight.detach() != before
    assert changed.any() and not changed[:, 32:64].any()


def test_schedule():
    layers = {}
    cfg = OsciResetConfig(enabled=True)
    sched = OsciReset(layers, cfg, total_steps=1000)
    assert sched.start == 600 and sched.decision_steps() == [650, 850]
    sched = OsciReset(layers, cfg.replace(offset=150), total_steps=1000)
    assert sched.decision_steps() == [800, 1000]
    # the released 70M config: 12 505 steps, start 8000, period 200 -> last decision 54 steps before the end
    sched = OsciReset(layers, cfg.replace(start_step=8000), total_steps=12505)
    assert sched.decision_steps()[-1] == 12450 and sched.decision_steps()[0] == 8050


def test_bad_arguments():
    with pytest.raises(ValueError, match="total_steps"):
        OsciReset({}, OsciResetConfig(enabled=True), total_steps=None)
    with pytest.raises(ValueError, match="total_steps"):
        OsciReset({}, OsciResetConfig(enabled=True), total_steps=-5)
    r = oscillation_ratio(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.5, 0.0, 0.0]))
    assert r.tolist() == [2.0, 0.0, 0.0]
