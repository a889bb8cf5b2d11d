"""Backward pass (flash_attn_backward, torch autograd, torch.compile) vs the float64 reference gradients.

Same shapes as the forward tests: under the simulator the tile is 16 x 16, so 17, 33, 40, 50 leave ragged
tiles. Gradients are written by exactly one thread each (no atomics), so they are also checked bitwise
for determinism and for independence from the input strides.
"""
import math
import os

import numpy as np
import pytest

import numba_flash as nf
from conftest import (DEFAULT_FW, HEADDIMS, SIMULATOR, TOL_BWD, as64, assert_bitwise_equal, assert_close,
                      copy, make_qkv_arrays, poison, random_array, rel_err, torch)

SEQLENS = [(17, 17), (33, 50), (50, 33), (1, 40), (40, 1)]
DEVICE = "cpu" if SIMULATOR else "cuda"


def fwd_bwd(q, k, v, dout, dq=None, dk=None, dv=None, **kw):
    out, lse = nf.flash_attn_forward(q, k, v, **kw)
    return nf.flash_attn_backward(dout, q, k, v, out, lse, dq=dq, dk=dk, dv=dv, **kw)


def check_grads(grads, dout, q, k, v, dtype, tol=None, **kw):
    ref = nf.attention_reference_backward(dout, q, k, v, **kw)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref):
        assert_close(g, r, dtype, what=name, tol=TOL_BWD[dtype] if tol is None else tol)


def backward_case(rng, B, Nq, Nk, H, d, dtype="float32", framework=None, layout="bshd", **kw):
    q, k, v = make_qkv_arrays(rng, B, Nq, Nk, H, d, dtype, framework, layout)
    dout = random_array(rng, (B, Nq, H, d), dtype, framework or DEFAULT_FW)
    return q, k, v, dout


@pytest.mark.parametrize("backend", ["simt", "mma"])
def test_a_second_identical_call_builds_no_kernel(rng, backend):
    """Every kernel factory is cached on its plan: a repeated forward + backward builds nothing (on a GPU
    an uncached factory recompiles each call, ~1.7 s a step, which no correctness test notices)."""
    from numba_flash.kernels import backward, forward

    factories = [forward.make_forward_kernel, backward.make_prepare_kernel, backward.make_dkdv_kernel,
                 backward.make_dq_kernel, backward.make_dq_convert_kernel]
    assert all(hasattr(f, "cache_info") for f in factories)
    dtype = "float32" if backend == "simt" else "float16"
    q, k, v, dout = backward_case(rng, 1, 17, 17, 1, 16, dtype)
    fwd_bwd(q, k, v, dout, backend=backend)
    built = [f.cache_info().misses for f in factories]
    fwd_bwd(q, k, v, dout, backend=backend)
    assert [f.cache_info().misses for f in factories] == built


# --------------------------------------------------------------------------------------------------
# flash_attn_backward: shapes, causal, layouts, dtypes
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Nq,Nk", SEQLENS)
def test_backward_matches_reference_for_ragged_and_unequal_seqlens(rng, Nq, Nk, causal):
    q, k, v, dout = backward_case(rng, 1, Nq, Nk, 1, 16)
    grads = fwd_bwd(q, k, v, dout, causal=causal)
    check_grads(grads, dout, q, k, v, "float32", causal=causal)


def test_backward_top_left_causal_keys_no_query_sees_get_exact_zero_dk_dv(rng):
    Nq, Nk, H, d = 17, 40, 1, 16
    q, k, v, dout = backward_case(rng, 1, Nq, Nk, H, d)
    dk0, dv0 = poison((1, Nk, H, d)), poison((1, Nk, H, d))
    grads = fwd_bwd(q, k, v, dout, dk=dk0, dv=dv0, causal=True, causal_align="top_left")
    check_grads(grads, dout, q, k, v, "float32", causal=True, causal_align="top_left")
    # top-left: query r sees keys c <= r, so keys Nq..Nk-1 are seen by nobody
    assert (as64(grads[1])[:, Nq:] == 0).all() and (as64(grads[2])[:, Nq:] == 0).all()


