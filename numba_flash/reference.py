"""Standard attention in float64 numpy: the ground truth every kernel is compared with.

It materialises S = scale * Q K^T and P = softmax(S) (Section 2.2 of the paper), so it is O(N^2) in memory
and meant for test sizes. Layout (batch, seqlen, nheads, headdim), as the kernels' low-level functions.
"""
import math

import numpy as np


def visibility(seqlen_q, seqlen_k, nheads, causal=False, causal_align="bottom_right", mask=None):
    """Bool (nheads or 1, seqlen_q, seqlen_k): True where query row r may attend to key c."""
    vis = np.ones((1, seqlen_q, seqlen_k), dtype=bool)
    if causal:
        offset = seqlen_k - seqlen_q if causal_align == "bottom_right" else 0
        r = np.arange(seqlen_q)[:, None]
        c = np.arange(seqlen_k)[None, :]
        vis = vis & (c <= r + offset)[None]
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim == 2:
            mask = mask[None]
        vis = vis & mask
    return vis


def _as64(x):
    """float64 numpy copy of a numpy array or (CPU / CUDA) torch tensor of any float dtype."""
    if type(x).__module__.startswith("torch"):
        return x.detach().to("cpu").double().numpy()
    if hasattr(x, "copy_to_host"):
        x = x.copy_to_host()
    elif type(x).__module__.startswith("cupy"):
        x = x.get()
    return np.asarray(x, dtype=np.float64)


def _scores(q, k, softmax_scale, causal, causal_align, mask):
    q, k = _as64(q), _as64(k)
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    s = scale * np.einsum("bqhd,bkhd->bhqk", q, k)
    vis = visibility(q.shape[1], k.shape[1], q.shape[2], causal, causal_align, mask)
    return np.where(vis[None], s, -np.inf), scale


def _softmax(s):
    m = s.max(axis=-1, keepdims=True)
    m_safe = np.where(np.isneginf(m), 0.0, m)
    e = np.exp(s - m_safe)
    l = e.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(l > 0, e / np.where(l > 0, l, 1.0), 0.0)
        lse = np.where(l > 0, m_safe + np.log(np.where(l > 0, l, 1.0)), -np.inf)
    return p, lse[..., 0]


def attention_reference(q, k, v, softmax_scale=None, causal=False, causal_align="bottom_right", mask=None):
    """float64 (out, lse) of softmax(scale * Q K^T) V.

    q: (B, Nq, H, d), k, v: (B, Nk, H, d); mask: bool broadcastable to (H, Nq, Nk), True = attend.
    Returns out (B, Nq, H, d) and lse (B, H, Nq). Rows that see no key: out 0, lse -inf.
    """
    s, _ = _scores(q, k, softmax_scale, causal, causal_align, mask)
    p, lse = _softmax(s)
    out = np.einsum("bhqk,bkhd->bqhd", p, _as64(v))
    return out, lse


def attention_reference_backward(dout, q, k, v, softmax_scale=None, causal=False,
                                 causal_align="bottom_right", mask=None):
    """float64 (dq, dk, dv) of the reference's out with respect to q, k, v, given dout = dL/dout."""
    s, scale = _scores(q, k, softmax_scale, causal, causal_align, mask)
    p, _ = _softmax(s)
    do, vv = _as64(dout), _as64(v)
    dv = np.einsum("bhqk,bqhd->bkhd", p, do)
    dp = np.einsum("bqhd,bkhd->bhqk", do, vv)
    ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True))
    dq = scale * np.einsum("bhqk,bkhd->bqhd", ds, _as64(k))
    dk = scale * np.einsum("bhqk,bqhd->bkhd", ds, _as64(q))
    return dq, dk, dv
