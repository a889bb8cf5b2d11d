"""Block-sparse attention through the kernels: `block_mask=` vs the reference with `mask=block_mask.to_dense()`.

Block sizes come from `configs.mask_tile` (16 / 32 under the simulator, 64 / 128 on a GPU), so query
blocks of two tiles (q_per_blk = 2) and key blocks of two tiles (k_per_blk = 2) are both exercised. The
sequence lengths are not multiples of the block size and seqlen_q != seqlen_k.
"""
import numpy as np
import pytest

import numba_flash as nf
from numba_flash import BlockMask
from conftest import (SIMULATOR, TOL_BWD, as64, assert_close, assert_lse_close, block_sizes,
                      make_qkv_arrays, poison, random_array, torch)

B1, B2 = block_sizes(16)                 # the kernel tile and twice it
# Ragged: Nq = 3 blocks + 2 rows, Nk = 2 blocks + 8 rows of the small block size.
NQ, NK = 3 * B1 + 2, 2 * B1 + 8
H, D = 2, 16


def cdiv(a, b):
    return -(-a // b)


def make_mask(name, nq, nk, rng):
    """One BlockMask per pattern; the block size varies so both q_per_blk and k_per_blk reach 2."""
    if name == "random":
        return BlockMask.random(0.4, nq, nk, (B1, B1), nheads=H, seed=int(rng.integers(1 << 31)))
    if name == "butterfly":
        return BlockMask.butterfly(nq, nk, (B1, B1))
    if name == "local":
        return BlockMask.local(B1, nq, nk, (B1, B2))
    if name == "strided":
        return BlockMask.strided(2, nq, nk, (B1, B1), nheads=H)
    if name == "causal_pattern":
        return BlockMask.causal(nq, nk, (B2, B1))
    if name == "layout_multihead":
        layout = rng.random((H, cdiv(nq, B1), cdiv(nk, B1))) < 0.5
        layout[:, 0, 0] = True
        layout[:, -1, -1] = False   # never dense
        return BlockMask.from_layout(layout, (B1, B1), nq, nk)
    if name == "layout_shared":
        layout = rng.random((cdiv(nq, B2), cdiv(nk, B1))) < 0.6
        layout[0, 0] = True
        layout[-1, -1] = False      # else all 2 x 3 blocks are on in 0.6^5 = 8% of runs: a dense mask
        return BlockMask.from_layout(layout, (B2, B1), nq, nk)
    if name == "union":
        return BlockMask.local(0, nq, nk, (B1, B1)) | BlockMask.strided(3, nq, nk, (B1, B1), nheads=H)
    raise ValueError(name)


PATTERNS = ["random", "butterfly", "local", "strided", "causal_pattern", "layout_multihead",
            "layout_shared", "union"]


def fwd_bwd_check(q, k, v, dout, bm, dtype="float32", **kw):
    """Forward and backward with the block mask, each compared with the dense reference under its mask."""
    mask = bm.to_dense()
    out, lse = nf.flash_attn_forward(q, k, v, block_mask=bm, **kw)
    ref_out, ref_lse = nf.attention_reference(q, k, v, mask=mask, **kw)
    assert_close(out, ref_out, dtype)
    assert_lse_close(lse, ref_lse, dtype)
    grads = nf.flash_attn_backward(dout, q, k, v, out, lse, block_mask=bm, **kw)
    ref = nf.attention_reference_backward(dout, q, k, v, mask=mask, **kw)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref):
        assert_close(g, r, dtype, what=name, tol=TOL_BWD[dtype])
    return out, lse, grads


@pytest.mark.parametrize("pattern", PATTERNS)
def test_block_sparse_forward_and_backward_match_masked_reference(rng, pattern):
    q, k, v = make_qkv_arrays(rng, 1, NQ, NK, H, D)
    dout = random_array(rng, (1, NQ, H, D), "float32", "numpy" if SIMULATOR else "torch")
    bm = make_mask(pattern, NQ, NK, rng)
    assert 0 < bm.density < 1 or pattern == "causal_pattern"
    fwd_bwd_check(q, k, v, dout, bm)


@pytest.mark.parametrize("pattern,causal_align", [("random", "bottom_right"), ("local", "bottom_right"),
                                                  ("causal_pattern", "bottom_right"),
                                                  ("layout_multihead", "top_left")])
def test_block_sparse_combined_with_causal_matches_masked_causal_reference(rng, pattern, causal_align):
    q, k, v = make_qkv_arrays(rng, 1, NQ, NK, H, D)
    dout = random_array(rng, (1, NQ, H, D), "float32", "numpy" if SIMULATOR else "torch")
    bm = make_mask(pattern, NQ, NK, rng)
    fwd_bwd_check(q, k, v, dout, bm, causal=True, causal_align=causal_align)


