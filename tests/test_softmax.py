"""The online softmax of kernels/softmax.py on its own: the lazy rescale computes what the eager one does.

One warp runs both updates on the same score tiles, in the tensor-core fragment layout with 32 output
columns per row (where the kernels switch to the lazy rescale), and accumulates acc += P W with a
per-thread W, so every rescale of acc and l shows in the result. Both must agree with a float64 numpy
model of the same per-thread computation, and with each other, on tiles built to move the max (a row
whose max jumps by more than 2^8, one that creeps up by less, one that starts with fully masked tiles,
one that never sees a key) and a NaN row.
"""
import math

import numpy as np
import pytest

from conftest import SIMULATOR  # noqa: F401  (conftest picks the simulator before numba.cuda loads)
from numba import cuda, float32

from numba_flash.kernels import ptx
from numba_flash.kernels.fragments import mma_fragment
from numba_flash.kernels.softmax import LAZY_RESCALE_COLS, TAU_LOG2, make_softmax

MT, NT, DT = 1, 2, LAZY_RESCALE_COLS // 2      # rows 2, score columns 4, output columns 32 per thread
FRAG = mma_fragment(MT, NT, DT)
R, C, CO = FRAG.rows, FRAG.cols, FRAG.out_cols


def _visible_all(r, other0, nq, nk, offset):
    return 0, 1 << 30


def _kernel(lazy, positive_scale):
    sm = make_softmax(FRAG, "float32", ptx.ex2, cuda.jit(device=True)(_visible_all), positive_scale, lazy)
    update, finalize = sm.online_update, sm.finalize

    @cuda.jit
    def k(scores, weights, out, lse_out, scale_log2):
        tid = cuda.threadIdx.x
        m = cuda.local.array(R, float32)
        l = cuda.local.array(R, float32)
        acc = cuda.local.array((R, CO), float32)
        s = cuda.local.array((R, C), float32)
        for i in range(R):
            m[i] = -math.inf
            l[i] = 0
            for d in range(CO):
                acc[i, d] = 0
        for t in range(scores.shape[0]):
            for i in range(R):
                for j in range(C):
                    s[i, j] = scores[t, tid, i, j]
            update(s, m, l, acc, float32(scale_log2))
            for i in range(R):
                for d in range(CO):
                    for j in range(C):
                        acc[i, d] += s[i, j] * weights[tid, j, d]
        inv = cuda.local.array(R, float32)
        lse = cuda.local.array(R, float32)
        finalize(m, l, inv, lse, float32(scale_log2))
        for i in range(R):
            lse_out[tid, i] = lse[i]
            for d in range(CO):
                out[tid, i, d] = acc[i, d] * inv[i]
    return k


def _model(scores, weights, scale_log2):
    """float64: out[tid, i, d] = sum_t,j p w / (sum over the row's 4 lanes of sum_t,j p), p = 2^(c s - c m)."""
    T = scores.shape[0]
    with np.errstate(invalid="ignore", over="ignore"):
        x = scores.astype(np.float64).transpose(1, 2, 0, 3).reshape(32, R, T * C) * scale_log2
        rows = x.reshape(8, 4, R, T * C).transpose(0, 2, 1, 3).reshape(8, R, 4 * T * C)   # quads share rows
        finite = np.where(np.isnan(rows), -np.inf, rows)
        mx = finite.max(-1)                                            # NaN-ignoring row max
        mref = np.where(np.isneginf(mx), 0.0, mx)
        p = np.exp2(x - np.repeat(mref, 4, axis=0)[:, :, None])
        lrow = np.exp2(rows - mref[:, :, None]).sum(-1)                # (8, R)
        w = np.tile(weights.astype(np.float64), (1, T, 1))             # (32, T*C, CO): same W every tile
        num = np.einsum("trk,tkd->trd", p, w)
        l = np.repeat(lrow, 4, axis=0)[:, :, None]
        out = np.where(l > 0, num / np.where(l > 0, l, 1), 0.0)
        lse = np.where(l[..., 0] > 0, (np.repeat(mref, 4, axis=0) + np.log2(np.where(l[..., 0] > 0, l[..., 0], 1)))
                       * math.log(2), -np.inf)
    return out, lse


def _scores(rng, T):
    s = rng.standard_normal((T, 32, R, C)).astype(np.float32)
    g = np.arange(32) // 4                              # fragment row g of the warp's 16: lanes 4g..4g+3
    # (g, i=0) rows: g=0 jumps by far more than TAU at tile 2; g=1 creeps up by less than TAU per tile;
    # g=2 sees only masked keys for 2 tiles; g=3 never sees a key; g=4 has a NaN in tile 1.
    jump = 4 * TAU_LOG2 / 0.5
    s[2:, g == 0, 0] += jump
    for t in range(T):
        s[t, g == 1, 0] += 0.5 * TAU_LOG2 / 0.5 * t
    s[:2, g == 2, 0] = -np.inf
    s[:, g == 3, 0] = -np.inf
    s[1, 16, 0, 1] = np.nan                             # lane 16: g = 4
    return s


@pytest.mark.parametrize("positive_scale", [True, False], ids=["raw-scores", "scaled-first"])
def test_lazy_and_eager_rescale_both_give_the_float64_softmax(rng, positive_scale):
    T = 6
    scores = _scores(rng, T)
    weights = rng.standard_normal((32, C, CO)).astype(np.float32)
    # the scale-first path (a non-positive softmax_scale) gets log2-domain scores and works with c = 1
    sc, pre = (0.5, scores) if positive_scale else (1.0, np.ascontiguousarray(scores * np.float32(0.7)))
    ref_out, ref_lse = _model(pre, weights, sc)
    nan_rows = np.zeros((32, R), bool)
    nan_rows[16:20, 0] = True                           # the quad sharing the NaN's row
    empty = np.isneginf(ref_lse) & ~nan_rows
    fin = ~nan_rows & ~empty
    results = []
    for lazy in (True, False):
        out = np.full((32, R, CO), np.nan, np.float32)
        lse = np.full((32, R), np.nan, np.float32)
        dev = [cuda.to_device(x) for x in (pre, weights, out, lse)]
        _kernel(lazy, positive_scale)[1, 32](*dev, sc)
        got, got_lse = dev[2].copy_to_host(), dev[3].copy_to_host()
        assert np.isnan(got[nan_rows]).all() and np.isnan(got_lse[nan_rows]).all()
        assert (got[empty] == 0).all() and np.isneginf(got_lse[empty]).all()
        np.testing.assert_allclose(got[fin], ref_out[fin], rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(got_lse[fin], ref_lse[fin], rtol=1e-6, atol=1e-6)
        results.append(got)
    np.testing.assert_allclose(results[0][fin], results[1][fin], rtol=2e-5, atol=1e-6)
