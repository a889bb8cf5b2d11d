"""The tensor-core path (backend="mma": mma.sync, float16 / bfloat16) against the float64 reference.

Tolerance as flash-attn judges itself: the error against the float64 reference may be at most twice the
error of PyTorch's own attention computed in the same dtype (matmul -> softmax -> matmul, each rounded to
float16 / bfloat16) on the same inputs, plus 1e-5. Under the simulator the tensor-core tiles are 32 x 16
(forward, dQ) and 16 x 32 (dK/dV) with two warps per block, so the lengths here leave ragged tiles on
both sides; on a GPU the marked tests add real sizes and every head dim the path takes.
The outputs are NaN-poisoned before every call, so an element the kernels forget to write fails.
"""
import math

import numpy as np
import pytest

import numba_flash as nf
from numba_flash import BlockMask
from numba_flash.reference import visibility
from conftest import (SIMULATOR, as64, assert_bitwise_equal, assert_lse_close, block_sizes, copy,
                      make_qkv_arrays, poison, random_array, rel_err, torch)

DEVICE = "cpu" if SIMULATOR else "cuda"
FW = "torch"        # CPU tensors under the simulator (numpy has no bfloat16)


def torch_lowp(q, k, v, dout, dtype, softmax_scale=None, causal=False, causal_align="bottom_right",
               mask=None):
    """PyTorch's own attention in `dtype` (every intermediate rounded to it) and its gradients, as float64
    numpy: the error budget of the low-precision path."""
    td = getattr(torch, dtype)

    def leaf(x):
        return torch.from_numpy(as64(x)).to(DEVICE, td).requires_grad_(True)

    qt, kt, vt = (leaf(x) for x in (q, k, v))
    d = qt.shape[-1]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    s = torch.einsum("bqhd,bkhd->bhqk", qt, kt) * scale
    vis = torch.from_numpy(visibility(qt.shape[1], kt.shape[1], qt.shape[2], causal, causal_align,
                                      mask)).to(DEVICE)
    s = s.masked_fill(~vis[None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.where(vis[None].any(-1, keepdim=True), p, torch.zeros_like(p))   # empty rows: 0, not NaN
    out = torch.einsum("bhqk,bkhd->bqhd", p, vt)
    out.backward(torch.from_numpy(as64(dout)).to(DEVICE, td))
    return [x.detach().to("cpu").double().numpy() for x in (out, qt.grad, kt.grad, vt.grad)]


def _err(a, ref):
    """rel_err, except against a reference that is exactly zero (dQ when every row sees one key: dP - D
    cancels exactly in float64, while the kernels form dP and D = rowsum(dO * O) in float32 with different
    summation orders): there the relative error is undefined and the RMS absolute error is judged, so the
    float32 rounding noise does not grow with the number of elements."""
    if np.isfinite(as64(ref)).all() and not np.any(as64(ref)):
        a = as64(a)
        return float(np.sqrt(np.mean(a * a))) if np.isfinite(a).all() else math.inf
    return rel_err(a, ref)


def assert_within_budget(name, ours, ref, theirs):
    err, budget = _err(ours, ref), _err(theirs, ref)
    assert err <= 2 * budget + 1e-5, (f"{name}: relative error {err:.3g} > 2 x PyTorch's own {budget:.3g} "
                                      f"+ 1e-5")


def run_mma(q, k, v, dout, dtype, deterministic=True, backend="mma", **kw):
    """Forward + backward on a tensor-core path into NaN-poisoned outputs."""
    B, Nq, H, d = q.shape
    Nk = k.shape[1]
    out, lse = poison((B, Nq, H, d), dtype, FW), poison((B, H, Nq), "float32", FW)
    nf.flash_attn_forward(q, k, v, out=out, lse=lse, backend=backend, **kw)
    grads = [poison((B, n, H, d), dtype, FW) for n in (Nq, Nk, Nk)]
    nf.flash_attn_backward(dout, q, k, v, out, lse, dq=grads[0], dk=grads[1], dv=grads[2], backend=backend,
                           deterministic=deterministic, **kw)
    return out, lse, grads


def check_all(q, k, v, dout, dtype, deterministic=True, backend="mma", **kw):
    out, lse, grads = run_mma(q, k, v, dout, dtype, deterministic, backend, **kw)
    ref_out, ref_lse = nf.attention_reference(q, k, v, **kw)
    ref_grads = nf.attention_reference_backward(dout, q, k, v, **kw)
    theirs = torch_lowp(q, k, v, dout, dtype, **kw)
    assert_lse_close(lse, ref_lse, dtype)
    for name, ours, ref, th in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads), theirs):
        assert_within_budget(name, ours, ref, th)
    return out, lse, grads