def test_backward_causal_more_queries_than_keys_rows_seeing_no_key_get_zero_dq_and_contribute_nothing(rng):
    Nq, Nk, H, d = 40, 17, 2, 16
    empty = Nq - Nk                       # bottom-right: rows r < Nq - Nk see no key
    q, k, v, dout = backward_case(rng, 1, Nq, Nk, H, d, framework="torch")
    dout[:, :empty] *= 1000.0             # large upstream gradients on the empty rows must not leak
    dq0 = poison((1, Nq, H, d), framework="torch")
    dq, dk, dv = fwd_bwd(q, k, v, dout, dq=dq0, causal=True)
    assert dq is dq0
    assert (as64(dq)[:, :empty] == 0).all(), "dq of rows that see no key is exactly 0"
    check_grads((dq, dk, dv), dout, q, k, v, "float32", causal=True)
    # dk, dv are those of the visible rows alone (for them, bottom-right causal over Nk x Nk is the same mask)
    _, dk_vis, dv_vis = nf.attention_reference_backward(dout[:, empty:], q[:, empty:], k, v, causal=True)
    assert rel_err(dk, dk_vis) < TOL_BWD["float32"] and rel_err(dv, dv_vis) < TOL_BWD["float32"]


@pytest.mark.parametrize("layout", ["bhsd", "qkvpacked", "kvpacked"])
def test_backward_strided_inputs_give_bitwise_the_contiguous_gradients(rng, layout):
    B, N, H, d = 2, 20, 2, 16
    q, k, v, dout = backward_case(rng, B, N, N, H, d, layout=layout)
    grads = fwd_bwd(q, k, v, dout, causal=True)
    check_grads(grads, dout, q, k, v, "float32", causal=True)
    grads_c = fwd_bwd(copy(q), copy(k), copy(v), copy(dout), causal=True)
    for name, g, gc in zip(("dq", "dk", "dv"), grads, grads_c):
        assert_bitwise_equal(g, gc, name)


def test_backward_writes_gradients_into_one_packed_dqkv_buffer(rng):
    """dq, dk, dv as the slices [:, :, 0/1/2] of one NaN-poisoned (B, N, 3, H, d) buffer (flash-attn's
    qkv-packed layout): the three interleaved outputs are all written and none overwrites another."""
    B, N, H, d = 2, 20, 2, 16
    q, k, v, dout = backward_case(rng, B, N, N, H, d, layout="qkvpacked")
    buf = poison((B, N, 3, H, d))
    grads = fwd_bwd(q, k, v, dout, dq=buf[:, :, 0], dk=buf[:, :, 1], dv=buf[:, :, 2], causal=True)
    check_grads(grads, dout, q, k, v, "float32", causal=True)
    check_grads([as64(buf)[:, :, i] for i in range(3)], dout, q, k, v, "float32", causal=True)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_backward_every_dtype_matches_reference(rng, dtype):
    q, k, v, dout = backward_case(rng, 1, 33, 40, 1, 32, dtype, framework="torch")
    grads = fwd_bwd(q, k, v, dout, causal=True)
    for g, x in zip(grads, (q, k, v)):
        assert g.dtype == x.dtype
    check_grads(grads, dout, q, k, v, dtype, causal=True)


@pytest.mark.parametrize("d", HEADDIMS)
def test_backward_head_dims_match_reference(rng, d):
    N = 33 if SIMULATOR else 300
    q, k, v, dout = backward_case(rng, 1, N, N, 1, d)
    check_grads(fwd_bwd(q, k, v, dout), dout, q, k, v, "float32")


def test_backward_non_default_softmax_scale_batch_and_heads_match_reference(rng):
    q, k, v, dout = backward_case(rng, 2, 17, 20, 3, 16)
    grads = fwd_bwd(q, k, v, dout, softmax_scale=0.3, causal=True)
    check_grads(grads, dout, q, k, v, "float32", softmax_scale=0.3, causal=True)


