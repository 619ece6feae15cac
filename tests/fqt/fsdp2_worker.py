"""Run by test_fsdp2.py under torchrun (2 processes, gloo on CPU): QuantLinear under FSDP2.

Prints one line per rank: the OsciReset result on the constructed example of test_oscireset.py (the
reset must be exact on sharded weights), whether OutControl picked the same channels on both ranks,
and the type and local shape of the weight gradient after a quantized forward and backward.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from fewer.fqt import FQTController, OutControlConfig, convert_for_training, get_recipe
from tests.fqt.test_oscireset import CFG, K, N, _masks, _weight_at


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(K, N, bias=False))
    recipe = get_recipe("tetrajet_v2_full").replace(
        oscireset=CFG, outcontrol=OutControlConfig(enabled=True, record_start=1, record_iters=1))
    report = convert_for_training(model, recipe, keep_bf16=())
    layer = report.converted["0"]
    fully_shard(layer)
    fully_shard(model)
    ctrl = FQTController(report, total_steps=40)
    # OutControl: each rank sees different data with the same outliers; the sums are all-reduced
    x = torch.randn(64, K, generator=torch.Generator().manual_seed(rank))
    x[:, 7::16] *= 40.0
    model(x).sum().backward()
    grad = layer.weight.grad
    ctrl.after_step(1)
    chans = layer.fp8_channels.clone()
    gathered = [torch.empty_like(chans) for _ in range(2)]
    dist.all_gather(gathered, chans)
    # OsciReset on the constructed weights (the FP8 columns are excluded, so drop them for this check)
    layer.fp8_channels = torch.empty(0, dtype=torch.long)
    osc, mover, inbin = _masks()
    for step in range(2, 15):
        layer.assign_weight(_weight_at(step, osc, mover, inbin))
        before = layer.full_weight().clone()
        ctrl.after_step(step)
    expected = before.clone()
    expected[osc] = 1.0
    exact = torch.equal(layer.full_weight(), expected)
    print(f"\nrank {rank}: reset_exact={exact} same_channels={torch.equal(gathered[0], gathered[1])} "
          f"outliers_selected={set(range(7, K, 16)) <= set(chans.tolist())} "
          f"grad={type(grad).__name__}{tuple(grad.to_local().shape)}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