# --------------------------------------------------------------------------------------------------
# shapes, causal, dtypes
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,causal,Nq,Nk", [
    ("float16", False, 33, 50), ("float16", True, 50, 33), ("bfloat16", True, 33, 50),
    ("bfloat16", False, 1, 40), ("float16", False, 40, 1)])
def test_mma_forward_backward_within_twice_torch_error_for_ragged_unequal_seqlens(rng, dtype, causal, Nq, Nk):
    q, k, v = make_qkv_arrays(rng, 1, Nq, Nk, 2, 32, dtype, FW)
    dout = random_array(rng, (1, Nq, 2, 32), dtype, FW)
    check_all(q, k, v, dout, dtype, causal=causal)


def test_mma_top_left_causal_and_rows_seeing_no_key_give_zero_out_neg_inf_lse_and_zero_grads(rng):
    Nq, Nk, H, d = 40, 17, 1, 16
    q, k, v = make_qkv_arrays(rng, 1, Nq, Nk, H, d, "float16", FW)
    dout = random_array(rng, (1, Nq, H, d), "float16", FW)
    out, lse, (dq, dk, dv) = check_all(q, k, v, dout, "float16", causal=True)
    empty = Nq - Nk                       # bottom-right: rows r < Nq - Nk see no key
    assert (as64(out)[:, :empty] == 0).all() and np.isneginf(as64(lse)[:, :, :empty]).all()
    assert (as64(dq)[:, :empty] == 0).all()
    q2, k2, v2 = make_qkv_arrays(rng, 1, 17, 40, H, d, "bfloat16", FW)
    dout2 = random_array(rng, (1, 17, H, d), "bfloat16", FW)
    _, _, (_, dk2, dv2) = check_all(q2, k2, v2, dout2, "bfloat16", causal=True, causal_align="top_left")
    # top-left: keys 17..39 are seen by no query
    assert (as64(dk2)[:, 17:] == 0).all() and (as64(dv2)[:, 17:] == 0).all()


@pytest.mark.parametrize("d", [16, 24] if SIMULATOR else [32, 40, 64, 80, 96, 128, 160, 192, 256])
def test_mma_head_dims_within_twice_torch_error(rng, d):
    N = 33 if SIMULATOR else 300
    q, k, v = make_qkv_arrays(rng, 1, N, N, 1, d, "float16", FW)
    dout = random_array(rng, (1, N, 1, d), "float16", FW)
    check_all(q, k, v, dout, "float16", causal=True)


@pytest.mark.parametrize("scale", [0.3, -0.7])
def test_mma_non_default_and_negative_scale_batch_and_heads(rng, scale):
    """A negative scale takes the forward's scale-first softmax (max(c s) is not c max(s) for c < 0)."""
    q, k, v = make_qkv_arrays(rng, 2, 20, 17, 2, 16, "bfloat16", FW)
    dout = random_array(rng, (2, 20, 2, 16), "bfloat16", FW)
    check_all(q, k, v, dout, "bfloat16", softmax_scale=scale, causal=True)


# --------------------------------------------------------------------------------------------------
# layouts: strided views, and rows that are not 16-byte aligned (ordinary loads instead of cp.async)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["bhsd", "qkvpacked", "kvpacked"])
def test_mma_strided_views_give_bitwise_the_results_of_contiguous_copies(rng, layout):
    q, k, v = make_qkv_arrays(rng, 1, 20, 20, 2, 16, "float16", FW, layout)
    dout = random_array(rng, (1, 20, 2, 16), "float16", FW)
    a = run_mma(q, k, v, dout, "float16", causal=True)
    b = run_mma(copy(q), copy(k), copy(v), dout, "float16", causal=True)
    assert_bitwise_equal(a[0], b[0], "out")
    for name, x, y in zip(("dq", "dk", "dv"), a[2], b[2]):
        assert_bitwise_equal(x, y, name)


@pytest.mark.parametrize("case", ["headdim_20", "offset_rows"])
def test_mma_rows_not_16_byte_aligned_take_plain_loads_and_match(rng, case):
    """head dim 20 (rows of 40 bytes) or views starting 2 elements into their buffer: no cp.async."""
    if case == "headdim_20":
        q, k, v = make_qkv_arrays(rng, 1, 33, 20, 1, 20, "float16", FW)
        dout = random_array(rng, (1, 33, 1, 20), "float16", FW)
    else:
        bufs = [random_array(rng, (1, n, 1, 16 + 8), "float16", FW) for n in (33, 20, 20, 33)]
        q, k, v, dout = (b[..., 2:18] for b in bufs)
    from numba_flash.kernels import configs
    from numba_flash import api, interop
    p = api.check_qkv(q, k, v)
    assert not api._aligned("mma", p, *(interop.flat_view(x, "x") for x in (q, k, v)))
    assert configs.forward_plan("mma", p.headdim, "float16", True, False).aligned is False
    check_all(q, k, v, dout, "float16", causal=True)


