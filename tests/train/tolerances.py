"""Every tolerance and quality floor of the train tests, in one place."""

TOLERANCES = {
    # DDP / FSDP2 (2 gloo processes) against one process on the same global batches, after 40 AdamW
    # updates: only the order of the gradient reductions differs (measured ~3e-7 on CPU), while any
    # real error (unsynchronised ranks, wrong batch split, summed instead of averaged gradients)
    # moves parameters and logged gradient norms by 1e-2 or more.
    "distributed_param_rel_l2": 1e-4,
    "distributed_metric_rel": 1e-4,
    # the tiny regression problem must at least halve its training and eval loss in 40 updates
    "loss_drop_factor": 0.5,
    # after clipping, the global gradient norm equals grad_clip up to fp32 rounding
    "clip_rel": 1e-5,
    # 4 micro-batches against the whole batch, 5 AdamW updates in fp32: only summation order differs
    "grad_accum_rel": 1e-5,
    # lr_at against hand-computed values
    "schedule_abs": 1e-12,
}
