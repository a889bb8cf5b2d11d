"""torch integration: the kernels as `torch.library` custom ops with fake implementations and autograd,
and the same forward and backward as a plain `torch.autograd.Function` for eager mode.

The custom ops are what `torch.compile` traces through: the fake implementations tell it the outputs'
shapes without running anything. In eager mode their dispatch (schema parsing, alias checks, the
autograd wrapper) costs ~0.2 ms of host time per forward+backward step on this project's 2-core CI
machine and more on the GPU host, next to ~0.1 ms for the launches themselves, so `attention` takes
`FlashAttnFunction` there: the same `_forward` / `_backward`, one Python call deep. Both only allocate
and launch, through `api.py`. A block mask travels as its four list tensors plus its block size, since
custom ops take tensors and scalars, not Python objects.
"""
from functools import partial
from typing import Optional

import torch
from torch import Tensor

from . import api

_LIB = "numba_flash"


def _lists(kv_count, kv_index, q_count, q_index, block_q, block_k):
    if kv_count is None:
        return None
    return api.MaskLists(kv_count, kv_index, q_count, q_index, block_q, block_k)


def _align(top_left):
    return "top_left" if top_left else "bottom_right"


@torch.library.custom_op(f"{_LIB}::fwd", mutates_args=())
def flash_fwd_op(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, causal: bool, top_left: bool,
                 kv_count: Optional[Tensor], kv_index: Optional[Tensor], q_count: Optional[Tensor],
                 q_index: Optional[Tensor], block_q: int, block_k: int,
                 backend: str = "auto", deterministic: bool = True) -> tuple[Tensor, Tensor]:
    return _forward(q, k, v, softmax_scale, causal, top_left, kv_count, kv_index, q_count, q_index, block_q,
                    block_k, backend)


def _forward(q, k, v, softmax_scale, causal, top_left, kv_count, kv_index, q_count, q_index, block_q, block_k,
             backend="auto", deterministic=True, checked=None):
    """checked: api._check_qkv(q, k, v) where the caller has made it (None: checked here)."""
    return api.forward_checked(
        checked or api._check_qkv(q, k, v), q, k, v, softmax_scale, causal, _align(top_left),
        _lists(kv_count, kv_index, q_count, q_index, block_q, block_k), backend=backend)


@flash_fwd_op.register_fake
def _(q, k, v, softmax_scale, causal, top_left, kv_count, kv_index, q_count, q_index, block_q, block_k,
      backend="auto", deterministic=True):
    B, Nq, H, d = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty((B, Nq, H, d)), q.new_empty((B, H, Nq), dtype=lse_dtype)


@torch.library.custom_op(f"{_LIB}::bwd", mutates_args=())
def flash_bwd_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                 softmax_scale: float, causal: bool, top_left: bool,
                 kv_count: Optional[Tensor], kv_index: Optional[Tensor], q_count: Optional[Tensor],
                 q_index: Optional[Tensor], block_q: int, block_k: int,
                 backend: str = "auto", deterministic: bool = True,
                 dlse: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    return _backward_launch(dout, q, k, v, out, lse, softmax_scale, causal, top_left, kv_count, kv_index,
                            q_count, q_index, block_q, block_k, backend, deterministic, dlse)


def _backward_launch(dout, q, k, v, out, lse, softmax_scale, causal, top_left, kv_count, kv_index, q_count,
                     q_index, block_q, block_k, backend="auto", deterministic=True, dlse=None, checked=None):
    """checked: api._check_qkv(q, k, v), the forward call's (None: checked here)."""
    return api.backward_checked(
        checked or api._check_qkv(q, k, v), dout, q, k, v, out, lse, softmax_scale, causal, _align(top_left),
        _lists(kv_count, kv_index, q_count, q_index, block_q, block_k), backend=backend,
        deterministic=deterministic, dlse=dlse)


@flash_bwd_op.register_fake
def _(dout, q, k, v, out, lse, softmax_scale, causal, top_left, kv_count, kv_index, q_count, q_index,
      block_q, block_k, backend="auto", deterministic=True, dlse=None):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _setup_context(ctx, inputs, output):
    (q, k, v, scale, causal, top_left, kv_count, kv_index, q_count, q_index, block_q, block_k, backend,
     deterministic) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_count, kv_index, q_count, q_index)
    ctx.params = (scale, causal, top_left, block_q, block_k, backend, deterministic)


def _backward(ctx, dout, dlse, launch=None):
    """Gradients of out and of lse (differentiable: d lse / d S = P, folded into D by the kernels).
    launch: the backward's launcher (default: the custom op, so torch.compile sees it)."""
    q, k, v, out, lse, kv_count, kv_index, q_count, q_index = ctx.saved_tensors
    scale, causal, top_left, block_q, block_k, backend, deterministic = ctx.params
    if dout is None:
        dout = torch.zeros_like(out)
    elif dout.stride(-1) != 1:
        # e.g. the expanded gradient of out.sum() has stride 0 everywhere; the kernels need a
        # contiguous head dim (other strides, zeros included, are fine).
        dout = dout.contiguous()
    if dlse is not None:
        dlse = dlse.contiguous()
    dq, dk, dv = (launch or flash_bwd_op)(dout, q, k, v, out, lse, scale, causal, top_left,
                                          kv_count, kv_index, q_count, q_index, block_q, block_k, backend,
                                          deterministic, dlse)
    return (dq, dk, dv) + (None,) * 11


flash_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class FlashAttnFunction(torch.autograd.Function):
    """Eager-mode autograd with the custom ops' arguments, forward and backward, minus their dispatch.
    One more, last argument: `checked`, api._check_qkv(q, k, v) where the caller has made it (None: the
    API checks q, k, v itself); the backward uses it too, since q, k, v are the ones it saved."""

    @staticmethod
    def forward(ctx, *args):
        *inputs, checked = args
        out, lse = _forward(*inputs, checked=checked)
        _setup_context(ctx, inputs, (out, lse))
        ctx.checked = checked
        ctx.set_materialize_grads(False)     # an unused lse gets no zero gradient to read
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        return _backward(ctx, dout, dlse, partial(_backward_launch, checked=ctx.checked)) + (None,)


def attention(*inputs, checked=None):
    """(out, lse) with autograd: the custom op under torch.compile, FlashAttnFunction in eager mode
    (`checked`: api._check_qkv(q, k, v), where the caller has made it)."""
    if torch.compiler.is_compiling():
        return flash_fwd_op(*inputs)
    return FlashAttnFunction.apply(*inputs, checked)


def mask_tensors(block_mask, device):
    """A BlockMask's lists as int32 tensors on `device`, made once and cached on the mask."""
    if block_mask is None:
        return None, None, None, None, 0, 0
    if isinstance(block_mask, api.MaskLists):
        m = block_mask
        return m.kv_count, m.kv_index, m.q_count, m.q_index, m.block_q, m.block_k
    key = ("torch", str(device))
    cached = block_mask._device_cache.get(key)
    if cached is None:
        cached = tuple(torch.from_numpy(a.copy()).to(device)
                       for a in (block_mask.kv_count, block_mask.kv_index,
                                 block_mask.q_count, block_mask.q_index))
        block_mask._device_cache[key] = cached
    return (*cached, *block_mask.block_size)