# --------------------------------------------------------------------------------------------------
# block-sparse, NaN, determinism, autograd, dispatch
# --------------------------------------------------------------------------------------------------

def test_mma_block_sparse_matches_reference_with_the_dense_mask(rng):
    b1, _ = block_sizes(16, "float16")
    nq, nk = 2 * b1 + 3, 2 * b1
    mask = BlockMask.random(0.5, nq, nk, (b1, b1), nheads=2, seed=int(rng.integers(1 << 31)))
    q, k, v = make_qkv_arrays(rng, 1, nq, nk, 2, 16, "float16", FW)
    dout = random_array(rng, (1, nq, 2, 16), "float16", FW)
    out, lse, grads = run_mma(q, k, v, dout, "float16", block_mask=mask)
    dense = mask.to_dense()
    ref_out, ref_lse = nf.attention_reference(q, k, v, mask=dense)
    ref_grads = nf.attention_reference_backward(dout, q, k, v, mask=dense)
    theirs = torch_lowp(q, k, v, dout, "float16", mask=dense)
    assert_lse_close(lse, ref_lse, "float16")
    for name, ours, ref, th in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads), theirs):
        assert_within_budget(name, ours, ref, th)


def test_mma_nan_in_one_query_row_makes_exactly_that_row_nan(rng):
    q, k, v = make_qkv_arrays(rng, 1, 33, 33, 1, 16, "float16", "torch")
    q[0, 7, 0, 3] = float("nan")
    out, lse = nf.flash_attn_forward(q, k, v, backend="mma")
    o = as64(out)
    assert np.isnan(o[0, 7]).all() and np.isnan(as64(lse)[0, 0, 7])
    rows = np.arange(33) != 7
    ref, _ = nf.attention_reference(q, k, v)
    assert np.isfinite(o[0, rows]).all()
    assert rel_err(o[0, rows], ref[0, rows]) < 1e-2


@pytest.mark.parametrize("causal,sparse", [(False, False), (True, False), (False, True)],
                         ids=["full", "causal", "block-sparse"])
def test_mma_atomic_dq_within_twice_torch_error(rng, causal, sparse):
    """deterministic=False: dQ accumulated by the dK/dV kernel with atomics, then converted."""
    b1, _ = block_sizes(16, "float16")
    nq, nk = 2 * b1 + 5, 2 * b1 - 3
    q, k, v = make_qkv_arrays(rng, 2, nq, nk, 2, 24, "bfloat16", FW, "kvpacked")
    dout = random_array(rng, (2, nq, 2, 24), "bfloat16", FW)
    kw = dict(causal=causal)
    if sparse:
        mask = BlockMask.random(0.5, nq, nk, (b1, b1), nheads=2, seed=int(rng.integers(1 << 31)))
        _, _, grads = run_mma(q, k, v, dout, "bfloat16", deterministic=False, block_mask=mask)
        dense = mask.to_dense()
        ref = nf.attention_reference_backward(dout, q, k, v, mask=dense)
        theirs = torch_lowp(q, k, v, dout, "bfloat16", mask=dense)[1:]
        for name, ours, r, th in zip(("dq", "dk", "dv"), grads, ref, theirs):
            assert_within_budget(name, ours, r, th)
    else:
        check_all(q, k, v, dout, "bfloat16", deterministic=False, **kw)


def test_deterministic_must_be_a_bool(rng):
    q, k, v = make_qkv_arrays(rng, 1, 8, 8, 1, 16, "float16", FW)
    out, lse = nf.flash_attn_forward(q, k, v)
    with pytest.raises(TypeError, match="deterministic"):
        nf.flash_attn_backward(q, q, k, v, out, lse, deterministic="no")
    with pytest.raises(TypeError, match="deterministic"):
        nf.flash_attn_func(q.clone().requires_grad_(), k, v, deterministic=1)


def test_mma_forward_and_backward_are_bitwise_deterministic(rng):
    q, k, v = make_qkv_arrays(rng, 1, 40, 40, 1, 16, "bfloat16", FW)
    dout = random_array(rng, (1, 40, 1, 16), "bfloat16", FW)
    a, b = (run_mma(q, k, v, dout, "bfloat16", causal=True) for _ in range(2))
    assert_bitwise_equal(a[0], b[0], "out")
    assert_bitwise_equal(a[1], b[1], "lse")
    for name, x, y in zip(("dq", "dk", "dv"), a[2], b[2]):
        assert_bitwise_equal(x, y, name)


