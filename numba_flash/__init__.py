"""numba_flash: FlashAttention (Dao et al., 2022) as Numba CUDA kernels written in Python.

Public names:
    flash_attn_func, scaled_dot_product_attention   torch-facing, autograd-aware
    flash_attn_forward, flash_attn_backward         low-level, framework-neutral, no autograd
    BlockMask                                       block-sparse masks the kernels walk
    attention_reference, attention_reference_backward   float64 numpy ground truth
"""
from .api import flash_attn_backward, flash_attn_forward
from .blocksparse import BlockMask
from .functional import flash_attn_func, scaled_dot_product_attention
from .kernels.intrinsics import SIMULATOR
from .reference import attention_reference, attention_reference_backward

__all__ = ["flash_attn_func", "scaled_dot_product_attention", "flash_attn_forward", "flash_attn_backward",
           "BlockMask", "attention_reference", "attention_reference_backward", "SIMULATOR"]
__version__ = "0.1.0"
