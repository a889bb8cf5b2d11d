"""Split TF32 (backend="tf32": float32 inputs on Hopper's tf32 wgmma, three products per product).

The intrinsics (ptx.tf32_round, hopper.wgmma_tf32 / wgmma_tf32_rs) against numpy, then the forward
against the float64 reference with the issue's bar: its error at most twice the SIMT float32 path's on
the same inputs (plus 1e-7). Under the simulator the forward has one warpgroup (64 queries) and 32-key
tiles; head dims 16, 40 (48 padded) and 64 take the 64-byte, 64-byte and 128-byte (two column blocks)
swizzles of the Q and K images, and the 32-key Vt images the 128-byte one; d = 80 splits P V into two
products. The simulator's wgmma rounds toward zero as the tensor cores do, so the error bar means there
what it means on a GPU (a scheme that accumulated every tile in the tensor cores failed it on an H100 and
fails it here). Outputs are NaN-poisoned.
"""

import numpy as np
import pytest
from numba import cuda

import numba_flash as nf
from numba_flash import BlockMask
from numba_flash.kernels import configs, hopper, ptx
from conftest import (SIMULATOR, as64, assert_bitwise_equal, assert_close, assert_lse_close, block_sizes, copy,
                      gpu_capability, make_qkv_arrays, poison, random_array, rel_err)
from test_hopper import WG, check_product, from_fragments, launch, swizzle_offsets, to_fragments

FW = "torch"

pytestmark = pytest.mark.skipif(not SIMULATOR and gpu_capability() != (9, 0),
                                reason=f"tf32 wgmma is an sm_90a instruction; this GPU is cc {gpu_capability()}")


# --------------------------------------------------------------------------------------------------
# ptx.tf32_round
# --------------------------------------------------------------------------------------------------

def tf32_reference(x):
    """Round to 11 significant bits, halves away from zero, from frexp (independent of the bit trick)."""
    x = np.asarray(x, np.float64)
    m, e = np.frexp(x)
    r = np.sign(m) * np.floor(np.abs(m) * 2.0 ** 11 + 0.5) / 2.0 ** 11
    return np.ldexp(r, e).astype(np.float32)


@cuda.jit
def _round_kernel(x, y):
    i = cuda.grid(1)
    if i < x.size:
        y[i] = ptx.tf32_round(x[i])