def test_flash_attn_func_autograd_on_the_mma_backend_and_through_the_environment(rng, monkeypatch):
    q, k, v = make_qkv_arrays(rng, 1, 20, 33, 2, 16, "float16", "torch")
    dout = random_array(rng, (1, 20, 2, 16), "float16", "torch")
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    nf.flash_attn_func(*leaves, causal=True, backend="mma").backward(dout)
    monkeypatch.setenv("NUMBA_FLASH_BACKEND", "mma")
    leaves2 = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    nf.flash_attn_func(*leaves2, causal=True).backward(dout)
    for name, a, b in zip(("dq", "dk", "dv"), leaves, leaves2):
        assert_bitwise_equal(a.grad, b.grad, name)
    ref = nf.attention_reference_backward(dout, q, k, v, causal=True)
    theirs = torch_lowp(q, k, v, dout, "float16", causal=True)[1:]
    for name, x, r, th in zip(("dq", "dk", "dv"), leaves, ref, theirs):
        assert_within_budget(name, x.grad, r, th)


def test_backend_argument_and_environment_are_validated_and_name_themselves(rng, monkeypatch):
    q32, k32, v32 = make_qkv_arrays(rng, 1, 8, 8, 1, 16, "float32", FW)
    with pytest.raises(ValueError, match="backend='mma'.*float32"):
        nf.flash_attn_forward(q32, k32, v32, backend="mma")
    with pytest.raises(ValueError, match="backend='tensor'"):
        nf.flash_attn_forward(q32, k32, v32, backend="tensor")
    monkeypatch.setenv("NUMBA_FLASH_BACKEND", "cuda")
    with pytest.raises(ValueError, match="NUMBA_FLASH_BACKEND='cuda'"):
        nf.flash_attn_forward(q32, k32, v32)
    monkeypatch.setenv("NUMBA_FLASH_BACKEND", "simt")
    q16, k16, v16 = make_qkv_arrays(rng, 1, 8, 8, 1, 16, "float16", FW)
    out, _ = nf.flash_attn_forward(q16, k16, v16)        # the SIMT path takes float16 too
    assert rel_err(out, nf.attention_reference(q16, k16, v16)[0]) < 1e-2


def test_auto_backend_puts_half_precision_on_tensor_cores_and_float32_on_simt():
    from numba_flash.kernels import configs
    assert configs.resolve_backend("auto", "float16", (8, 0)) == "mma"
    assert configs.resolve_backend("auto", "bfloat16", (9, 0)) == "mma"
    assert configs.resolve_backend("auto", "float16", (7, 5)) == "simt"
    assert configs.resolve_backend("auto", "float32", (9, 0)) == "simt"
    assert configs.resolve_backend("auto", "float64", None) == "simt"
    with pytest.raises(ValueError, match="compute capability"):
        configs.resolve_backend("mma", "float16", (7, 5))


# --------------------------------------------------------------------------------------------------
# GPU: real sizes
# --------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("N", [1000, 2048])
def test_gpu_mma_large_within_twice_torch_error(rng, N, d, dtype, causal):
    q, k, v = make_qkv_arrays(rng, 1, N, N, 2, d, dtype, "torch")
    dout = random_array(rng, (1, N, 2, d), dtype, "torch")
    check_all(q, k, v, dout, dtype, causal=causal)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_mma_atomic_dq_large_within_twice_torch_error(rng, d, dtype, causal):
    q, k, v = make_qkv_arrays(rng, 2, 1000, 1000, 2, d, dtype, "torch")
    dout = random_array(rng, (2, 1000, 2, d), dtype, "torch")
    check_all(q, k, v, dout, dtype, deterministic=False, causal=causal)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_mma_unequal_lengths_block_sparse_and_strides(rng):
    b1, _ = block_sizes(64, "float16")
    nq, nk = 3 * b1 + 5, 2 * b1 + 77
    mask = BlockMask.random(0.5, nq, nk, (b1, b1), nheads=3, seed=int(rng.integers(1 << 31)))
    q, k, v = make_qkv_arrays(rng, 2, nq, nk, 3, 64, "bfloat16", "torch", "kvpacked")
    dout = random_array(rng, (2, nq, 3, 64), "bfloat16", "torch")
    out, lse, grads = run_mma(q, k, v, dout, "bfloat16", block_mask=mask)
    dense = mask.to_dense()
    ref = (*nf.attention_reference(q, k, v, mask=dense)[:1], *nf.attention_reference_backward(dout, q, k, v,
                                                                                             mask=dense))
    theirs = torch_lowp(q, k, v, dout, "bfloat16", mask=dense)
    for name, ours, r, th in zip(("out", "dq", "dk", "dv"), (out, *grads), ref, theirs):
        assert_within_budget(name, ours, r, th)
