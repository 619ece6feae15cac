"""Launched by test_distributed.py under torchrun (2 processes: gloo on CPU, NCCL with device "cuda").

Starting processes is the slow part on CPU, so a single launch runs every scenario the tests check,
each through ``fewer.train.examples.main`` (the command the lead runs on GPUs), sharing one process
group that the first run starts from torchrun's environment:

  ddp/             DDP, 20 steps
  ddp_accum/       DDP with 2 micro-batches per update (no_sync on the first)
  fsdp2/           FSDP2 with 2 micro-batches per update (gradient sync off on the first), checkpoints every 10
  fsdp2_resumed/   the same FSDP2 run stopped after 8 updates (checkpoint), then resumed to 20 by a second call
"""

import sys
from pathlib import Path

from fewer.train import distributed, examples

# test_distributed.py runs the single-process reference with these too; fp32 so that CUDA runs compare tightly
COMMON = ["--steps", "20", "--ckpt-every", "10", "--precision", "fp32"]


def main(out: Path, device: str) -> None:
    common = ["--device", device, *COMMON]
    accum = ["--grad-accum", "2"]
    examples.main(["--distributed", "ddp", "--out", str(out / "ddp"), *common])
    examples.main(["--distributed", "ddp", "--out", str(out / "ddp_accum"), *accum, *common])
    examples.main(["--distributed", "fsdp2", "--out", str(out / "fsdp2"), *accum, *common])
    examples.main(["--distributed", "fsdp2", "--out", str(out / "fsdp2_resumed"), "--stop-at", "8", *accum, *common])
    examples.main(["--distributed", "fsdp2", "--out", str(out / "fsdp2_resumed"), *accum, *common])
    distributed.cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "cpu")