def test_block_sparse_with_more_keys_than_queries_and_dense_mask_equals_dense_attention(rng):
    """BlockMask.dense with Nq < Nk gives bitwise what no mask gives (same tiles, same order)."""
    nq, nk = B1 + 3, 3 * B1 + 1
    q, k, v = make_qkv_arrays(rng, 1, nq, nk, 1, D)
    bm = BlockMask.dense(nq, nk, (B1, B2))
    a = nf.flash_attn_forward(q, k, v, block_mask=bm)
    b = nf.flash_attn_forward(q, k, v)
    np.testing.assert_array_equal(as64(a[0]), as64(b[0]))
    np.testing.assert_array_equal(as64(a[1]), as64(b[1]))


def test_query_blocks_with_no_kept_block_give_zero_out_neg_inf_lse_zero_dq_and_unlisted_keys_zero_dk_dv(rng):
    tq, tk = cdiv(NQ, B1), cdiv(NK, B1)
    layout = np.ones((H, tq, tk), bool)
    layout[0, 1, :] = False         # head 0: query block 1 sees nothing
    layout[1, :, 2] = False         # head 1: key block 2 (the ragged last one) is seen by nobody
    layout[1, tq - 1, :] = False    # head 1: the ragged last query block sees nothing
    bm = BlockMask.from_layout(layout, (B1, B1), NQ, NK)
    q, k, v = make_qkv_arrays(rng, 1, NQ, NK, H, D)
    dout = random_array(rng, (1, NQ, H, D), "float32", "numpy" if SIMULATOR else "torch")
    out0, lse0 = poison((1, NQ, H, D)), poison((1, H, NQ))
    out, lse = nf.flash_attn_forward(q, k, v, block_mask=bm, out=out0, lse=lse0)
    dq0, dk0, dv0 = poison((1, NQ, H, D)), poison((1, NK, H, D)), poison((1, NK, H, D))
    dq, dk, dv = nf.flash_attn_backward(dout, q, k, v, out, lse, block_mask=bm, dq=dq0, dk=dk0, dv=dv0)
    o, l, gq, gk, gv = (as64(x) for x in (out, lse, dq, dk, dv))
    rows0 = slice(B1, 2 * B1)
    rows1 = slice((tq - 1) * B1, NQ)
    keys1 = slice(2 * B1, NK)
    assert (o[0, rows0, 0] == 0).all() and (o[0, rows1, 1] == 0).all(), "empty rows output exactly 0"
    assert np.isneginf(l[0, 0, rows0]).all() and np.isneginf(l[0, 1, rows1]).all(), "empty rows: lse -inf"
    assert (gq[0, rows0, 0] == 0).all() and (gq[0, rows1, 1] == 0).all(), "empty rows: dq exactly 0"
    assert (gk[0, keys1, 1] == 0).all() and (gv[0, keys1, 1] == 0).all(), "unseen keys: dk, dv exactly 0"
    mask = bm.to_dense()
    ref_out, ref_lse = nf.attention_reference(q, k, v, mask=mask)
    assert_close(out, ref_out, "float32")
    assert_lse_close(lse, ref_lse)
    ref = nf.attention_reference_backward(dout, q, k, v, mask=mask)
    for name, g, r in zip(("dq", "dk", "dv"), (dq, dk, dv), ref):
        assert_close(g, r, "float32", what=name, tol=TOL_BWD["float32"])


def test_empty_mask_gives_zero_output_neg_inf_lse_and_zero_gradients(rng):
    bm = BlockMask.random(0.0, NQ, NK, (B1, B1))
    assert bm.nnz == 0
    q, k, v = make_qkv_arrays(rng, 1, NQ, NK, 1, D)
    dout = random_array(rng, (1, NQ, 1, D), "float32", "numpy" if SIMULATOR else "torch")
    out, lse = nf.flash_attn_forward(q, k, v, block_mask=bm, out=poison((1, NQ, 1, D)), lse=poison((1, 1, NQ)))
    assert (as64(out) == 0).all() and np.isneginf(as64(lse)).all()
    dq, dk, dv = nf.flash_attn_backward(dout, q, k, v, out, lse, block_mask=bm, dq=poison((1, NQ, 1, D)),
                                        dk=poison((1, NK, 1, D)), dv=poison((1, NK, 1, D)))
    assert all((as64(g) == 0).all() for g in (dq, dk, dv))


# --------------------------------------------------------------------------------------------------
# torch: autograd, SDPA, FlexAttention masks
# --------------------------------------------------------------------------------------------------

DEVICE = "cpu" if SIMULATOR else "cuda"


