"""Configuration of JVP attention (what the ``jvp`` attention backend accepts as ``config=``)."""

from __future__ import annotations

import dataclasses

from ...core.config import Config, check_choice, check_positive_int

KERNELS = ("auto", "triton", "reference")


@dataclasses.dataclass(frozen=True, kw_only=True)
class JvpAttentionConfig(Config):
    """kernel: 'auto' (Triton on CUDA, the PyTorch reference elsewhere), 'triton' or 'reference'.
    backward_chunk: query rows per chunk of the recomputing PyTorch backward of the Triton path
    (memory there is about 8 x backward_chunk x Lk float32 per head)."""

    kernel: str = "auto"
    backward_chunk: int = 1024

    def validate(self) -> None:
        check_choice(self, "kernel", KERNELS)
        check_positive_int(self, "backward_chunk")


JvpAttentionConfig.register_preset("reference", kernel="reference")
JvpAttentionConfig.register_preset("triton", kernel="triton")