def test_backward_preallocated_outputs_written_inside_their_views_only(rng):
    """dq/dk/dv as slices of larger NaN buffers (head dim 24 of 32, one spare head): the views are filled
    with the right gradients and the padding stays NaN."""
    B, Nq, Nk, H, d = 1, 33, 20, 1, 24
    q, k, v, dout = backward_case(rng, B, Nq, Nk, H, d)
    bufs = [poison((B, n, H + 1, d + 8)) for n in (Nq, Nk, Nk)]
    grads = fwd_bwd(q, k, v, dout, *(b[:, :, :H, :d] for b in bufs))
    check_grads(grads, dout, q, k, v, "float32")
    for name, b in zip(("dq", "dk", "dv"), bufs):
        b = as64(b)
        assert np.isnan(b[:, :, H:]).all() and np.isnan(b[..., d:]).all(), f"{name} written outside its view"


def test_backward_is_deterministic_bitwise(rng):
    q, k, v, dout = backward_case(rng, 1, 50, 50, 2, 16)
    out, lse = nf.flash_attn_forward(q, k, v, causal=True)
    a = nf.flash_attn_backward(dout, q, k, v, out, lse, causal=True)
    b = nf.flash_attn_backward(dout, q, k, v, out, lse, causal=True)
    for name, x, y in zip(("dq", "dk", "dv"), a, b):
        assert_bitwise_equal(x, y, name)


# --------------------------------------------------------------------------------------------------
# torch autograd
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("d", [64, 24, 40, 16])
def test_prepare_kernel_D_is_rowsum_of_dout_times_out_minus_dlse_bitwise_for_any_alignment(rng, dtype, d):
    """D = rowsum(dO * O) - dlse, read as 16-byte vectors from aligned rows (where the head dim is a
    multiple of the vector) and element by element from rows shifted by one element: the same bits both
    ways (gradients must not depend on alignment). 3 rows per head leave most lanes past the last row.
    And lse2 = lse * log2(e), +inf where lse is -inf (rows that saw no key)."""
    from numba_flash import interop
    from numba_flash.api import lse_dtype
    from numba_flash.kernels import backward
    from numba_flash.kernels.softmax import LOG2E
    B, N, H = 5, 3, 3
    values = [random_array(rng, (B, N, H, d), dtype, "torch") for _ in range(2)]
    dlse = random_array(rng, (B, H, N), lse_dtype(dtype), "torch")
    ref = None
    for aligned in (True, False):
        o, do = values if aligned else (poison((B, N, H, d + 1), dtype, "torch")[..., 1:] for _ in range(2))
        if not aligned:
            o.copy_(values[0])
            do.copy_(values[1])
        dvec = poison((B, H, N), lse_dtype(dtype), "torch")
        ov, dov, dv, dl = (interop.flat_view(x, n) for x, n in ((o, "out"), (do, "dout"), (dvec, "D"),
                                                                 (dlse, "dlse")))
        assert backward.prepare_vector(dtype, d, ov, dov) == (aligned and d % backward.prepare_chunk(dtype) == 0)
        zf = poison((7,), "float32", "torch")
        lse = random_array(rng, (B, H, N), lse_dtype(dtype), "torch")
        lse[0, 1, 2] = -math.inf
        lse2 = poison((B, H, N), lse_dtype(dtype), "torch")
        kern, grid, stream, args = backward.prepare_launch(dtype, 0, ov, dov, dv, interop.flat_view(zf, "zf"), 7, dl,
                                                           interop.flat_view(lse, "lse"),
                                                           interop.flat_view(lse2, "lse2"))
        kern(grid, stream, *args)
        assert (as64(zf) == 0).all()
        lt = np.float64 if dtype == "float64" else np.float32       # the kernel's product, one rounding
        want = (as64(lse).astype(lt) * lt(LOG2E)).astype(np.float64)
        want[0, 1, 2] = math.inf
        np.testing.assert_array_equal(as64(lse2), want, err_msg="lse2 = lse * log2(e), +inf for -inf")
        if ref is None:
            ref = copy(dvec)
            expect = np.einsum("bnhd,bnhd->bhn", as64(o), as64(do)) - as64(dlse)
            assert_close(dvec, expect, "float32" if dtype != "float64" else "float64", what="D")
        else:
            assert_bitwise_equal(dvec, ref, "D from unaligned rows")


