"""Forward pass (flash_attn_forward, flash_attn_func, scaled_dot_product_attention) vs the float64 reference.

Under the simulator the kernel tile is 16 x 16, so seqlens 17, 33, 40, 50 leave ragged last tiles and
(1, 40) / (40, 1) exercise single-row and single-key problems. GPU-only tests (marked) add large sizes,
every framework, the torch stream and the memory footprint.
"""
import math

import numpy as np
import pytest
from numba import cuda

import numba_flash as nf
from conftest import (FRAMEWORKS, HEADDIMS, SIMULATOR, TOL, as64, assert_bitwise_equal,
                      assert_close, assert_lse_close, copy, lse_dtype, make_qkv_arrays, poison, rel_err,
                      torch)

SEQLENS = [(17, 17), (33, 50), (50, 33), (1, 40), (40, 1)]


def run_and_check(q, k, v, dtype, **kw):
    out, lse = nf.flash_attn_forward(q, k, v, **kw)
    ref_kw = {n: kw[n] for n in ("softmax_scale", "causal", "causal_align") if n in kw}
    ref_out, ref_lse = nf.attention_reference(q, k, v, **ref_kw)
    assert_close(out, ref_out, dtype)
    assert_lse_close(lse, ref_lse, dtype)
    return out, lse


# --------------------------------------------------------------------------------------------------
# shapes, causal, alignment
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Nq,Nk", SEQLENS)
def test_forward_matches_reference_for_ragged_and_unequal_seqlens(make_qkv, Nq, Nk, causal):
    q, k, v = make_qkv(1, Nq, Nk, 1, 16)
    run_and_check(q, k, v, "float32", causal=causal)


@pytest.mark.parametrize("Nq,Nk", [(17, 40), (40, 17)])
def test_top_left_causal_align_matches_reference(make_qkv, Nq, Nk):
    q, k, v = make_qkv(1, Nq, Nk, 1, 16)
    run_and_check(q, k, v, "float32", causal=True, causal_align="top_left")


def test_flash_attn_func_causal_is_bottom_right_aligned(make_qkv):
    """flash_attn_func(causal=True) with Nq < Nk: query r sees keys c <= r + Nk - Nq (flash-attn >= 2.1)."""
    q, k, v = make_qkv(1, 17, 40, 1, 16)
    out, lse = nf.flash_attn_func(q, k, v, causal=True, return_lse=True)
    ref_out, ref_lse = nf.attention_reference(q, k, v, causal=True, causal_align="bottom_right")
    assert_close(out, ref_out, "float32")
    assert_lse_close(lse, ref_lse)
    top_left, _ = nf.attention_reference(q, k, v, causal=True, causal_align="top_left")
    assert rel_err(out, top_left) > 1e-2, "bottom-right and top-left differ on this shape"


def test_causal_more_queries_than_keys_rows_seeing_no_key_give_exact_zero_out_and_neg_inf_lse(make_qkv):
    Nq, Nk, H, d = 40, 17, 2, 16
    q, k, v = make_qkv(1, Nq, Nk, H, d)
    out = poison((1, Nq, H, d))
    lse = poison((1, H, Nq))
    out, lse = run_and_check(q, k, v, "float32", causal=True, out=out, lse=lse)
    empty = Nq - Nk  # bottom-right: row r sees keys c <= r - (Nq - Nk); rows r < Nq - Nk see none
    o, l = as64(out), as64(lse)
    assert (o[:, :empty] == 0).all(), "rows that see no key output exactly 0"
    assert np.isneginf(l[:, :, :empty]).all(), "rows that see no key have lse = -inf"
    assert np.isfinite(o[:, empty:]).all() and np.isfinite(l[:, :, empty:]).all()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Nq,Nk", [(33, 33), (17, 40), (40, 17)])
