#!/usr/bin/env bash
# On a 2-GPU machine: (1) the training loop under torchrun with NCCL, DDP and FSDP2 (with a DCP
# checkpoint, a simulated preemption and a resume), compared with one process; (2) the foundation
# baselines at GPU scale, one per GPU, in parallel. Results and logs go to $OUT (or ./gpu_out).
#   bash benchmarks/train/gpu_distributed_and_baselines.sh      (needs the prepared data folder: carry ["data"])
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpus.txt"

# (2) baselines in the background, one per GPU
CUDA_VISIBLE_DEVICES=0 python3 -m fewer train lm --preset gpu --out "$OUT/lm" > "$OUT/lm.log" 2>&1 &
LM=$!
CUDA_VISIBLE_DEVICES=1 python3 -m fewer train digits --preset gpu --out "$OUT/digits" > "$OUT/digits.log" 2>&1 &
DIGITS=$!

# (1) distributed checks (small model; they share the GPUs with the baselines for a minute)
run() { python3 -m torch.distributed.run --nproc_per_node "$1" --master_port "$2" -m fewer.train.examples "${@:3}"; }
{
  echo "== distributed tests (gloo on CPU and NCCL on CUDA, fp32)"
  python3 -m pytest -q -rs tests/train/test_distributed.py 2>&1 | tail -15
  echo "== single process (cuda:0)"; python3 -m fewer.train.examples --device cuda --steps 60 --out /tmp/single | tail -1
  echo "== DDP x2 NCCL"; run 2 29511 --distributed ddp --device cuda --steps 60 --out /tmp/ddp | tail -1
  echo "== FSDP2 x2 NCCL"; run 2 29512 --distributed fsdp2 --device cuda --steps 60 --out /tmp/fsdp | tail -1
  echo "== FSDP2 x2 NCCL, preempted at 30 with DCP checkpoints, then resumed"
  run 2 29513 --distributed fsdp2 --device cuda --steps 60 --ckpt-every 10 --stop-at 30 --out /tmp/fsdp_resume | tail -1
  run 2 29514 --distributed fsdp2 --device cuda --steps 60 --ckpt-every 10 --out /tmp/fsdp_resume | tail -1
} 2>&1 | tee "$OUT/distributed.log"

wait $LM; echo "lm exit $?"; wait $DIGITS; echo "digits exit $?"
tail -n 30 "$OUT/lm.log" "$OUT/digits.log"
