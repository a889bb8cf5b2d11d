"""The implementations a benchmark compares, each behind one ``make_forward``, and their inputs.

    numba_flash      numba_flash.flash_attn_func(q, k, v, causal=...) on (B, N, H, d) tensors
    numba_flash_nd   the same with deterministic=False (tensor cores: dQ by atomics, 5 products)
    numba_flash_mma, numba_flash_wgmma
                     the same on backend="mma" / "wgmma" (the default picks one per head dim and GPU)
    numba_flash_tf32 the same on backend="tf32" (float32 inputs: split TF32 forward, SIMT backward)
    naive            matmul -> softmax -> matmul in the input dtype (PyTorch)
    sdpa_flash       F.scaled_dot_product_attention under SDPBackend.FLASH_ATTENTION
    sdpa_efficient   ... under SDPBackend.EFFICIENT_ATTENTION
    sdpa_cudnn       ... under SDPBackend.CUDNN_ATTENTION
    flex             FlexAttention through torch.compile (opt in: --impl ...,flex)

PyTorch implementations get the ``q.transpose(1, 2)`` views, shape (B, H, N, d), of the same
(B, N, H, d) leaf tensors, and return ``out.transpose(1, 2)``, so one ``dout`` and one set of leaves
serve every implementation.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

import numba_flash

from .problem import IMPLS, OWN_IMPLS, PASSES, Config
from .timing import first_line

SDPA_BACKENDS = {
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
}


def torch_dtype(name: str):
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


class Unavailable(Exception):
    """The implementation cannot run here (backend missing, configuration refused)."""


def make_inputs(cfg: Config, device="cuda", seed=0):
    """Random leaf tensors ``q, k, v`` of shape (B, N, H, d) that require grad, and a random ``dout``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (cfg.batch, cfg.seqlen, cfg.nheads, cfg.headdim)
    dtype = torch_dtype(cfg.dtype)

    def randn():
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)

    q, k, v = (randn().requires_grad_() for _ in range(3))
    return q, k, v, randn()


def _naive_attention(q, k, v, scale, causal_mask):
    # (B, H, N, d) in; every intermediate in the input dtype, as a plain PyTorch model would.
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    if causal_mask is not None:
        s.masked_fill_(causal_mask, float("-inf"))  # mul's backward does not need s: in place is safe
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v)


_FLEX = None


def _flex_attention():
    """``flex_attention`` compiled once; the recompile limit raised, one graph per shape."""
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        import torch._dynamo.config as dynamo_config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), 256))
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def _causal_mask_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def make_forward(impl: str, q, k, v, causal: bool, *, block_mask=None):
    """``(forward, context)``: ``forward()`` runs one attention forward and returns (B, N, H, d);
    ``context()`` is entered around every call (the SDPA backend choice), kept out of ``forward``
    so that its host cost stays out of the timed region.

    ``block_mask`` (numba_flash.BlockMask) applies to ``numba_flash`` and ``flex`` only.
    Raises :class:`Unavailable` if the implementation cannot be set up here.
    """
    nullcontext = contextlib.nullcontext
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if impl in OWN_IMPLS:
        deterministic = impl != "numba_flash_nd"
        backend = {"numba_flash_mma": "mma", "numba_flash_wgmma": "wgmma", "numba_flash_tf32": "tf32"}.get(impl)

        def forward():
            return numba_flash.flash_attn_func(q, k, v, causal=causal, block_mask=block_mask,
                                               deterministic=deterministic, backend=backend)
        return forward, nullcontext

    if block_mask is not None and impl != "flex":
        raise Unavailable(f"{impl} has no block-sparse mode")

    if impl == "naive":
        n = q.shape[1]
        scale = 1.0 / math.sqrt(q.shape[-1])
        mask = (torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1) if causal else None)

        def forward():
            return _naive_attention(qt, kt, vt, scale, mask).transpose(1, 2)
        return forward, nullcontext

    if impl in SDPA_BACKENDS:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA_BACKENDS[impl], None)
        if backend is None:
            raise Unavailable(f"this torch has no SDPBackend.{SDPA_BACKENDS[impl]}")

        def forward():
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
        return forward, lambda: sdpa_kernel(backend)

    if impl == "flex":
        try:
            flex = _flex_attention()
        except Exception as e:
            raise Unavailable(f"flex_attention: {first_line(e)}") from e
        flex_mask = None
        if block_mask is not None:
            flex_mask = flex_block_mask(block_mask, q.shape[2])
        elif causal:
            from torch.nn.attention.flex_attention import create_block_mask
            n = q.shape[1]
            flex_mask = create_block_mask(_causal_mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n,
                                          device=q.device)

        def forward():
            return flex(qt, kt, vt, block_mask=flex_mask).transpose(1, 2)
        return forward, nullcontext

    raise ValueError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")


def block_layout(mask) -> np.ndarray:
    """Bool ``(Hm, Tq, Tk)`` block layout of a numba_flash.BlockMask (from its kv lists if it has
    no ``layout`` attribute)."""
    layout = getattr(mask, "layout", None)
    if layout is not None:
        return np.asarray(layout, dtype=bool)
    kv_count, kv_index = np.asarray(mask.kv_count), np.asarray(mask.kv_index)
    hm, tq = kv_count.shape
    out = np.zeros((hm, tq, np.asarray(mask.q_count).shape[1]), dtype=bool)
    for h in range(hm):
        for i in range(tq):
            out[h, i, kv_index[h, i, :kv_count[h, i]]] = True
    return out


def _layout_mask_mod(layout, bq, bk):
    """FlexAttention ``mask_mod`` that looks up block ``(q_idx // bq, kv_idx // bk)`` of ``layout``
    (a bool (Hm, Tq, Tk) tensor): element-wise the same mask as the numba_flash BlockMask."""
    if layout.shape[0] == 1:
        layout2d = layout[0]

        def mask_mod(b, h, q_idx, kv_idx):
            return layout2d[q_idx // bq, kv_idx // bk]
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return layout[h, q_idx // bq, kv_idx // bk]
    return mask_mod


def flex_block_mask(mask, nheads: int, device="cuda"):
    """FlexAttention BlockMask equivalent to ``mask`` (numba_flash.BlockMask), built by
    ``create_block_mask`` from a mask_mod that reads the same block layout."""
    from torch.nn.attention.flex_attention import create_block_mask

    layout = torch.tensor(block_layout(mask), device=device)  # a copy: BlockMask arrays are read-only
    bq, bk = mask.block_size
    heads = None if layout.shape[0] == 1 else nheads
    return create_block_mask(_layout_mask_mod(layout, bq, bk), B=None, H=heads,
                             Q_LEN=mask.seqlen_q, KV_LEN=mask.seqlen_k, device=device,
                             BLOCK_SIZE=(bq, bk))


def pass_step(pass_: str, forward, q, k, v, dout):
    """A callable whose one call is the timed region of ``pass_``.

    ``fwd``: one forward. ``fwd+bwd``: forward then ``out.backward(dout)``; the caller clears
    ``.grad`` of q, k, v between calls. ``bwd``: ``torch.autograd.grad`` through a graph built once
    here, kept with ``retain_graph=True``.
    """
    if pass_ == "fwd":
        return forward
    if pass_ == "fwd+bwd":
        def step():
            forward().backward(dout)
        return step
    if pass_ == "bwd":
        out = forward()

        def step():
            torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        return step
    raise ValueError(f"unknown pass {pass_!r}; choose from {', '.join(PASSES)}")