def test_sdpa_matches_torch_sdpa_in_float64_with_top_left_causal(rng, Nq, Nk, causal):
    F = torch.nn.functional
    B, H, d = 1, 2, 16
    q, k, v = (torch.from_numpy(rng.standard_normal((B, H, n, d))) for n in (Nq, Nk, Nk))
    scale = 0.3 if causal else None
    dev = q if SIMULATOR else q.cuda()
    out = nf.scaled_dot_product_attention(*(x.to(dev.device) for x in (q, k, v)), is_causal=causal, scale=scale)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    assert out.shape == (B, H, Nq, d) and out.dtype == torch.float64
    assert_close(out, ref, "float64")


def test_sdpa_on_numpy_style_arrays_matches_reference(rng):
    """The non-torch path of scaled_dot_product_attention: (B, H, N, d) in, (B, H, N, d) out."""
    q, k, v = make_qkv_arrays(rng, 1, 33, 20, 2, 16, layout="bhsd")   # (B, N, H, d) views of (B, H, N, d)
    out = nf.scaled_dot_product_attention(*(x.swapaxes(1, 2) if hasattr(x, "swapaxes") else x.transpose(1, 2)
                                            for x in (q, k, v)), is_causal=True)
    ref, _ = nf.attention_reference(q, k, v, causal=True, causal_align="top_left")
    assert_close(as64(out).swapaxes(1, 2), ref, "float32")


# --------------------------------------------------------------------------------------------------
# layouts, dtypes, head dims, scale, batch and heads
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("layout", ["bhsd", "qkvpacked", "kvpacked"])
def test_strided_views_give_bitwise_the_result_of_contiguous_copies(rng, layout, framework):
    q, k, v = make_qkv_arrays(rng, 2, 20, 20, 2, 16, "float32", framework, layout)
    out, lse = run_and_check(q, k, v, "float32", causal=True)
    out_c, lse_c = nf.flash_attn_forward(copy(q), copy(k), copy(v), causal=True)
    assert_bitwise_equal(out, out_c, "out")
    assert_bitwise_equal(lse, lse_c, "lse")


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_every_dtype_matches_reference(rng, dtype, framework):
    q, k, v = make_qkv_arrays(rng, 1, 33, 40, 1, 32, dtype, framework)
    out, lse = run_and_check(q, k, v, dtype, causal=True)
    assert out.dtype == q.dtype
    assert str(lse.dtype).endswith(lse_dtype(dtype)), f"lse dtype {lse.dtype}"


