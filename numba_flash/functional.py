"""The two user-facing calls, shaped like flash-attn's and torch's."""
from . import api, interop
from .kernels import configs


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, return_lse=False, block_mask=None,
                    backend=None, deterministic=True):
    """Exact attention softmax(softmax_scale * Q K^T) V, FlashAttention style (flash-attn's call).

    Args:
        q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads, headdim). torch tensors
            (differentiable through torch autograd; traceable by torch.compile), CuPy arrays or Numba device
            arrays, float32 / float16 / bfloat16 / float64, on one GPU (CPU tensors / numpy under the CUDA
            simulator). Any strides with the last dim contiguous: slices of a packed QKV tensor run
            without copies. headdim 16..256.
        softmax_scale: default 1/sqrt(headdim).
        causal: query r attends to key c iff c <= r + seqlen_k - seqlen_q (aligned to the bottom-right
            corner of the score matrix, as flash-attn >= 2.1). Rows that then see no key output 0.
        return_lse: also return the log-sum-exp.
        block_mask: optional `numba_flash.BlockMask`; only its nonzero blocks are computed (and combined
            with `causal` if both are given).
        backend: "auto" (default; None reads NUMBA_FLASH_BACKEND), "simt", "mma", "wgmma" or "tf32": which
            kernels run (see `flash_attn_forward`). "auto" puts float16/bfloat16 on tensor cores, and
            chooses the forward's and the backward's kernels separately.
        deterministic: the backward pass gives bitwise the same gradients for the same inputs (default).
            False lets the tensor-core backward add dQ with unordered atomics, as flash-attn does
            (`flash_attn_backward` says where and when that is faster).

    Returns:
        out (batch, seqlen_q, nheads, headdim) in the input dtype, and if return_lse, lse (batch, nheads,
        seqlen_q) float32 (float64 for float64 inputs), natural log, -inf for rows that see no key.
        With torch tensors both are differentiable: a loss may use lse too (to merge attentions computed
        over parts of the keys, say), and its gradient reaches q and k.
    """
    return _attention(q, k, v, softmax_scale, causal, False, return_lse, block_mask, backend, deterministic)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False, *, block_mask=None, backend=None,
                                 deterministic=True):
    """Drop-in for `torch.nn.functional.scaled_dot_product_attention` on (batch, nheads, seqlen, headdim).

    `is_causal` is top-left aligned, as in torch (query r sees key c iff c <= r). Differences: no dense
    `attn_mask` (pass a block-sparse `block_mask` instead), no dropout, no grouped-query attention; each
    raises ValueError. `block_mask`, `backend` and `deterministic` as in `flash_attn_func`. Returns (batch, nheads, seqlen_q, headdim); inputs are passed to the kernels as
    transposed views, without copies.
    """
    if attn_mask is not None:
        raise ValueError("attn_mask is not supported by numba_flash; use block_mask=BlockMask(...)")
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0.0 (numba_flash has no dropout), got {dropout_p}")
    if enable_gqa:
        raise ValueError("enable_gqa is not supported by numba_flash")
    for name, x in (("query", query), ("key", key), ("value", value)):
        shape = interop.describe(x, name)[1]
        if len(shape) != 4:
            raise ValueError(f"{name} must have shape (batch, nheads, seqlen, headdim), got {shape}")
    out = _attention(_swap(query), _swap(key), _swap(value), scale, is_causal, True, False, block_mask,
                     backend, deterministic)
    return _swap(out)


def _swap(x):
    """(B, H, N, d) <-> (B, N, H, d) as a view."""
    if hasattr(x, "transpose") and interop.framework_of(x) in ("torch",):
        return x.transpose(1, 2)
    if interop.framework_of(x) == "cupy" or interop.framework_of(x) == "numpy":
        return x.swapaxes(1, 2)
    # Numba device arrays have no transposing view of 4-d arrays: rebuild one over the same memory.
    return _numba_swap(x)


def _numba_swap(x):
    from numba import cuda
    s = x.strides
    desc = {"shape": (x.shape[0], x.shape[2], x.shape[1], x.shape[3]), "strides": (s[0], s[2], s[1], s[3]),
            "typestr": x.dtype.str, "data": (x.__cuda_array_interface__["data"][0], False), "version": 3}
    return cuda.from_cuda_array_interface(desc, owner=x, sync=False)


def _attention(q, k, v, softmax_scale, causal, top_left, return_lse, block_mask, backend, deterministic):
    align = "top_left" if top_left else "bottom_right"
    causal = api.check_bool("is_causal" if top_left else "causal", causal)
    return_lse = api.check_bool("return_lse", return_lse)
    if interop.framework_of(q) == "torch":
        from . import autograd
        checked = api._check_qkv(q, k, v)
        p = checked[0]
        scale = api.check_scale(softmax_scale, p.headdim)
        api.causal_offset(causal, align, p.seqlen_q, p.seqlen_k)
        # each pass resolves its own path from the same choice ("auto" may pick wgmma for one of them)
        choice = configs.backend_choice(backend)[0]
        memo = {}
        for pass_ in configs.PASSES:
            api.validate_block_mask(block_mask, p, api.path_of(p, choice, block_mask, pass_, memo), memo)
        deterministic = api.check_bool("deterministic", deterministic)
        out, lse = autograd.attention(q, k, v, scale, causal, top_left,
                                      *autograd.mask_tensors(block_mask, q.device), choice, deterministic,
                                      checked=checked)
    else:
        out, lse = api.flash_attn_forward(q, k, v, softmax_scale=softmax_scale, causal=causal,
                                          causal_align=align, block_mask=block_mask, backend=backend)
    return (out, lse) if return_lse else out
