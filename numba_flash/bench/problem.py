"""What is measured: a configuration (shape, dtype, causal), the passes, and the FLOPs they count.

Nothing here imports torch, so the command line's --help works without it.
"""
from __future__ import annotations

import dataclasses

IMPLS = ("numba_flash", "numba_flash_nd", "numba_flash_mma", "numba_flash_wgmma", "numba_flash_tf32", "naive",
         "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "flex")
OWN_IMPLS = ("numba_flash", "numba_flash_nd", "numba_flash_mma", "numba_flash_wgmma", "numba_flash_tf32")
# flex compiles per shape (minutes over the full sweep), and numba_flash_nd (deterministic=False) differs
# from numba_flash only on tensor cores: both opt in
DEFAULT_IMPLS = ("numba_flash", "naive", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn")
PASSES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
DTYPE_NAMES = ("float16", "bfloat16", "float32")
DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32",
                 "float": "float32"}
# ||x - ref|| / ||ref|| against float64 that --check accepts. float32 leaves room for tf32 matrix
# units (~3e-4, METHOD.md), which Triton (flex) and cuDNN may use; numba_flash computes in true fp32
# and is held to the project's bar of 1e-5.
CHECK_TOL = {"float16": 1e-2, "bfloat16": 3e-2, "float32": 2e-3}
OWN_FP32_TOL = 1e-5
CHECK_SIZE = dict(batch=2, seqlen=256, nheads=2)


@dataclasses.dataclass(frozen=True)
class Config:
    batch: int
    seqlen: int
    nheads: int
    headdim: int
    dtype: str
    causal: bool

    @classmethod
    def from_tokens(cls, tokens, hidden, seqlen, headdim, dtype, causal):
        """``batch * seqlen = tokens`` (at least one sequence), ``nheads = hidden // headdim``."""
        return cls(max(1, tokens // seqlen), seqlen, hidden // headdim, headdim, dtype, causal)

    def label(self) -> str:
        return (f"d={self.headdim} {self.dtype} {'causal' if self.causal else 'non-causal'} "
                f"N={self.seqlen} B={self.batch} H={self.nheads}")


def attention_flops(cfg: Config, pass_: str) -> float:
    """FLOPs counted for TFLOP/s: 4 B H N^2 d per forward, halved when causal, scaled per pass."""
    flops = 4.0 * cfg.batch * cfg.nheads * cfg.seqlen * cfg.seqlen * cfg.headdim
    if cfg.causal:
        flops /= 2
    return flops * FLOP_FACTOR[pass_]