def test_tf32_round_is_nearest_ties_away_with_the_low_13_bits_zero(rng):
    x = (rng.standard_normal(256) * np.exp2(rng.integers(-60, 60, 256))).astype(np.float32)
    ties = np.float32(1.0) + np.float32(2.0 ** -11) * np.arange(1, 8, 2, dtype=np.float32)   # exactly halfway
    x = np.concatenate([x, ties, -ties, np.float32([3.3e38, 0.0, -0.0])])
    y = np.full_like(x, np.nan)
    dx, dy = cuda.to_device(x), cuda.to_device(y)
    _round_kernel[(x.size + 127) // 128, 128](dx, dy)
    y = dy.copy_to_host()
    np.testing.assert_array_equal(y, tf32_reference(x))
    assert not (y.view(np.uint32) & 0x1FFF).any()
    np.testing.assert_array_equal(y[256:260], np.float32(1.0) + np.float32(2.0 ** -10) * np.arange(1, 5))
    special = np.float32([np.inf, -np.inf, np.nan])
    dy = cuda.to_device(np.zeros(3, np.float32))
    _round_kernel[1, 32](cuda.to_device(special), dy)
    y = dy.copy_to_host()
    assert y[0] == np.inf and y[1] == -np.inf and np.isnan(y[2])


# --------------------------------------------------------------------------------------------------
# wgmma m64nNk8 tf32
# --------------------------------------------------------------------------------------------------

def tf32_values(rng, shape):
    """Random nonzero float32 values exact in tf32 (so the product is exact in float64)."""
    x = tf32_reference(rng.standard_normal(shape))
    x[x == 0] = 1.0
    return x


def tf32_image(X, swizzle):
    """The K-major shared image of X (R x K float32, K a multiple of 8) as uint32 words: 8-row x 16-byte
    core matrices (no swizzle: LBO 128 between the two of a k8 step, SBO the next 8 rows), or with a
    swizzle of s bytes atoms of 8 rows x s bytes (SBO 8 s), column blocks of s/4 words, 16-byte chunk c of
    row r at c ^ (r % 8) (128 B). Returns (words, LBO, SBO, mode, byte start of each k8 step)."""
    R, K = X.shape
    r = np.arange(R).reshape(-1, 1)
    k = np.arange(K).reshape(1, -1)
    steps = np.arange(K // 8)
    if swizzle == "none":
        lbo, sbo = 128, 128 * (K // 4)
        off = (r // 8) * sbo + (k // 4) * lbo + (r % 8) * 16 + (k % 4) * 4
        starts, mode = steps * 2 * lbo, hopper.SWIZZLE_NONE
    else:
        s = int(swizzle)
        lbo, sbo = 16, 8 * s
        lin = (4 * k // s) * R * s + (r // 8) * sbo + (r % 8) * s + (4 * k) % s
        off = swizzle_offsets(lin, s)
        starts = (32 * steps // s) * R * s + (32 * steps) % s
        mode = {128: hopper.SWIZZLE_128B, 64: hopper.SWIZZLE_64B, 32: hopper.SWIZZLE_32B}[s]
    assert np.unique(off).size == off.size and off.max() < R * K * 4
    img = np.zeros(R * K, np.float32)
    img[off // 4] = X
    return img.view(np.uint32), lbo, sbo, mode, starts.astype(np.int64)


def a_registers_tf32(A):
    """A (64 x 8) as the tf32 A fragment: register i of thread q = A[16w + g + 8 (i % 2)][t + 4 (i // 2)]."""
    regs = np.empty((WG, 4), np.float32)
    for q in range(WG):
        w, g, t = q // 32, (q % 32) // 4, q % 4
        for i in range(4):
            regs[q, i] = A[16 * w + g + 8 * (i % 2), t + 4 * (i // 2)]
    return regs


_KERNELS = {}


def tf32_kernel(n, k, a_words, b_words, a_regs):
    key = (n, k, a_words, b_words, a_regs)
    if key in _KERNELS:
        return _KERNELS[key]
    NACC, N, KSTEPS, REGS = n // 2, n, k // 8, a_regs
    SA, SB = a_words + 256, b_words + 256

    @cuda.jit
    def kernel(imgA, imgB, Afrag, P, startsA, startsB, Cfrag, Dfrag):
        sa = cuda.shared.array(SA, np.uint32)
        sb = cuda.shared.array(SB, np.uint32)
        t = cuda.threadIdx.x
        pa = ((1024 - hopper.shared_address(sa) % 1024) % 1024) // 4
        pb = ((1024 - hopper.shared_address(sb) % 1024) % 1024) // 4
        for i in range(t, imgA.size, cuda.blockDim.x):
            sa[pa + i] = imgA[i]
        for i in range(t, imgB.size, cuda.blockDim.x):
            sb[pb + i] = imgB[i]
        hopper.fence_proxy_async_shared()
        cuda.syncthreads()
        acc = hopper.wgmma_acc_load(Cfrag, t * NACC, N)
        acc = hopper.wgmma_fence_operand(acc)
        hopper.wgmma_fence()
        for j in range(KSTEPS):
            db = hopper.make_smem_desc(sb, pb * 4 + startsB[j], P[3], P[4], P[5])
            if REGS:
                r = (t * KSTEPS + j) * 4
                acc = hopper.wgmma_tf32_rs(Afrag[r], Afrag[r + 1], Afrag[r + 2], Afrag[r + 3], db, acc, 1)
            else:
                da = hopper.make_smem_desc(sa, pa * 4 + startsA[j], P[0], P[1], P[2])
                acc = hopper.wgmma_tf32(da, db, acc, 1)
        hopper.wgmma_commit_group()
        hopper.wgmma_wait_group(0)
        acc = hopper.wgmma_fence_operand(acc)
        hopper.wgmma_acc_store(Dfrag, t * NACC, acc)

    _KERNELS[key] = kernel
    return kernel


@pytest.mark.parametrize("n,k,swz_a,swz_b,a_regs", [
    (64, 32, "128", "128", False), (64, 16, "64", "none", False), (128, 8, "32", "32", False),
    (64, 32, "128", "128", True), (128, 16, "none", "64", True)])
def test_wgmma_tf32_products_exact_in_every_k_major_layout(rng, n, k, swz_a, swz_b, a_regs):
    """D = C + A Bt^T over k/8 chained m64nNk8 tf32 wgmmas, A from shared memory or from registers."""
    A, Bt = tf32_values(rng, (64, k)), tf32_values(rng, (n, k))
    C = rng.standard_normal((64, n)).astype(np.float32)
    img_a, lbo_a, sbo_a, sw_a, starts_a = tf32_image(A, swz_a)
    img_b, lbo_b, sbo_b, sw_b, starts_b = tf32_image(Bt, swz_b)
    afrag = np.zeros(4, np.float32)
    if a_regs:
        afrag = np.stack([a_registers_tf32(A[:, 8 * j:8 * j + 8]) for j in range(k // 8)], 1).reshape(-1)
    dfrag = np.full(WG * n // 2, np.nan, np.float32)
    P = np.array([lbo_a, sbo_a, sw_a, lbo_b, sbo_b, sw_b], np.int64)
    kern = tf32_kernel(n, k, img_a.size, img_b.size, a_regs)
    *_, dfrag = launch(kern, 1, WG, img_a, img_b, afrag, P, starts_a, starts_b, to_fragments(C, n), dfrag)
    check_product(from_fragments(dfrag, n), A.astype(np.float64), Bt.astype(np.float64), C.astype(np.float64))


# --------------------------------------------------------------------------------------------------
# the forward
# --------------------------------------------------------------------------------------------------

def run(q, k, v, backend, **kw):
    B, Nq, H, d = q.shape
    out, lse = poison((B, Nq, H, d), "float32", FW), poison((B, H, Nq), "float32", FW)
    nf.flash_attn_forward(q, k, v, out=out, lse=lse, backend=backend, **kw)
    return out, lse


def check_against_simt(q, k, v, block_mask=None, tf32=None, **kw):
    """out within twice the SIMT float32 path's error (against float64) + 1e-7; lse as tight as float32's.
    tf32: the tf32 forward's (out, lse) where the caller ran it (under tile overrides the SIMT run must not
    see), else run here."""
    dense = None if block_mask is None else block_mask.to_dense()
    ref_out, ref_lse = nf.attention_reference(q, k, v, mask=dense, **kw)
    out, lse = run(q, k, v, "tf32", block_mask=block_mask, **kw) if tf32 is None else tf32
    simt, _ = run(q, k, v, "simt", block_mask=block_mask, **kw)
    err, err_simt = rel_err(out, ref_out), rel_err(simt, ref_out)
    print(f"relative error tf32 {err:.3g}, simt {err_simt:.3g}")
    assert err <= 2 * err_simt + 1e-7, f"tf32 error {err:.3g} > 2 x SIMT's {err_simt:.3g} + 1e-7"
    assert_lse_close(lse, ref_lse, "float32")
    return out, lse


CASES = [(False, 96, 80, 2, 32), (True, 70, 100, 1, 64), (True, 100, 40, 1, 16), (False, 65, 33, 2, 40),
         (True, 40, 50, 1, 80)]             # d = 80: P V as two products of 40 output columns
if not SIMULATOR:
    CASES += [(False, 1000, 777, 4, 64), (True, 1024, 1024, 4, 128), (True, 513, 1100, 2, 96),
              (False, 300, 300, 3, 128)]


@pytest.mark.parametrize("causal,Nq,Nk,H,d", CASES)
def test_tf32_forward_within_twice_simt_error_ragged_unequal_seqlens_and_swizzles(rng, causal, Nq, Nk, H, d):
    q, k, v = make_qkv_arrays(rng, 1, Nq, Nk, H, d, "float32", FW)
    out, lse = check_against_simt(q, k, v, causal=causal)
    if causal and Nq > Nk:                 # bottom-right: rows r < Nq - Nk see no key
        assert (as64(out)[:, :Nq - Nk] == 0).all() and np.isneginf(as64(lse)[:, :, :Nq - Nk]).all()


def test_tf32_forward_large_values_and_negative_scale(rng):
    """Scores in the hundreds (the split keeps float32's relative accuracy at any magnitude) and a
    negative softmax_scale (the scores scaled before the row max)."""
    q, k, v = make_qkv_arrays(rng, 1, 70, 70, 1, 32, "float32", FW)
    check_against_simt(q * 30, k, v * 1e3, softmax_scale=0.05)
    check_against_simt(q, k, v, softmax_scale=-0.3, causal=True)


@pytest.mark.parametrize("layout", ["qkvpacked", "unaligned"])
def test_tf32_strided_and_unaligned_views_match_contiguous_copies_bitwise(rng, layout):
    """A packed view gives its contiguous copy's outputs bitwise; rows 1 element into their buffer are not
    16-byte aligned and take ordinary loads into the same images."""
    if layout == "unaligned":
        bufs = [random_array(rng, (1, 70, 2, 32 + 4), "float32", FW) for _ in range(3)]
        q, k, v = (b[..., 1:33] for b in bufs)
    else:
        q, k, v = make_qkv_arrays(rng, 1, 70, 70, 2, 32, "float32", FW, layout)
    a = run(q, k, v, "tf32", causal=True)
    b = run(copy(q), copy(k), copy(v), "tf32", causal=True)
    for x, y, name in zip(a, b, ("out", "lse")):
        assert_bitwise_equal(x, y, name)
    ref, _ = nf.attention_reference(q, k, v, causal=True)
    assert rel_err(a[0], ref) < 1e-6


def test_tf32_block_sparse_nan_row_and_infinite_inputs(rng):
    b1, b2 = block_sizes(32, "float32", "tf32")
    nq, nk = 2 * b1 + 3, 2 * b2
    mask = BlockMask.random(0.5, nq, nk, (b1, b2), nheads=1, seed=int(rng.integers(1 << 31)))
    q, k, v = make_qkv_arrays(rng, 1, nq, nk, 1, 32, "float32", FW)
    check_against_simt(q, k, v, block_mask=mask)
    q[0, 7, 0, 3] = float("nan")
    v[0, 5, 0, 2] = float("inf")
    out, lse = run(q, k, v, "tf32")
    simt, _ = run(q, k, v, "simt")
    o, s = as64(out), as64(simt)
    assert np.isnan(o[0, 7]).all() and np.isnan(as64(lse)[0, 0, 7])
    # column 2 of every row is not finite (SIMT: inf; here inf or NaN, tf32_tiles' docstring), the rest is
    np.testing.assert_array_equal(np.isfinite(o), np.isfinite(s))
    assert not np.isfinite(o[0, :, 0, 2]).any()


def test_tf32_forward_trains_through_autograd_with_the_simt_backward(rng):
    torch = pytest.importorskip("torch")
    q, k, v = make_qkv_arrays(rng, 1, 50, 60, 2, 32, "float32", FW)
    dout = random_array(rng, (1, 50, 2, 32), "float32", FW)
    qs, ks, vs = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = nf.flash_attn_func(qs, ks, vs, causal=True, backend="tf32")
    out.backward(dout)
    ref_grads = nf.attention_reference_backward(dout, q, k, v, causal=True)
    for name, x, r in zip(("dq", "dk", "dv"), (qs.grad, ks.grad, vs.grad), ref_grads):
        assert_close(x, r, "float32", name, tol=2e-5)


def test_tf32_backend_is_validated(rng):
    q16, k16, v16 = make_qkv_arrays(rng, 1, 8, 8, 1, 32, "float16", FW)
    with pytest.raises(ValueError, match="float32 inputs; the inputs are float16"):
        nf.flash_attn_forward(q16, k16, v16, backend="tf32")
    q, k, v = make_qkv_arrays(rng, 1, 8, 8, 1, 160, "float32", FW)
    with pytest.raises(ValueError, match="head dims up to 128; headdim is 160"):
        nf.flash_attn_forward(q, k, v, backend="tf32")
    with pytest.raises(ValueError, match="compute capability 9.0"):
        configs.resolve_backend("tf32", "float32", (8, 0), 64)
    assert configs.resolve_backend("auto", "float32", (9, 0), 64) == "simt"       # opt-in only
    assert configs.backward_path("tf32", 64) == "simt"
    assert configs.resolve_backend("tf32", "float32", None, 64, "bwd") == "tf32"


def assert_same_up_to_fma(got, want, ref):
    """got equals want bitwise under the simulator; on a GPU within 4 float32 ulps of the output's scale
    (the compiler fuses multiplies and adds into FMAs differently in differently shaped kernels), with lse
    to float32 rounding and the same error against the float64 reference."""
    if SIMULATOR:
        for name, x, y in zip(("out", "lse"), got, want):
            assert_bitwise_equal(x, y, name)
        return
    scale = float(np.abs(as64(ref)).max())
    assert float(np.abs(as64(got[0]) - as64(want[0])).max()) <= 4 * 2.0 ** -23 * scale
    finite = np.isfinite(as64(want[1]))
    np.testing.assert_array_equal(finite, np.isfinite(as64(got[1])))
    assert float(np.abs(as64(got[1])[finite] - as64(want[1])[finite]).max(initial=0)) <= 1e-6
    assert rel_err(got[0], ref) <= 1.1 * rel_err(want[0], ref) + 1e-8


def use_tiles(monkeypatch, d, **kw):
    """The tf32 forward's tiles with the MmaTiles fields kw replaced (simulator: its 64 x 32 tiles; GPU: the
    default tiles of head dim d), through NUMBA_FLASH_FWD_TILES on a GPU as a tuning run would."""
    import dataclasses
    if SIMULATOR:
        monkeypatch.setitem(configs._SIM["tf32"], "fwd",
                            dataclasses.replace(configs.MmaTiles(64, 32, 4, a_regs=False), **kw))
    else:
        t = dataclasses.replace(configs._tf32_tiles("fwd", d), **kw)
        monkeypatch.setenv("NUMBA_FLASH_FWD_TILES", t.override())


def test_tile_override_with_more_values_than_fields_is_refused():
    """A tuning override with a value past MmaTiles' last field names the fields instead of dropping it
    (a 14-value string once ran the wrong tiles in a tuning run without a word)."""
    n = len(configs.MmaTiles(64, 32, 4).override().split(","))
    assert configs._parse_override("tf32", ",".join(["64", "32", "4"] + ["0"] * (n - 3))).br == 64
    with pytest.raises(ValueError, match="presplit"):
        configs._parse_override("tf32", ",".join(["64", "32", "4"] + ["0"] * (n - 2)))


def use_split_ahead(monkeypatch, on, d):
    """The synchronous body's tiles with MmaTiles.split_ahead = on."""
    use_tiles(monkeypatch, d, ring=0, pingpong=False, split_ahead=on, presplit=False)


def check_same_as(monkeypatch, d, q, k, v, tiles, same_as, causal):
    """The tf32 forward under use_tiles(**tiles) within the bar against SIMT, and equal to the one under
    use_tiles(**same_as) up to FMA contraction (assert_same_up_to_fma)."""
    use_tiles(monkeypatch, d, **tiles)
    got = run(q, k, v, "tf32", causal=causal)
    use_tiles(monkeypatch, d, **same_as)
    want = run(q, k, v, "tf32", causal=causal)
    monkeypatch.delenv("NUMBA_FLASH_FWD_TILES", raising=False)       # (SIMT reads it too)
    check_against_simt(q, k, v, causal=causal, tf32=got)
    ref, _ = nf.attention_reference(q, k, v, causal=causal)
    assert_same_up_to_fma(got, want, ref)


@pytest.mark.parametrize("causal,Nq,Nk,d", [(True, 70, 100, 32), (False, 65, 33, 64), (True, 100, 40, 16),
                                            (False, 40, 20, 40)])
def test_tf32_split_ahead_matches_the_default(rng, monkeypatch, causal, Nq, Nk, d):
    """Splitting tile j + 1 during tile j's P V product changes the schedule, not the products: under the
    simulator the same bits, including one-tile walks (Nk = 20) and query tiles that see no key (causal,
    Nq > Nk). On a GPU the compiler fuses a multiply and an add into one FMA only inside a basic block,
    and the split's loops move block boundaries (H100, 2026-12-07: each variant bitwise reproducible run
    to run, the two 1e-7 apart with the same error against float64): there assert_same_up_to_fma's
    bounds."""
    q, k, v = make_qkv_arrays(rng, 1, Nq, Nk, 2, d, "float32", FW)
    use_split_ahead(monkeypatch, False, d)
    want = run(q, k, v, "tf32", causal=causal)
    use_split_ahead(monkeypatch, True, d)
    got = run(q, k, v, "tf32", causal=causal)
    ref, _ = nf.attention_reference(q, k, v, causal=causal)
    assert_same_up_to_fma(got, want, ref)
    assert rel_err(got[0], ref) < 1e-6


# --------------------------------------------------------------------------------------------------
# the warp-specialised forward (MmaTiles.ring: a producer warpgroup copies and splits, consumers multiply)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal,Nq,Nk,d,ring", [(True, 70, 100, 32, 2), (False, 33, 100, 16, 4),
                                                 (True, 100, 40, 64, 2), (False, 40, 20, 40, 2)])
def test_tf32_warp_specialised_within_the_bar_and_equal_to_the_synchronous_body(rng, monkeypatch, causal, Nq, Nk,
                                                                                d, ring):
    """The producer warpgroup copies each K, V tile into a staging buffer and splits the previous one into
    a ring stage (WsOps.lag); the consumers' products are the synchronous body's, in the same order, so the
    same results: walks of several tiles and of one (Nk = 20), query rows that see no key (causal,
    Nq > Nk), padded head dims (40 -> 48, rows of V padded), rings of 2 and 4 stages."""
    q, k, v = make_qkv_arrays(rng, 1, Nq, Nk, 1, d, "float32", FW)
    check_same_as(monkeypatch, d, q, k, v, dict(bc=32, ring=ring, presplit=False),
                  dict(bc=32, ring=0, pingpong=False, presplit=False), causal)


def check_block_mask_unaligned(rng, monkeypatch, **tiles):
    """(q, k, v, mask): d = 32 inputs whose rows are not 16-byte aligned (views one element into padded
    rows) and a random block mask at half density; the tf32 forward under use_tiles(**tiles), causal,
    within the bar against SIMT."""
    use_tiles(monkeypatch, 32, **tiles)
    bufs = [random_array(rng, (1, 150, 1, 32 + 4), "float32", FW) for _ in range(3)]
    q, k, v = (b[..., 1:33] for b in bufs)
    b1, b2 = block_sizes(32, "float32", "tf32")
    mask = BlockMask.random(0.5, 150, 150, (b1, b1), nheads=1, seed=int(rng.integers(1 << 31)))
    got = run(q, k, v, "tf32", block_mask=mask, causal=True)
    monkeypatch.delenv("NUMBA_FLASH_FWD_TILES", raising=False)       # (SIMT reads it too)
    check_against_simt(q, k, v, block_mask=mask, causal=True, tf32=got)
    return q, k, v, mask


def test_tf32_warp_specialised_ping_pong_block_mask_and_unaligned_rows(rng, monkeypatch):
    """Two consumer warpgroups taking turns on the tensor cores (MmaTiles.pingpong), on a block mask, with
    rows that are not 16-byte aligned (the producer's copies by ordinary loads)."""
    check_block_mask_unaligned(rng, monkeypatch, br=128, bc=32, warps=8, ring=2, pingpong=True, presplit=False)


def test_tf32_synchronous_body_on_64_key_tiles(rng, monkeypatch):
    """64-key tiles (a tuning option at d <= 64; H100, 2026-12-07: 61.7 TFLOP/s against the default's
    54.0): two groups of 32 k-indices per V transpose and two column blocks of the Vt images."""
    use_tiles(monkeypatch, 64, bc=64, ring=0, pingpong=False, presplit=False)
    q, k, v = make_qkv_arrays(rng, 1, 50, 100, 1, 64, "float32", FW)
    got = run(q, k, v, "tf32", causal=True)
    monkeypatch.delenv("NUMBA_FLASH_FWD_TILES", raising=False)       # (SIMT reads it too)
    check_against_simt(q, k, v, causal=True, tf32=got)


# --------------------------------------------------------------------------------------------------
# pre-split K and V (MmaTiles.presplit: split once into global images, which the forward copies)
# --------------------------------------------------------------------------------------------------

def test_tf32_presplit_images_hold_the_split_transposed_permuted_and_zero_padded(rng, monkeypatch):
    """The splitting kernel's images (tf32_tiles.presplit_layout) from strided inputs whose key count is
    not a multiple of a tile and whose head dim is padded (40 -> 48): K_hi, K_lo rows; Vt_hi, Vt_lo rows
    with each group of 8 keys permuted; zeros past the keys and past the head dim. Scratch poisoned."""
    from numba_flash import interop
    from numba_flash.kernels import tf32_tiles
    B, NK, H, d, BN = 2, 45, 3, 40, 32
    DP = 48
    bufs = [random_array(rng, (B, NK, H + 1, d + 3), "float32", FW) for _ in range(2)]
    k, v = (b[:, :, 1:, 2:2 + d] for b in bufs)
    kv, vv = (interop.flat_view(x, n) for x, n in ((k, "k"), (v, "v")))
    tiles = configs.MmaTiles(64, BN, 4, a_regs=False, presplit=True)
    real_empty = interop.empty_like_framework
    allocated = []

    def poisoned(*a):
        x = real_empty(*a)
        x[...] = float("nan")
        allocated.append(x)
        return x

    monkeypatch.setattr(interop, "empty_like_framework", poisoned)
    launch_, k_img, v_img = tf32_tiles.presplit_launch(tiles, d, 0, kv, vv)
    monkeypatch.undo()
    kern, grid, stream, args = launch_
    kern(grid, stream, *args)
    if not SIMULATOR:
        cuda.synchronize()
    ki, vi = (x.cpu().numpy() for x in allocated)
    NKP = tf32_tiles.presplit_keys(NK, BN)
    assert NKP == 64
    ki = ki[:B * H * 2 * NK * DP].reshape(B, H, 2, NK, DP)
    vi = vi[:B * H * 2 * DP * NKP].reshape(B, H, 2, DP, NKP)
    kx = np.zeros((B, H, NK, DP), np.float32)
    kx[..., :d] = np.asarray(k.cpu() if hasattr(k, "cpu") else k).transpose(0, 2, 1, 3)
    vx = np.zeros((B, H, NKP, DP), np.float32)
    vx[:, :, :NK, :d] = np.asarray(v.cpu() if hasattr(v, "cpu") else v).transpose(0, 2, 1, 3)
    perm = [8 * (i // 8) + 2 * (i % 4) + (i % 8) // 4 for i in range(NKP)]
    vt = vx[:, :, perm, :].transpose(0, 1, 3, 2)
    for x, img in ((kx, ki), (vt, vi)):
        hi = tf32_reference(x)
        lo = tf32_reference((x.astype(np.float64) - hi).astype(np.float32))
        np.testing.assert_array_equal(img[:, :, 0], hi)
        np.testing.assert_array_equal(img[:, :, 1], lo)
    layout = tf32_tiles.presplit_layout(B, H, NK, DP, BN)
    assert (k_img.strides[:3], v_img.strides[:3]) == (layout[0][1], layout[1][1])


@pytest.mark.parametrize("causal,Nq,Nk,d", [(True, 70, 100, 32), (False, 65, 33, 64), (True, 100, 40, 16),
                                            (False, 40, 20, 40)])
def test_tf32_presplit_matches_the_synchronous_body(rng, monkeypatch, causal, Nq, Nk, d):
    """Copying pre-split images instead of splitting each key tile in the block gives the same images, so
    the same products: walks of several tiles and of one (Nk = 20), query rows that see no key (causal,
    Nq > Nk), padded head dims (40 -> 48), a ragged last key tile (Nk = 33, 100)."""
    q, k, v = make_qkv_arrays(rng, 2, Nq, Nk, 2, d, "float32", FW)
    sync = dict(ring=0, pingpong=False, split_ahead=False)
    check_same_as(monkeypatch, d, q, k, v, dict(sync, presplit=True), dict(sync, presplit=False), causal)


def test_tf32_presplit_block_mask_unaligned_rows_and_nonfinite_inputs(rng, monkeypatch):
    """Pre-split on a block mask with rows that are not 16-byte aligned (Q by plain loads; the images are
    always aligned), and non-finite inputs: an infinite K element and a NaN V element reach the outputs
    as they do on the synchronous body that splits in the block."""
    q, k, v, mask = check_block_mask_unaligned(rng, monkeypatch, ring=0, pingpong=False, split_ahead=False,
                                               presplit=True)
    k[0, 7, 0, 3] = float("inf")
    v[0, 90, 0, 5] = float("nan")
    use_tiles(monkeypatch, 32, ring=0, pingpong=False, split_ahead=False, presplit=True)
    got = run(q, k, v, "tf32", block_mask=mask, causal=True)
    use_tiles(monkeypatch, 32, ring=0, pingpong=False, split_ahead=False, presplit=False)
    want = run(q, k, v, "tf32", block_mask=mask, causal=True)
    for x, y in zip(got, want):
        np.testing.assert_array_equal(np.isnan(as64(x)), np.isnan(as64(y)))
        np.testing.assert_array_equal(np.isinf(as64(x)), np.isinf(as64(y)))
    assert np.isnan(as64(got[0])).any()


@pytest.mark.parametrize("causal,Nq,Nk,d,ring", [(True, 70, 100, 32, 2), (False, 40, 20, 40, 3),
                                                 (True, 100, 40, 64, 2)])
def test_tf32_warp_specialised_on_presplit_images(rng, monkeypatch, causal, Nq, Nk, d, ring):
    """The producer warpgroup copying pre-split images straight into the ring (the 16-bit producer's
    protocol; any ring of >= 2 stages, 3 here) gives the synchronous body's results: walks of several
    tiles and of one (Nk = 20), rows that see no key, a padded head dim."""
    q, k, v = make_qkv_arrays(rng, 1, Nq, Nk, 2, d, "float32", FW)
    check_same_as(monkeypatch, d, q, k, v, dict(bc=32, ring=ring, presplit=True),
                  dict(bc=32, ring=0, pingpong=False, presplit=False), causal)