def leaf(x):
    return x.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flash_attn_func_autograd_grads_match_reference(rng, causal, dtype):
    q, k, v, dout = backward_case(rng, 1, 33, 20, 2, 16, dtype, framework="torch")
    q, k, v = leaf(q), leaf(k), leaf(v)
    out = nf.flash_attn_func(q, k, v, causal=causal)
    assert out.requires_grad
    out.backward(dout)
    check_grads((q.grad, k.grad, v.grad), dout, q, k, v, dtype, causal=causal)


def test_out_sum_backward_with_stride_zero_gradient_matches_reference(rng):
    """out.sum().backward() hands the op an expanded gradient whose strides are all 0."""
    q, k, v, _ = backward_case(rng, 1, 33, 33, 1, 16, framework="torch")
    q, k, v = leaf(q), leaf(k), leaf(v)
    nf.flash_attn_func(q, k, v, causal=True).sum().backward()
    ones = torch.ones(q.shape, dtype=q.dtype)
    check_grads((q.grad, k.grad, v.grad), ones, q, k, v, "float32", causal=True)


def test_autograd_through_packed_qkv_slices_accumulates_into_the_packed_gradient(rng):
    B, N, H, d = 1, 33, 2, 16
    qkv = torch.from_numpy(rng.standard_normal((B, N, 3, H, d))).float().to(DEVICE).requires_grad_(True)
    dout = torch.from_numpy(rng.standard_normal((B, N, H, d))).float().to(DEVICE)
    q, k, v = qkv.unbind(2)
    nf.flash_attn_func(q, k, v, causal=True).backward(dout)
    ref = nf.attention_reference_backward(dout, q, k, v, causal=True)
    g = as64(qkv.grad)
    for i, (name, r) in enumerate(zip(("dq", "dk", "dv"), ref)):
        assert rel_err(g[:, :, i], r) < TOL_BWD["float32"], name


@pytest.mark.parametrize("Nq,Nk", [(33, 20), (20, 33)])
def test_sdpa_grads_match_torch_sdpa_float64_top_left_causal(rng, Nq, Nk):
    F = torch.nn.functional
    B, H, d = 1, 2, 16
    q, k, v = (torch.from_numpy(rng.standard_normal((B, H, n, d))) for n in (Nq, Nk, Nk))
    dout = torch.from_numpy(rng.standard_normal((B, H, Nq, d)))
    mine = [leaf(x.to(DEVICE)) for x in (q, k, v)]
    nf.scaled_dot_product_attention(*mine, is_causal=True).backward(dout.to(DEVICE))
    theirs = [leaf(x) for x in (q, k, v)]
    F.scaled_dot_product_attention(*theirs, is_causal=True).backward(dout)
    for name, a, b in zip(("dq", "dk", "dv"), mine, theirs):
        assert_close(a.grad, b.grad, "float64", what=name)


@pytest.mark.parametrize("shape", [(0, 9, 2, 16), (1, 9, 0, 16), (1, 0, 2, 16)], ids=["batch0", "heads0",
                                                                                      "seqlen0"])