@pytest.mark.parametrize("dtype", ["float32"] if SIMULATOR else ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("d", HEADDIMS)
def test_head_dims_match_reference(make_qkv, d, dtype):
    N = 33 if SIMULATOR else 200
    q, k, v = make_qkv(1, N, N, 1, d, dtype)
    run_and_check(q, k, v, dtype)


@pytest.mark.parametrize("scale", [0.05, 2.0, -0.5, 0.0])
def test_non_default_softmax_scale_matches_reference(make_qkv, scale):
    q, k, v = make_qkv(1, 33, 33, 1, 16)
    run_and_check(q, k, v, "float32", softmax_scale=scale, causal=True)


def test_default_softmax_scale_is_one_over_sqrt_headdim_bitwise(make_qkv):
    q, k, v = make_qkv(1, 17, 17, 1, 24)
    a = nf.flash_attn_forward(q, k, v)
    b = nf.flash_attn_forward(q, k, v, softmax_scale=1.0 / math.sqrt(24))
    assert_bitwise_equal(a[0], b[0], "out")
    assert_bitwise_equal(a[1], b[1], "lse")


def test_batch_and_heads_are_independent_problems(make_qkv):
    B, H = 2, 3
    q, k, v = make_qkv(B, 17, 20, H, 16)
    out, lse = run_and_check(q, k, v, "float32", causal=True)
    o = as64(out)
    for b in range(B):
        for h in range(H):
            ref, _ = nf.attention_reference(*(as64(x)[b:b + 1, :, h:h + 1] for x in (q, k, v)), causal=True)
            assert rel_err(o[b:b + 1, :, h:h + 1], ref) < TOL["float32"], f"batch {b} head {h}"


@pytest.mark.parametrize("sections", [True, False], ids=["per_batch", "one_section"])
@pytest.mark.parametrize("over_keys", [True, False], ids=["query_tiles", "key_tiles"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_blocks_own_every_tile_once_and_causal_hands_out_the_longest_tiles_first(monkeypatch, over_keys, causal,
                                                                                 sections):
    """walk.tile_grid + block_coords: every (tile, head, batch) owned by one block; causal blocks in launch
    order (x fastest) take, batch element by batch element, every head's longest tile first (last query /
    first key tile); with NUMBA_FLASH_L2_SECTION=0 every (head, batch)'s longest tile first."""
    from numba_flash.kernels import walk
    from numba_flash.kernels.launch import kernel
    from numba_flash.kernels.walk import tile_grid

    if not sections:
        monkeypatch.setattr(walk, "_L2_SECTION_BYTES", 0)
    coords = walk.make_walk.__wrapped__(16, 16, causal, over_keys).block_coords    # not the cached one

    @kernel(1, 0)
    def record(out):
        t, h, b = coords()
        lin = (cuda.blockIdx.z * cuda.gridDim.y + cuda.blockIdx.y) * cuda.gridDim.x + cuda.blockIdx.x
        out[lin, 0] = t
        out[lin, 1] = h
        out[lin, 2] = b

    T, H, B = 5, 3, 2
    grid = tile_grid(causal, 16 * T - 3, 16, H, B, "seqlen_q")
    d_out = cuda.to_device(np.full((T * H * B, 3), -1, np.int64))
    record[grid, 1](d_out)
    got = d_out.copy_to_host()
    assert sorted(map(tuple, got)) == [(t, h, b) for t in range(T) for h in range(H) for b in range(B)]
    if causal:
        longest_first = list(range(T - 1, -1, -1)) if over_keys else list(range(T))
        want = ([(t, h, b) for b in range(B) for t in longest_first for h in range(H)] if sections
                else [(t, h, b) for t in longest_first for b in range(B) for h in range(H)])
        assert list(map(tuple, got)) == want
    else:
        assert list(map(tuple, got)) == [(t, h, b) for b in range(B) for h in range(H) for t in range(T)]


def test_causal_sequence_longer_than_the_grid_holds_is_a_clear_error():
    from numba_flash.kernels.walk import MAX_GRID_Z, tile_grid
    n = MAX_GRID_Z * 128 + 1
    assert tile_grid(False, n, 128, 2, 1, "seqlen_q") == (MAX_GRID_Z + 1, 2, 1)
    with pytest.raises(ValueError, match=f"seqlen_q = {n} is too long for causal attention"):
        tile_grid(True, n, 128, 2, 1, "seqlen_q")


# --------------------------------------------------------------------------------------------------
# every output element written, nothing else
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("Nq,Nk,causal", [(33, 50, False), (50, 21, True)])
def test_preallocated_nan_poisoned_out_and_lse_are_fully_written_and_returned(make_qkv, Nq, Nk, causal):
    B, H, d = 1, 2, 24
    q, k, v = make_qkv(B, Nq, Nk, H, d)
    out0, lse0 = poison((B, Nq, H, d)), poison((B, H, Nq))
    out, lse = run_and_check(q, k, v, "float32", causal=causal, out=out0, lse=lse0)
    assert out is out0 and lse is lse0


def test_strided_out_view_is_written_inside_the_view_only(make_qkv):
    """out = a slice of a larger NaN buffer: the view is filled, the padding around it stays NaN."""
    B, N, H, d = 1, 33, 2, 24
    q, k, v = make_qkv(B, N, N, H, d)
    buf = poison((B, N, H + 1, d + 8))
    out = buf[:, :, :H, :d]
    run_and_check(q, k, v, "float32", out=out)
    b = as64(buf)
    assert np.isnan(b[:, :, H:]).all() and np.isnan(b[..., d:]).all(), "the kernel wrote outside `out`"


# --------------------------------------------------------------------------------------------------
# NaN propagation, determinism
# --------------------------------------------------------------------------------------------------

def test_nan_in_one_query_row_makes_exactly_that_rows_output_nan(make_qkv):
    N, H, d = 33, 2, 16
    q, k, v = make_qkv(1, N, N, H, d, framework="torch")
    r, h = 20, 1
    q[0, r, h, 3] = float("nan")
    out, lse = nf.flash_attn_forward(q, k, v)
    o, l = as64(out), as64(lse)
    assert np.isnan(o[0, r, h]).all(), "the NaN row is NaN (not 0)"
    assert np.isnan(l[0, h, r])
    rows = np.ones(N, bool)
    rows[r] = False
    ref, ref_lse = nf.attention_reference(q, k, v)
    assert rel_err(o[0, rows, h], ref[0, rows, h]) < TOL["float32"], "other rows of that head unaffected"
    assert rel_err(o[:, :, 0], ref[:, :, 0]) < TOL["float32"], "other heads unaffected"


@pytest.mark.parametrize("tensor", ["k", "v"])
def test_nan_in_one_key_reaches_the_rows_that_see_it_under_causal(make_qkv, tensor):
    """A NaN in key / value row j: rows r >= j (which attend to j) turn NaN; rows that never meet j stay exact.

    j sits inside a diagonal tile, so rows r < j of the same tile see it masked, not skipped. For k
    that keeps them exact (masked scores are replaced by -inf). For v, as in any attention computed
    by matrix products (PyTorch's included), masked P = 0 times NaN is NaN, so the documented
    guarantee is: rows of query tiles that never load j's key tile stay exact.
    """
    from numba_flash.kernels import configs
    N, d = 33, 16
    q, k, v = make_qkv(1, N, N, 1, d, framework="torch")
    j = 20
    {"k": k, "v": v}[tensor][0, j, 0, 5] = float("nan")
    out, _ = nf.flash_attn_forward(q, k, v, causal=True)
    o = as64(out)
    assert np.isnan(o[0, j:, 0]).any(axis=-1).all(), "rows that attend to the NaN key are NaN"
    if tensor == "k":
        clean = j
    else:
        cfg = configs.tiles("simt", "fwd", d)
        clean = ((j // cfg.bc) * cfg.bc // cfg.br) * cfg.br   # rows of query tiles before j's key tile
    # rows r < j see keys 0..r only: their exact result is attention over the first j keys
    ref, _ = nf.attention_reference(q[:, :j], k[:, :j], v[:, :j], causal=True)
    assert rel_err(o[:, :clean], ref[:, :clean]) < TOL["float32"], "rows that never meet key j are unaffected"


def test_forward_is_deterministic_bitwise(make_qkv):
    q, k, v = make_qkv(1, 50, 50, 2, 16)
    a = nf.flash_attn_forward(q, k, v, causal=True)
    b = nf.flash_attn_forward(q, k, v, causal=True)
    assert_bitwise_equal(a[0], b[0], "out")
    assert_bitwise_equal(a[1], b[1], "lse")


# --------------------------------------------------------------------------------------------------
# frameworks
# --------------------------------------------------------------------------------------------------

def test_flash_attn_func_on_non_torch_arrays_returns_out_and_lse(make_qkv):
    fw = "numpy" if SIMULATOR else "cupy"
    q, k, v = make_qkv(1, 33, 17, 2, 16, framework=fw)
    out, lse = nf.flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert type(out) is type(q) and type(lse) is type(q)
    ref_out, ref_lse = nf.attention_reference(q, k, v, causal=True)
    assert_close(out, ref_out, "float32")
    assert_lse_close(lse, ref_lse)


@pytest.mark.gpu
def test_numba_device_arrays_match_reference(make_qkv):
    """Numba device arrays in, Numba device arrays out."""
    q, k, v = make_qkv(1, 33, 20, 1, 16, framework="numba")
    out, lse = nf.flash_attn_forward(q, k, v, causal=True)
    assert hasattr(out, "copy_to_host") and hasattr(lse, "copy_to_host")
    ref_out, ref_lse = nf.attention_reference(q, k, v, causal=True)
    assert_close(out, ref_out, "float32")
    assert_lse_close(lse, ref_lse)


# --------------------------------------------------------------------------------------------------
# GPU: large sizes, every framework, streams, memory
# --------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("N", [1000, 2048])
def test_gpu_large_sequences_match_reference(rng, N, d, dtype, causal):
    q, k, v = make_qkv_arrays(rng, 1, N, N, 2, d, dtype, "torch")
    run_and_check(q, k, v, dtype, causal=causal)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("framework", ["cupy", "numba", "torch"])
def test_gpu_every_framework_large_unequal_seqlens(rng, framework, dtype):
    q, k, v = make_qkv_arrays(rng, 2, 1000, 777, 2, 64, dtype, framework)
    out, lse = run_and_check(q, k, v, dtype, causal=True)
    assert type(out).__module__.split(".")[0] == type(q).__module__.split(".")[0]


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["bhsd", "qkvpacked"])
def test_gpu_strided_views_large(rng, layout):
    q, k, v = make_qkv_arrays(rng, 2, 1000, 1000, 3, 64, "float16", "torch", layout)
    out, _ = run_and_check(q, k, v, "float16", causal=True)
    out_c, _ = nf.flash_attn_forward(copy(q), copy(k), copy(v), causal=True)
    assert_bitwise_equal(out, out_c, "out")


@pytest.mark.gpu
def test_gpu_kernel_runs_on_the_current_torch_stream(rng):
    """Launched inside a non-default stream s behind a long sleep: the default stream's sync must not see
    the output written (it would if the kernel went to the default stream); s's sync then does, correctly."""
    q, k, v = make_qkv_arrays(rng, 1, 512, 512, 2, 64, "float16", "torch")
    nf.flash_attn_forward(q, k, v)           # compile outside the timed window
    out = poison((1, 512, 2, 64), "float16", "torch")
    lse = poison((1, 2, 512), "float32", "torch")
    # Load every kernel used below first: CUDA's lazy module loading may synchronize the context when a
    # kernel is first launched, which would wait for s and hide which stream the flash kernel went to.
    torch.cuda._sleep(1000)
    bool(torch.isnan(out).all())
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(2_000_000_000)     # about a second of GPU clock cycles on s
        nf.flash_attn_forward(q, k, v, out=out, lse=lse)
    torch.cuda.default_stream().synchronize()
    still_sleeping = not s.query()
    unwritten = bool(torch.isnan(out).all())   # runs on the default stream, which does not wait for s
    assert still_sleeping, "the sleep on s ended too early for this test to tell the streams apart"
    assert unwritten, "out was written before stream s reached the kernel: it ran on another stream"
    s.synchronize()
    ref_out, ref_lse = nf.attention_reference(q, k, v)
    assert_close(out, ref_out, "float16")
    assert_lse_close(lse, ref_lse, "float16")


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_forward_memory_is_linear_in_seqlen_out_and_lse_only(rng):
    N, d = 16384, 64
    q, k, v = make_qkv_arrays(rng, 1, N, N, 1, d, "float16", "torch")
    nf.flash_attn_forward(q[:, :128], k[:, :128], v[:, :128])   # compile and cache the dense lists first
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out, lse = nf.flash_attn_func(q, k, v, return_lse=True)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    expected = out.numel() * out.element_size() + lse.numel() * lse.element_size()
    assert extra <= expected + (1 << 20), f"forward allocated {extra} bytes, out + lse are {expected}"
    # spot-check a few rows against the reference (the full N x N reference is too large)
    rows = torch.tensor([0, 1, N // 2, N - 1], device=q.device)
    ref, _ = nf.attention_reference(q[:, rows], k, v)
    assert rel_err(out[:, rows], ref) < TOL["float16"]