def leaves(rng, shapes, dtype=None):
    dtype = dtype or torch.float32
    return [torch.from_numpy(rng.standard_normal(s)).to(dtype).to(DEVICE).requires_grad_(True) for s in shapes]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flash_attn_func_autograd_with_block_mask_matches_masked_reference(rng, causal):
    bm = make_mask("layout_multihead", NQ, NK, rng)
    q, k, v = leaves(rng, [(1, NQ, H, D), (1, NK, H, D), (1, NK, H, D)])
    dout = torch.from_numpy(rng.standard_normal((1, NQ, H, D))).float().to(DEVICE)
    out, lse = nf.flash_attn_func(q, k, v, causal=causal, block_mask=bm, return_lse=True)
    out.backward(dout)
    mask = bm.to_dense()
    ref_out, ref_lse = nf.attention_reference(q, k, v, causal=causal, mask=mask)
    assert_close(out, ref_out, "float32")
    assert_lse_close(lse, ref_lse)
    ref = nf.attention_reference_backward(dout, q, k, v, causal=causal, mask=mask)
    for name, x, r in zip(("dq", "dk", "dv"), (q, k, v), ref):
        assert_close(x.grad, r, "float32", what=name, tol=TOL_BWD["float32"])


def test_sdpa_with_block_mask_and_top_left_causal_matches_masked_reference(rng):
    bm = make_mask("strided", NQ, NK, rng)
    q, k, v = leaves(rng, [(1, H, NQ, D), (1, H, NK, D), (1, H, NK, D)], torch.float64)
    out = nf.scaled_dot_product_attention(q, k, v, is_causal=True, block_mask=bm)
    out.sum().backward()
    mask = bm.to_dense()
    t = [x.detach().transpose(1, 2) for x in (q, k, v)]
    ref_out, _ = nf.attention_reference(*t, causal=True, causal_align="top_left", mask=mask)
    assert_close(out.detach().transpose(1, 2), ref_out, "float64")
    ones = torch.ones(t[0].shape, dtype=torch.float64)
    ref = nf.attention_reference_backward(ones, *t, causal=True, causal_align="top_left", mask=mask)
    for name, x, r in zip(("dq", "dk", "dv"), (q, k, v), ref):
        assert_close(x.grad.transpose(1, 2), r, "float64", what=name)


def test_flex_attention_mask_converted_with_from_flex_runs_block_sparse(rng):
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    window = B1 + 4

    def sliding_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)

    fm = flex.create_block_mask(sliding_causal, None, None, NQ, NK, device=DEVICE, BLOCK_SIZE=B1)
    bm = BlockMask.from_flex(fm)
    assert bm.block_size == (B1, B1) and (bm.seqlen_q, bm.seqlen_k) == (NQ, NK)
    # every block holding a visible element is kept, and no other
    r, c = np.arange(NQ)[:, None], np.arange(NK)[None, :]
    elem = (r >= c) & (r - c <= window)
    touched = np.array([[elem[i * B1:(i + 1) * B1, j * B1:(j + 1) * B1].any() for j in range(cdiv(NK, B1))]
                        for i in range(cdiv(NQ, B1))])
    np.testing.assert_array_equal(bm.layout[0], touched)
    q, k, v = make_qkv_arrays(rng, 1, NQ, NK, H, D)
    dout = random_array(rng, (1, NQ, H, D), "float32", "numpy" if SIMULATOR else "torch")
    fwd_bwd_check(q, k, v, dout, bm, causal=True, causal_align="top_left")


# --------------------------------------------------------------------------------------------------
# GPU: real block sizes (64 / 128)
# --------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("pattern", ["random", "butterfly", "local", "layout_multihead"])
def test_gpu_block_sparse_large_matches_masked_reference(rng, pattern, dtype):
    b1, b2 = block_sizes(64, dtype)
    nq, nk = 8 * b1 + 17, 6 * b1 + 5
    q, k, v = make_qkv_arrays(rng, 2, nq, nk, H, 64, dtype, "torch")
    dout = random_array(rng, (2, nq, H, 64), dtype, "torch")
    if pattern == "random":
        bm = BlockMask.random(0.3, nq, nk, (b1, b2), nheads=H, seed=int(rng.integers(1 << 31)))
    elif pattern == "butterfly":
        bm = BlockMask.butterfly(nq, nk, (b2, b1))
    elif pattern == "local":
        bm = BlockMask.local(b2, nq, nk, (b1, b1), causal=True)
    else:
        layout = rng.random((H, cdiv(nq, b1), cdiv(nk, b1))) < 0.3
        bm = BlockMask.from_layout(layout, (b1, b1), nq, nk)
    fwd_bwd_check(q, k, v, dout, bm, dtype, causal=pattern == "local")