def test_empty_inputs_through_autograd_give_empty_outputs_and_gradients(shape):
    """out.sum() of an empty output hands backward an expanded all-stride-0 gradient: empty in, empty out."""
    q, k, v = (torch.zeros(shape, device=DEVICE).requires_grad_(True) for _ in range(3))
    out, lse = nf.flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert out.shape == shape and lse.shape == (shape[0], shape[2], shape[1])
    (out.sum() + lse.sum()).backward()
    assert all(x.grad is not None and x.grad.shape == shape for x in (q, k, v))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_lse_is_differentiable_gradcheck_float64(rng, causal):
    """A loss using lse (as merging partial attentions does): d lse / d S = P enters through D."""
    q, k, v = (leaf(torch.from_numpy(rng.standard_normal((1, n, 2, 16))).to(DEVICE)) for n in (7, 9, 9))
    w = torch.from_numpy(rng.standard_normal((1, 2, 7))).to(DEVICE)

    def f(a, b, c):
        out, lse = nf.flash_attn_func(a, b, c, causal=causal, return_lse=True)
        return out, lse * w
    assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=True, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_lse_gradient_matches_float64_autograd_of_logsumexp(rng):
    """The low-level dlse argument against torch autograd of the plain-math log-sum-exp."""
    B, Nq, Nk, H, d = 1, 17, 24, 2, 16
    q, k, v = (torch.from_numpy(rng.standard_normal((B, n, H, d))) for n in (Nq, Nk, Nk))
    dlse = torch.from_numpy(rng.standard_normal((B, H, Nq)))
    qt, kt = leaf(q), leaf(k)
    s = torch.einsum("bqhd,bkhd->bhqk", qt, kt) / math.sqrt(d)
    torch.autograd.backward(torch.logsumexp(s, -1), dlse)
    qd, kd, vd = (x.to(DEVICE) for x in (q, k, v))
    out, lse = nf.flash_attn_forward(qd, kd, vd)
    dq, dk, dv = nf.flash_attn_backward(torch.zeros_like(out), qd, kd, vd, out, lse, dlse=dlse.to(DEVICE))
    assert_close(dq, qt.grad, "float64", what="dq")
    assert_close(dk, kt.grad, "float64", what="dk")
    assert float(as64(dv).__abs__().max()) == 0.0        # lse does not depend on v


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Nq,Nk", [(5, 9), (9, 5)])
def test_gradcheck_flash_attn_func_float64(rng, Nq, Nk, causal):
    """torch.autograd.gradcheck (fast mode: random projections of the Jacobian, so few kernel launches)."""
    q, k, v = (leaf(torch.from_numpy(rng.standard_normal((1, n, 1, 16))).to(DEVICE)) for n in (Nq, Nk, Nk))
    assert torch.autograd.gradcheck(lambda a, b, c: nf.flash_attn_func(a, b, c, causal=causal), (q, k, v),
                                    fast_mode=True, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_opcheck_custom_ops_fwd_and_bwd(rng):
    """torch.library.opcheck: schema, fake (meta) implementations, autograd registration."""
    import numba_flash.autograd  # noqa: F401  registers torch.ops.numba_flash
    q, k, v = (torch.from_numpy(rng.standard_normal((1, n, 1, 16))).to(DEVICE) for n in (9, 7, 7))
    q.requires_grad_(True)
    k.requires_grad_(True)
    v.requires_grad_(True)
    fwd_args = (q, k, v, 0.25, True, False, None, None, None, None, 0, 0)
    torch.library.opcheck(torch.ops.numba_flash.fwd.default, fwd_args)
    out, lse = torch.ops.numba_flash.fwd(*(a.detach() if torch.is_tensor(a) else a for a in fwd_args))
    dout = torch.from_numpy(rng.standard_normal(out.shape)).to(DEVICE)
    bwd_args = (dout, q.detach(), k.detach(), v.detach(), out, lse, 0.25, True, False,
                None, None, None, None, 0, 0)
    torch.library.opcheck(torch.ops.numba_flash.bwd.default, bwd_args)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_torch_compile_fullgraph_matches_eager_output_and_grads(rng, causal):
    torch._dynamo.reset()

    def f(q, k, v):
        return nf.flash_attn_func(q, k, v, causal=causal).sin().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    base = [torch.from_numpy(rng.standard_normal((1, n, 2, 16))).float().to(DEVICE) for n in (33, 20, 20)]
    eager_in, comp_in = [leaf(x) for x in base], [leaf(x) for x in base]
    le = f(*eager_in)
    le.backward()
    lc = compiled(*comp_in)
    lc.backward()
    assert torch.equal(le, lc)
    for name, a, b in zip(("dq", "dk", "dv"), eager_in, comp_in):
        assert torch.equal(a.grad, b.grad), name
    # and eager itself is right
    dout = torch.cos(nf.flash_attn_func(*base, causal=causal))
    check_grads([x.grad for x in eager_in], dout, *base, "float32", causal=causal)


# --------------------------------------------------------------------------------------------------
# GPU: large sizes
# --------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("N", [1000, 2048])
def test_gpu_large_backward_matches_reference(rng, N, d, dtype, causal):
    q, k, v, dout = backward_case(rng, 1, N, N, 2, d, dtype, framework="torch")
    check_grads(fwd_bwd(q, k, v, dout, causal=causal), dout, q, k, v, dtype, causal=causal)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("framework", ["cupy", "numba"])
def test_gpu_backward_other_frameworks(rng, framework):
    q, k, v, dout = backward_case(rng, 2, 1000, 777, 2, 64, "float32", framework=framework)
    check_grads(fwd_bwd(q, k, v, dout, causal=True), dout, q, k, v, "float32", causal=True)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_autograd_large_bfloat16_and_determinism(rng):
    q, k, v, dout = backward_case(rng, 2, 2048, 2048, 4, 128, "bfloat16", framework="torch")
    grads = []
    for _ in range(2):
        a, b, c = leaf(q), leaf(k), leaf(v)
        nf.flash_attn_func(a, b, c, causal=True).backward(dout)
        grads.append((a.grad, b.grad, c.grad))
    for name, x, y in zip(("dq", "dk", "dv"), *grads):
        assert_bitwise_equal(x, y, name)
    check_grads(grads[0], dout, q, k, v, "bfloat16", causal=True)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_offsets_past_2_pow_31_elements_index_correctly_forward_and_backward():
    """Inputs, output and gradients whose second batch starts 2**31 + 64 elements into a 4 GiB buffer:
    32-bit index arithmetic would wrap there. Results must equal those of compact copies, bitwise."""
    import torch
    B, N, H, d = 2, 100, 1, 64
    bstride = 2 ** 31 + 64
    buf = torch.empty(bstride + N * H * d, dtype=torch.float16, device="cuda")

    def far(fill):
        t = torch.as_strided(buf, (B, N, H, d), (bstride, H * d, d, 1))
        if fill:
            t.copy_(torch.randn(B, N, H, d, device="cuda", dtype=torch.float16))
        return t

    g = torch.Generator(device="cuda").manual_seed(int.from_bytes(os.urandom(4), "little"))
    q, k, v, do = (torch.randn(B, N, H, d, device="cuda", dtype=torch.float16, generator=g) for _ in range(4))
    out_c, lse_c = nf.flash_attn_forward(q, k, v, causal=True)
    grads_c = nf.flash_attn_backward(do, q, k, v, out_c, lse_c, causal=True)
    # One far tensor at a time shares the buffer: check the forward with far q, then far out.
    fq = far(False)
    fq.copy_(q)
    out, lse = nf.flash_attn_forward(fq, k, v, causal=True)
    assert_bitwise_equal(out, out_c, "out from a far q")
    fo = far(False)
    fo.fill_(float("nan"))
    nf.flash_attn_forward(q, k, v, causal=True, out=fo)
    assert_bitwise_equal(fo, out_c, "out written far")
    fdq = far(False)
    fdq.fill_(float("nan"))
    nf.flash_attn_backward(do, q, k, v, out_c, lse_c, causal=True, dq=fdq)
    assert_bitwise_equal(fdq, grads_c[0], "dq written far")
    fk = far(False)
    fk.copy_(k)
    grads = nf.flash_attn_backward(do, q, fk, v, out_c, lse_c, causal=True)
    for a, b, n in zip(grads, grads_c, ("dq", "dk", "dv")):
        assert_bitwise_equal(a, b, n + " with a far k")
