"""numba_flash: FlashAttention (Dao et al., 2022) as Numba CUDA kernels written in Python.

Public names:
    flash_attn_func, scaled_dot_product_attention   torch-facing, autograd-aware
    flash_attn_forward, flash_attn_backward         low-level, framework-neutral, no autograd
    BlockMask                                       block-sparse masks the kernels walk
    attention_reference, attention_reference_backward   float64 numpy ground truth
    BACKENDS, SIMULATOR                             "auto", "simt", "mma"; whether kernels run simulated

They load on first use, so ``import numba_flash.runtime`` can choose between the GPU and Numba's CUDA
simulator before anything imports ``numba.cuda``.
"""
import importlib

_PUBLIC = {
    "flash_attn_func": "functional", "scaled_dot_product_attention": "functional",
    "flash_attn_forward": "api", "flash_attn_backward": "api", "BACKENDS": "api",
    "BlockMask": "blocksparse",
    "attention_reference": "reference", "attention_reference_backward": "reference",
}

__all__ = [*_PUBLIC, "SIMULATOR"]
__version__ = "0.2.0"


def __getattr__(name):
    if name == "SIMULATOR":
        from .kernels.launch import SIMULATOR
        return SIMULATOR
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'numba_flash' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
