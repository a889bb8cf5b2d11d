"""The PTX intrinsics of numba_flash.kernels.ptx, each in a small kernel, against independent numpy.

Runs unchanged on a GPU (the inline-PTX intrinsics) and under the simulator (their Python twins): arrays go
through cuda.to_device / copy_to_host, which both provide. Every output is poisoned (NaN, or all-ones
bits) before the launch so that an element the kernel does not write fails. Inputs are fresh random
numbers; the seed is printed (shown with a failure) and NUMBA_FLASH_TEST_SEED=<seed> replays it.

Self-sufficient: needs no fixture from conftest.py, and picks the simulator itself when run without it.
"""
import os
import subprocess
import sys
import textwrap

from numba_flash import runtime

runtime.select()   # before numba.cuda is imported: the simulator unless a GPU answers

import numba  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from numba import cuda, float32  # noqa: E402

from numba_flash.kernels import ptx  # noqa: E402
from numba_flash.kernels.launch import SIMULATOR  # noqa: E402

U32_POISON = np.uint32(0xFFFFFFFF)
U16_POISON = np.uint16(0xFFFF)


def launch(kernel, threads, *args, blocks=1, smem=0):
    """Run `kernel` on device copies of `args`; return the host copies of all of them."""
    dev = [cuda.to_device(np.ascontiguousarray(a)) for a in args]
    kernel[blocks, threads, 0, smem](*dev)
    return [d.copy_to_host() for d in dev]


def nonzero_normal(rng, shape, dtype):
    a = rng.standard_normal(shape)
    a[a == 0] = 1.0
    return a.astype(dtype)


def bits16(rng, shape):
    """Random 16-bit patterns, none 0 and none 0xFFFF (a poisoned half)."""
    return rng.integers(1, 0xFFFF, size=shape, dtype=np.uint16)


# ------------------------------------------------------------------------------------------------------
# lane_id, shfl_xor
# ------------------------------------------------------------------------------------------------------

@cuda.jit
def _lane_kernel(out):
    tid = cuda.threadIdx.x
    out[tid] = ptx.lane_id()


def test_lane_id():
    out, = launch(_lane_kernel, 48, np.full(48, -1, np.int32))
    np.testing.assert_array_equal(out, np.arange(48) % 32)


@cuda.jit
def _shfl_kernel(x, masks, out):
    tid = cuda.threadIdx.x + cuda.blockIdx.x * cuda.blockDim.x
    for j in range(masks.size):
        out[tid * masks.size + j] = ptx.shfl_xor(x[tid], masks[j])


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32"])
@pytest.mark.parametrize("threads,blocks", [(32, 1), (64, 1), (16, 1), (64, 2)],
                         ids=["1warp", "2warps", "16threads", "2blocks"])
def test_shfl_xor(rng, dtype, threads, blocks):
    n = threads * blocks
    if dtype == "int32":
        x = rng.integers(1, 2**31 - 1, size=n, dtype=np.int32) * rng.choice(np.array([-1, 1], np.int32), n)
        poison = np.iinfo(np.int32).min
    else:
        x = nonzero_normal(rng, n, dtype)
        poison = np.nan
    masks = np.array([m for m in (1, 2, 4, 8, 16, 31, 5) if m < threads], np.int64)
    out = np.full(n * masks.size, poison, dtype)
    _, _, out = launch(_shfl_kernel, threads, x, masks, out, blocks=blocks)
    tid = np.arange(n)
    # the partner stays in the same warp (and block): tid ^ mask only flips bits below the warp size
    ref = x[(tid[:, None] ^ masks[None, :])]
    np.testing.assert_array_equal(out.reshape(n, masks.size), ref)


# ------------------------------------------------------------------------------------------------------
# mma
# ------------------------------------------------------------------------------------------------------

def _make_mma_kernel(mma):
    @cuda.jit
    def kernel(A32, B32, C, D):
        # A32: (warps, 16, 8) u32 = A (16 x 16) as pairs; B32: (warps, 8, 8) u32 = B^T ([n][k]) as pairs
        w = cuda.threadIdx.x // 32
        lane = cuda.threadIdx.x % 32
        g = lane >> 2
        t = lane & 3
        d0, d1, d2, d3 = mma(A32[w, g, t], A32[w, g + 8, t], A32[w, g, t + 4], A32[w, g + 8, t + 4],
                             B32[w, g, t], B32[w, g, t + 4],
                             C[w, g, 2 * t], C[w, g, 2 * t + 1], C[w, g + 8, 2 * t], C[w, g + 8, 2 * t + 1])
        D[w, g, 2 * t] = d0
        D[w, g, 2 * t + 1] = d1
        D[w, g + 8, 2 * t] = d2
        D[w, g + 8, 2 * t + 1] = d3
    return kernel


_mma_f16_kernel = _make_mma_kernel(ptx.mma_f16)
_mma_bf16_kernel = _make_mma_kernel(ptx.mma_bf16)


def bf16_bits_of(x32):
    """bfloat16 values (as uint16 bits) obtained by truncating float32 ones: exact by construction."""
    b = (x32.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    b[(b & 0x7FFF) == 0] = 0x3F80      # no zeros: 1.0
    return b


def bf16_to_f64(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def check_mma(D, A, B, C):
    """D = A @ B + C to ~1e-6 of the magnitude of the terms (exact products, float32 sums)."""
    assert not np.isnan(D).any(), "unwritten outputs"
    ref = A @ B + C
    scale = np.abs(A) @ np.abs(B) + np.abs(C)
    err = np.abs(D - ref) / scale
    assert err.max() < 1e-6, f"mma error {err.max():.3g} of the terms' magnitude"


@pytest.mark.parametrize("warps", [1, 2])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_mma(rng, dtype, warps):
    if dtype == "float16":
        A16 = nonzero_normal(rng, (warps, 16, 16), np.float16)
        Bt16 = nonzero_normal(rng, (warps, 8, 16), np.float16)     # [n][k]
        A, Bt = A16.astype(np.float64), Bt16.astype(np.float64)
        a_bits, b_bits = A16.view(np.uint16), Bt16.view(np.uint16)
        kernel = _mma_f16_kernel
    else:
        a_bits = bf16_bits_of(rng.standard_normal((warps, 16, 16)))
        b_bits = bf16_bits_of(rng.standard_normal((warps, 8, 16)))
        A, Bt = bf16_to_f64(a_bits), bf16_to_f64(b_bits)
        kernel = _mma_bf16_kernel
    C = nonzero_normal(rng, (warps, 16, 8), np.float32)
    D = np.full((warps, 16, 8), np.nan, np.float32)
    *_, D = launch(kernel, 32 * warps, a_bits.view(np.uint32), b_bits.view(np.uint32), C, D)
    for w in range(warps):   # each warp its own product: warps do not mix
        check_mma(D[w], A[w], Bt[w].T, C[w].astype(np.float64))


# ------------------------------------------------------------------------------------------------------
# ldmatrix
# ------------------------------------------------------------------------------------------------------

STRIDE = 72                 # halves per shared row: 64 + 8 of padding, so rows are 144 bytes apart
ROWS = 32
SMEM_HALVES = ROWS * STRIDE


def _make_ldmatrix_kernel(fn, n, dtype):
    halves = np.dtype(dtype).itemsize // 2 or 1     # halves per element of the shared array
    size = SMEM_HALVES // halves
    nptype = numba.from_dtype(np.dtype(dtype))    # the simulator's dynamic shared arrays need a Numba type

    @cuda.jit
    def k(G, addr, out):
        # addr: per lane, the index (in halves) where its row starts; the shared array may hold wider elements
        sm = cuda.shared.array(0, nptype)
        lane = cuda.threadIdx.x
        for e in range(lane, size, 32):
            sm[e] = G[e]
        cuda.syncthreads()
        # the row address split into a lane part and a constant part, as the kernels pass it
        r = fn(sm, addr[lane] // halves - 8 // halves, 8 // halves)
        for i in range(n):
            out[lane * n + i] = r[i]

    @cuda.jit
    def k1(G, addr, out):
        sm = cuda.shared.array(0, nptype)
        lane = cuda.threadIdx.x
        for e in range(lane, size, 32):
            sm[e] = G[e]
        cuda.syncthreads()
        out[lane] = fn(sm, 0, addr[lane] // halves)

    return (k1 if n == 1 else k), size


_LDMATRIX = {}


def ldmatrix_kernel(n, trans, dtype):
    key = (n, trans, dtype)
    if key not in _LDMATRIX:
        fn = getattr(ptx, f"ldmatrix_x{n}" + ("_trans" if trans else ""))
        _LDMATRIX[key] = _make_ldmatrix_kernel(fn, n, dtype)
    return _LDMATRIX[key]


def shared_contents(rng, dtype):
    """ROWS x STRIDE halves as `dtype` storage (+ the same as uint16 bits)."""
    if dtype == "float16":
        g = nonzero_normal(rng, SMEM_HALVES, np.float16)
    else:
        g = bits16(rng, SMEM_HALVES)
        if dtype == "uint32":
            g = g.view(np.uint32)
    return g, g.view(np.uint16).reshape(ROWS, STRIDE)


@pytest.mark.parametrize("trans", [False, True], ids=["plain", "trans"])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_ldmatrix(rng, n, trans, dtype="uint16"):
    run_ldmatrix(rng, n, trans, dtype)


@pytest.mark.parametrize("dtype", ["float16", "uint32"])
def test_ldmatrix_dtypes(rng, dtype):
    run_ldmatrix(rng, 4, False, dtype)
    run_ldmatrix(rng, 2, True, dtype)


def run_ldmatrix(rng, n, trans, dtype):
    kernel, size = ldmatrix_kernel(n, trans, dtype)
    G, S = shared_contents(rng, dtype)
    # every lane its own row (a permutation of the 32 shared rows) and its own 16-byte column block
    rows = rng.permutation(ROWS)
    cols = 8 * rng.integers(0, STRIDE // 8, size=32)
    addr = (rows * STRIDE + cols).astype(np.int64)
    out = np.full(32 * n, U32_POISON, np.uint32)
    *_, out = launch(kernel, 32, G, addr, out, smem=SMEM_HALVES * 2)
    out = out.reshape(32, n)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for i in range(n):
            # matrix i, row r: the 8 halves at lane 8i + r's address
            def m(r, c):
                return int(S[rows[8 * i + r], cols[8 * i + r] + c])
            if trans:
                want = m(2 * t, g) | m(2 * t + 1, g) << 16
            else:
                want = m(g, 2 * t) | m(g, 2 * t + 1) << 16
            assert out[lane, i] == want, f"lane {lane} register {i}: {out[lane, i]:#x} != {want:#x}"


TILE = 16 * 24              # A (16 x 16) and B ([k][n], 16 x 8) at a padded stride of 24 halves
TWO_TILES = 2 * TILE        # shared-array shapes must be plain names (an expression is not a constant)


@cuda.jit
def _ldmatrix_mma_kernel(Ag, Bg, D):
    # A tile rows 0-15, B tile ([k][n]) rows 16-31 of a shared array of stride 24 halves
    sm = cuda.shared.array(TWO_TILES, np.float16)
    lane = cuda.threadIdx.x
    for e in range(lane, 256, 32):
        sm[(e // 16) * 24 + e % 16] = Ag[e]
    for e in range(lane, 128, 32):
        sm[TILE + (e // 8) * 24 + e % 8] = Bg[e]
    cuda.syncthreads()
    a0, a1, a2, a3 = ptx.ldmatrix_x4(sm, (lane % 16) * 24 + 8 * (lane // 16), 0)
    b0, b1 = ptx.ldmatrix_x2_trans(sm, TILE + (lane % 16) * 24, 0)
    z = np.float32(0)
    d0, d1, d2, d3 = ptx.mma_f16(a0, a1, a2, a3, b0, b1, z, z, z, z)
    g = lane >> 2
    t = lane & 3
    D[g, 2 * t] = d0
    D[g, 2 * t + 1] = d1
    D[g + 8, 2 * t] = d2
    D[g + 8, 2 * t + 1] = d3


def test_ldmatrix_feeds_mma(rng):
    """The address rules in ptx.py's comment: x4 gives the A fragment, x2_trans of a [k][n] B tile the B
    one."""
    A = nonzero_normal(rng, (16, 16), np.float16)
    B = nonzero_normal(rng, (16, 8), np.float16)
    D = np.full((16, 8), np.nan, np.float32)
    *_, D = launch(_ldmatrix_mma_kernel, 32, A.ravel(), B.ravel(), D)
    check_mma(D, A.astype(np.float64), B.astype(np.float64), np.zeros((16, 8)))


# ------------------------------------------------------------------------------------------------------
# cp.async
# ------------------------------------------------------------------------------------------------------

CHUNKS = 64                 # 16-byte chunks of shared memory: 2 per lane
CHUNK_WORDS = 4 * CHUNKS
WAIT_ONE = 1


@cuda.jit
def _cp_async16_kernel(G, src, dst, valid, out):
    # G: uint16 (8 per chunk); shared: uint32 (4 per chunk); lane l copies chunks 2l and 2l + 1 in two groups
    sm = cuda.shared.array(CHUNK_WORDS, np.uint32)
    lane = cuda.threadIdx.x
    for e in range(lane, CHUNK_WORDS, 32):
        sm[e] = 0xFFFFFFFF
    cuda.syncthreads()
    for j in range(2):
        c = 2 * lane + j
        ptx.cp_async16(sm, dst[c] * 4, G, src[c] * 8, valid[c] != 0)
        ptx.cp_async_commit()
    ptx.cp_async_wait_group(WAIT_ONE)
    ptx.cp_async_wait_group(0)
    cuda.syncthreads()
    for e in range(lane, CHUNK_WORDS, 32):
        out[e] = sm[e]


@cuda.jit
def _cp_async4_kernel(G, src, dst, valid, out):
    # G: uint16 (2 per word); shared: uint32 (1 per word)
    sm = cuda.shared.array(CHUNKS, np.uint32)
    lane = cuda.threadIdx.x
    for e in range(lane, CHUNKS, 32):
        sm[e] = 0xFFFFFFFF
    cuda.syncthreads()
    for j in range(2):
        c = 2 * lane + j
        ptx.cp_async4(sm, dst[c], G, src[c] * 2, valid[c] != 0)
    ptx.cp_async_commit()
    ptx.cp_async_wait_all()
    cuda.syncthreads()
    for e in range(lane, CHUNKS, 32):
        out[e] = sm[e]


@pytest.mark.parametrize("nbytes", [16, 4])
def test_cp_async(rng, nbytes):
    per = nbytes // 2                           # halves per chunk
    nsrc = 3 * CHUNKS
    G = bits16(rng, nsrc * per)
    dst = rng.permutation(CHUNKS).astype(np.int64)
    valid = (rng.random(CHUNKS) < 0.7).astype(np.int32)
    valid[:2] = (1, 0)                          # both kinds, always
    src = rng.integers(0, nsrc, size=CHUNKS).astype(np.int64)
    src[valid == 0] = 0                         # a valid address, as the caller clamps it
    out = np.full(CHUNKS * nbytes // 4, U32_POISON, np.uint32)
    kernel = _cp_async16_kernel if nbytes == 16 else _cp_async4_kernel
    *_, out = launch(kernel, 32, G, src, dst, valid, out)
    got = out.view(np.uint16).reshape(CHUNKS, per)
    want = np.zeros((CHUNKS, per), np.uint16)
    chunks = G.reshape(nsrc, per)
    want[dst[valid != 0]] = chunks[src[valid != 0]]
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------------------------------
# pack, ex2, st_global_b32
# ------------------------------------------------------------------------------------------------------

@cuda.jit
def _pack_f16_kernel(lo, hi, out):
    i = cuda.threadIdx.x + cuda.blockIdx.x * cuda.blockDim.x
    if i < out.size:
        out[i] = ptx.pack_f16x2(lo[i], hi[i])


@cuda.jit
def _pack_bf16_kernel(lo, hi, out):
    i = cuda.threadIdx.x + cuda.blockIdx.x * cuda.blockDim.x
    if i < out.size:
        out[i] = ptx.pack_bf16x2(lo[i], hi[i])


F16_SPECIAL = [
    np.nan, np.inf, -np.inf, 65504.0, -65504.0,
    65519.0, 65520.0, 70000.0, -1e6, 3.0e38,       # 65520: the tie between 65504 and inf rounds to inf
    1 + 2.0**-11, 1 + 3 * 2.0**-11, -(1 + 2.0**-11), 2048 + 1, 2048 + 3,  # ties to even
    2.0**-24, 2.0**-25, 3 * 2.0**-25, 2.0**-26, 1e-30, -2.0**-20,          # subnormal f16, underflow
]
BF16_SPECIAL = [
    np.nan, np.inf, -np.inf, 3.3895313892515355e38, 3.4e38, -3.4e38,      # max bf16; beyond rounds to inf
    1 + 2.0**-8, 1 + 3 * 2.0**-8, -(1 + 2.0**-8), 256 + 1, 256 + 3,        # ties to even
    1 + 2.0**-8 + 2.0**-20, 1e-40, -1e-39,                                  # above a tie; float32 subnormals
]


def ref_half_bits(x32, dtype):
    """Round-to-nearest-even float32 -> float16 / bfloat16 bits, by torch when present, else numpy."""
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        t = torch.from_numpy(x32.copy())
        return t.to(getattr(torch, dtype)).view(torch.int16).numpy().view(np.uint16)
    if dtype == "bfloat16":
        pytest.skip("no independent bfloat16 rounding without torch")
    with np.errstate(over="ignore"):
        return x32.astype(np.float16).view(np.uint16)


def is_nan_bits(bits, dtype):
    if dtype == "float16":
        return ((bits & 0x7C00) == 0x7C00) & ((bits & 0x03FF) != 0)
    return ((bits & 0x7F80) == 0x7F80) & ((bits & 0x007F) != 0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_pack(rng, dtype):
    special = np.array(F16_SPECIAL if dtype == "float16" else BF16_SPECIAL, np.float32)
    rand = (nonzero_normal(rng, 200, np.float64) * 10.0 ** rng.integers(-8, 6, 200)).astype(np.float32)
    vals = np.concatenate([special, -special, rand])
    lo = rng.permutation(vals)
    hi = rng.permutation(vals)                  # lo and hi differ, so a swapped pair is caught
    out = np.full(vals.size, U32_POISON, np.uint32)
    kernel = _pack_f16_kernel if dtype == "float16" else _pack_bf16_kernel
    *_, out = launch(kernel, 128, lo, hi, out, blocks=(vals.size + 127) // 128)
    for half, src in ((out & 0xFFFF, lo), (out >> 16, hi)):
        got = half.astype(np.uint16)
        want = ref_half_bits(src, dtype)
        nan = is_nan_bits(want, dtype)
        assert is_nan_bits(got, dtype)[nan].all(), "NaN must stay NaN"
        bad = np.flatnonzero((got != want) & ~nan)
        assert bad.size == 0, (f"{bad.size} wrong: x={src[bad[:5]]} got {[hex(v) for v in got[bad[:5]]]} "
                               f"want {[hex(v) for v in want[bad[:5]]]}")


@cuda.jit
def _ex2_kernel(x, out):
    i = cuda.threadIdx.x + cuda.blockIdx.x * cuda.blockDim.x
    if i < out.size:
        out[i] = ptx.ex2(x[i])


def test_ex2(rng):
    special = np.array([-np.inf, np.inf, np.nan, 0.0, -0.0, 1.0, -1.0, 127.5, 128.0, 200.0,
                        -125.0, -127.0, -149.0, -200.0, 1e-40], np.float32)
    rand = rng.uniform(-125.9, 127.9, 300).astype(np.float32)
    rand[rand == 0] = 0.5
    x = np.concatenate([special, rand])
    out = np.full(x.size, np.nan, np.float32)
    *_, out = launch(_ex2_kernel, 128, x, out, blocks=(x.size + 127) // 128)
    with np.errstate(over="ignore"):
        ref = np.exp2(x.astype(np.float64))
    nan = np.isnan(x)
    assert np.isnan(out[nan]).all()
    ok = ~nan
    tiny = np.finfo(np.float32).tiny
    flushed = ref < tiny                        # .ftz: results below the normal range are +0
    assert (out[ok & flushed] == 0).all() and not np.signbit(out[ok & flushed]).any()
    big = ref > np.finfo(np.float32).max
    assert np.isposinf(out[ok & big]).all()
    mid = ok & ~flushed & ~big
    rel = np.abs(out[mid] - ref[mid]) / ref[mid]
    assert rel.max() < 2.0**-20, f"ex2 relative error {rel.max():.3g}"


@cuda.jit
def _fma_kernel(a, b, c, out, a64, b64, c64, out64):
    i = cuda.threadIdx.x + cuda.blockIdx.x * cuda.blockDim.x
    if i < out.size:
        out[i] = ptx.fma(a[i], b[i], c[i])
        out64[i] = ptx.fma(a64[i], b64[i], c64[i])


def test_fma_rounds_once(rng):
    """a * b + c with one rounding (what pins the lse bits of kernels that share the softmax), float32 and
    float64, against the exact value: cases where the product's low bits decide the rounding, random
    ones, zeros' signs, inf and NaN."""
    from fractions import Fraction
    eps32 = np.float32(2.0**-23)
    # (1 + e)(1 - e) - 1 = -e^2: unfused it rounds to 0
    a = np.array([1 + eps32, 0.0, -0.0, np.inf, 1.0, 3.0], np.float32)
    b = np.array([1 - eps32, 5.0, 5.0, 0.0, np.nan, 1e38], np.float32)
    c = np.array([-1.0, -0.0, -0.0, 1.0, 1.0, 1e38], np.float32)
    n = 200
    a = np.concatenate([a, rng.standard_normal(n).astype(np.float32)])
    b = np.concatenate([b, rng.standard_normal(n).astype(np.float32)])
    c = np.concatenate([c, (rng.standard_normal(n) * 1e-3).astype(np.float32)])
    a64, b64, c64 = (x.astype(np.float64) * (1 + 2.0**-40) for x in (a, b, c))
    out, out64 = np.full(a.size, np.nan, np.float32), np.full(a.size, np.nan)
    *_, out, _, _, _, out64 = launch(_fma_kernel, 128, a, b, c, out, a64, b64, c64, out64,
                                     blocks=(a.size + 127) // 128)
    assert out[0] == -eps32 * eps32 and np.signbit(out[2]) and not np.signbit(out[1])
    assert np.isnan(out[3]) and np.isnan(out[4]) and np.isposinf(out[5])
    for got, x, y, z, t in ((out, a, b, c, np.float32), (out64, a64, b64, c64, np.float64)):
        for i in range(6, a.size):
            exact = Fraction(float(x[i])) * Fraction(float(y[i])) + Fraction(float(z[i]))
            near = [np.nextafter(got[i], -np.inf, dtype=t), got[i], np.nextafter(got[i], np.inf, dtype=t)]
            dist = [abs(Fraction(float(v)) - exact) for v in near]
            assert dist[1] == min(dist), (t.__name__, i, x[i], y[i], z[i], got[i], float(exact))


@cuda.jit
def _st_b32_kernel(words, where, out):
    lane = cuda.threadIdx.x
    ptx.st_global_b32(out, where[lane] * 2, words[lane])


@pytest.mark.parametrize("dtype", ["uint16", "float16"])
def test_st_global_b32(rng, dtype):
    n = 48                                      # 48 word slots, 32 written: the rest stay poisoned
    lo, hi = bits16(rng, 32).astype(np.uint32), bits16(rng, 32).astype(np.uint32)
    words = lo | hi << 16
    where = rng.permutation(n)[:32].astype(np.int64)
    out = np.full(2 * n, U16_POISON, np.uint16).view(dtype)
    *_, out = launch(_st_b32_kernel, 32, words, where, out)
    want = np.full(2 * n, U16_POISON, np.uint16)
    want[2 * where] = lo
    want[2 * where + 1] = hi
    np.testing.assert_array_equal(out.view(np.uint16), want)


_ZERO_BITS = np.uint16(0)


@cuda.jit
def _st_b16_kernel(vals, where, out):
    """Scatter 16-bit values into a float32 shared array at halfword positions, then copy it out; lanes
    past the data store zero bits (the constant the tensor-core copy uses for padding)."""
    sm = cuda.shared.array(0, float32)
    lane = cuda.threadIdx.x
    for i in range(lane, out.size, 32):
        sm[i] = out[i]
    cuda.syncthreads()
    if lane < vals.size:
        ptx.st_shared_b16(sm, where[lane], vals[lane])
    else:
        ptx.st_shared_b16(sm, where[lane], _ZERO_BITS)
    cuda.syncthreads()
    for i in range(lane, out.size, 32):
        out[i] = sm[i]


@pytest.mark.parametrize("dtype", ["uint16", "float16"])
def test_st_shared_b16(rng, dtype):
    n = 64                                      # 64 halfword slots, 32 written: the rest keep their bits
    vals = bits16(rng, 24).view(dtype)
    where = rng.permutation(n)[:32].astype(np.int64)
    init = bits16(rng, n)
    out = init.view(np.float32).copy()
    dev = [cuda.to_device(x) for x in (vals, where, out)]
    _st_b16_kernel[1, 32, 0, n * 2](*dev)
    got = dev[2].copy_to_host().view(np.uint16)
    want = init.copy()
    want[where[:24]] = vals.view(np.uint16)
    want[where[24:]] = 0
    np.testing.assert_array_equal(got, want)


@cuda.jit
def _b32_shared_kernel(words, out):
    """Scatter 32-bit patterns into a float32 shared array as bits, then copy the words out as uint32."""
    sm = cuda.shared.array(0, float32)
    lane = cuda.threadIdx.x
    ptx.st_shared_b32(sm, 31 - lane, words[lane])
    cuda.syncthreads()
    out[lane] = sm.view(np.uint32)[lane]


def test_st_shared_b32_moves_bits_not_values(rng):
    # patterns that are NaNs, subnormals and negative zero as float32: a value conversion would change them
    words = rng.integers(0, 1 << 32, 32, dtype=np.uint64).astype(np.uint32)
    words[:4] = [0x7FC00001, 0x00000001, 0x80000000, 0xFF800000]
    dev = [cuda.to_device(x) for x in (words, np.full(32, U32_POISON))]
    _b32_shared_kernel[1, 32, 0, 128](*dev)
    np.testing.assert_array_equal(dev[1].copy_to_host(), words[::-1])


@cuda.jit
def _vote_kernel(pred, out):
    lane = cuda.threadIdx.x
    out[lane] = 1 if ptx.vote_any(pred[lane] != 0) else 0


@pytest.mark.parametrize("true_lanes", [[], [0], [31], [7, 19], list(range(32))], ids=str)
def test_vote_any_is_true_in_every_lane_iff_some_lane_is(true_lanes):
    pred = np.zeros(64, np.int32)
    pred[true_lanes] = 1
    pred[32 + 5] = 1                    # the second warp always votes yes: warps do not mix
    *_, out = launch(_vote_kernel, 64, pred, np.full(64, -1, np.int32))
    assert (out[:32] == (1 if true_lanes else 0)).all()
    assert (out[32:] == 1).all()


@cuda.jit
def _red_kernel(vals, where, acc):
    """Every thread of every block adds its value into acc[where]."""
    i = cuda.grid(1)
    ptx.red_add_f32(acc, where[i], vals[i])


@cuda.jit
def _red2_kernel(vals, where, acc):
    """... (v, -v) into acc[2 where], acc[2 where + 1] (a separate kernel: sm_90 only)."""
    i = cuda.grid(1)
    ptx.red_add_f32x2(acc, 2 * where[i], vals[i], -vals[i])


@pytest.mark.parametrize("pairs", [False, True], ids=["f32", "f32x2"])
def test_red_add_sums_every_contribution(rng, pairs):
    if pairs and not SIMULATOR and cuda.get_current_device().compute_capability < (9, 0):
        pytest.skip("red.global.add.v2.f32 needs sm_90")
    n, slots = 4 * 128, 8                  # 64 contributions per slot, from 4 blocks, many at once
    vals = (rng.integers(-1000, 1000, n) / 8).astype(np.float32)   # exact in float32 in any order
    where = rng.integers(0, slots, n).astype(np.int64)
    init = (rng.integers(-100, 100, 2 * slots) / 4).astype(np.float32)
    dev = [cuda.to_device(x) for x in (vals, where, init.copy())]
    (_red2_kernel if pairs else _red_kernel)[4, 128](*dev)
    got = dev[2].copy_to_host()
    want = init.astype(np.float64)
    if pairs:
        np.add.at(want, 2 * where, vals)
        np.add.at(want, 2 * where + 1, -vals)
    else:
        np.add.at(want, where, vals)
    np.testing.assert_array_equal(got, want.astype(np.float32))


# ------------------------------------------------------------------------------------------------------
# the simulator's warp machinery: a broken kernel fails instead of hanging
# ------------------------------------------------------------------------------------------------------

@cuda.jit
def _divergent_shfl_kernel(x, out):
    lane = cuda.threadIdx.x
    if lane == 3:
        return
    out[lane] = ptx.shfl_xor(x[lane], 1)


@cuda.jit
def _shfl_vs_syncthreads_kernel(x, out):
    lane = cuda.threadIdx.x
    if lane == 0:
        cuda.syncthreads()
    else:
        out[lane] = ptx.shfl_xor(x[lane], 1)
        cuda.syncthreads()


@cuda.jit
def _raising_kernel(x, out):
    lane = cuda.threadIdx.x
    if lane == 5:
        out[lane] = x[1000]                     # out of bounds: IndexError in the simulator
    out[lane] = ptx.shfl_xor(x[lane], 1)


@pytest.mark.skipif(not SIMULATOR, reason="simulator machinery (on a GPU these kernels are undefined)")
@pytest.mark.parametrize("kernel,match", [
    (_divergent_shfl_kernel, "exited without reaching"),
    (_shfl_vs_syncthreads_kernel, "syncthreads"),
    (_raising_kernel, "index"),
], ids=["exited-lane", "syncthreads-deadlock", "exception"])
def test_simwarp_fails_fast(kernel, match):
    import time
    x = np.ones(32, np.float32)
    out = np.zeros(32, np.float32)
    t = time.monotonic()
    with pytest.raises(Exception, match=match):
        kernel[1, 32](x, out)
    assert time.monotonic() - t < 10


@pytest.mark.skipif(not SIMULATOR, reason="simulator machinery")
def test_simwarp_reports_the_exception_of_a_lane_the_block_manager_dropped():
    """A lane that dies of an exception between the BlockManager's exception check and its liveness filter
    is dropped from its loop, its exception deferred until every thread ends; the lanes waiting for it at a
    collective then find it among the manager's threads (its run() frame's `threads`) and raise its
    exception, not a divergent-exit message. (Which happens first is a race, common on a loaded machine:
    here the frame is staged.)"""
    from numba_flash.kernels import simwarp

    class _Thread:
        def __init__(self, tid, exc):
            self.thread_id, self.exception = tid, exc

    manager = object()
    threads = {_Thread(3, None), _Thread(5, (IndexError("tid=[5, 0, 0]: index 1000 is out of bounds"), None))}

    def run(self, threads):         # stands for BlockManager.run: its frame holds self and threads
        with pytest.raises(IndexError, match="index 1000"):
            simwarp._raise_lane_exception(manager, [5])
        simwarp._raise_lane_exception(manager, [3])         # exited without an exception: nothing raised
        simwarp._raise_lane_exception(object(), [5])        # another block's manager: not its threads
        with pytest.raises(IndexError, match="index 1000"):  # any thread (the mbarrier twins' deadlock check)
            simwarp._raise_lane_exception(manager)
    run(manager, threads)


@cuda.jit
def _misaligned_cp_async_kernel(G, out):
    sm = cuda.shared.array(64, np.uint16)
    ptx.cp_async16(sm, 4, G, 0, True)           # 8 bytes in: not 16-byte aligned


@cuda.jit
def _misaligned_ldmatrix_kernel(G, out):
    sm = cuda.shared.array(64, np.uint16)
    out[cuda.threadIdx.x] = ptx.ldmatrix_x1(sm, 2 * cuda.threadIdx.x, 0)


@pytest.mark.skipif(not SIMULATOR, reason="the simulator's checks (on a GPU: a misaligned-address fault)")
@pytest.mark.parametrize("kernel", [_misaligned_cp_async_kernel, _misaligned_ldmatrix_kernel],
                         ids=["cp_async16", "ldmatrix"])
def test_sim_checks_alignment(kernel):
    with pytest.raises(ValueError, match="aligned"):
        kernel[1, 32](np.ones(64, np.uint16), np.zeros(32, np.uint32))


# ------------------------------------------------------------------------------------------------------
# GPU code generation: every intrinsic compiles (NVVM) and assembles (ptxas) for sm_80 and sm_90
# ------------------------------------------------------------------------------------------------------

_CODEGEN = textwrap.dedent('''
    import sys
    import numpy as np
    from numba import cuda, types
    from numba_flash.kernels import ptx

    ONE = 1

    def k(cf, G, O, U, F64, I32):
        sm = cuda.shared.array(0, np.uint16)
        su = cuda.shared.array(0, np.uint32)
        lane = ptx.lane_id()
        ptx.cp_async16(sm, lane * 8, G, lane * 8, lane < 16)
        ptx.cp_async4(su, lane + 512, U, lane, True)
        ptx.cp_async_commit()
        ptx.cp_async_wait_group(ONE)
        ptx.cp_async_wait_group(0)
        ptx.cp_async_wait_all()
        cuda.syncthreads()
        a0, a1, a2, a3 = ptx.ldmatrix_x4(sm, lane * 8, 0)
        b0, b1 = ptx.ldmatrix_x2_trans(sm, lane * 8, 0)
        x = ptx.ldmatrix_x1(sm, lane * 8, 0) ^ ptx.ldmatrix_x1_trans(sm, lane * 8, 0)
        y = ptx.ldmatrix_x2(sm, lane * 8, 0)
        z = ptx.ldmatrix_x4_trans(sm, lane * 8, 0)
        d = ptx.mma_f16(a0, a1, a2, a3, b0, b1, cf[0], cf[1], cf[2], cf[3])
        e = ptx.mma_bf16(a0, a1, a2, a3, y[0], z[1], d[0], d[1], d[2], d[3])
        F64[lane] = ptx.shfl_xor(F64[lane], 2)
        I32[lane] = ptx.shfl_xor(I32[lane], 4)
        s = ptx.ex2(ptx.shfl_xor(e[0], 1))
        ptx.st_global_b32(O, lane * 2, ptx.pack_f16x2(s, e[2]) ^ ptx.pack_bf16x2(e[3], s) ^ z[3] ^ x)
        ptx.st_shared_b16(su, lane, G[lane])
        ptx.st_shared_b32(su, lane, U[lane])
        if ptx.vote_any(I32[lane] > 0):
            ptx.red_add_f32(cf, lane, s)

    def k90(cf):
        ptx.red_add_f32x2(cf, 2 * ptx.lane_id(), 1.0, 2.0)

    sig = (types.float32[::1], types.uint16[::1], types.uint16[::1], types.uint32[::1],
           types.float64[::1], types.int32[::1])
    try:
        from numba.cuda.cudadrv.nvvm import NVVM
        NVVM()
        # compile_ptx also asks NVRTC which architectures exist: a toolkit with NVVM but no NVRTC
        # (seen: a system CUDA found by cuda-pathfinder without libnvrtc) cannot compile either
        from numba.cuda.cudadrv.nvrtc import get_supported_ccs
        get_supported_ccs()
    except Exception as exc:   # no libNVVM / libNVRTC here: nothing to check
        print("SKIP: no CUDA compiler libraries (NVVM and NVRTC):", str(exc).splitlines()[0][:200])
        sys.exit(3)
    for name, fn, args, cc in (("k", k, sig, (8, 0)), ("k", k, sig, (9, 0)), ("k90", k90, sig[:1], (9, 0))):
        text, _ = cuda.compile_ptx(fn, args, cc=cc)
        with open(f"{sys.argv[1]}/{name}_sm{cc[0]}{cc[1]}.ptx", "w") as f:
            f.write(text)
''')

_EXPECTED_PTX = ["mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
                 "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
                 "ldmatrix.sync.aligned.m8n8.x4.shared.b16", "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16",
                 "ldmatrix.sync.aligned.m8n8.x2.shared.b16", "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16",
                 "ldmatrix.sync.aligned.m8n8.x1.shared.b16", "ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16",
                 "cp.async.cg.shared.global", "cp.async.ca.shared.global", "cp.async.commit_group",
                 "cp.async.wait_group 1", "cp.async.wait_group 0", "cp.async.wait_all",
                 "cvt.rn.f16x2.f32", "cvt.rn.bf16x2.f32", "ex2.approx.ftz.f32", "shfl.sync.bfly.b32",
                 "st.global.u32", "st.shared.u16", "%laneid", "st.shared.u32", "vote.sync.any.pred",
                 "red.global.add.f32"]
_EXPECTED_PTX_90 = ["red.global.add.v2.f32"]


def find_ptxas():
    """ptxas candidates, the one from the NVIDIA wheels (the toolkit of the NVVM in use) first."""
    import glob
    import shutil
    found = []
    try:
        import nvidia
        for root in nvidia.__path__:
            found += sorted(glob.glob(os.path.join(root, "*", "bin", "ptxas")))
    except ImportError:
        pass
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            found.append(os.path.join(os.environ[var], "bin", "ptxas"))
    found.append(shutil.which("ptxas"))
    return [p for p in dict.fromkeys(found) if p and os.path.exists(p)]


def test_gpu_codegen_assembles(tmp_path):
    """Compiles a kernel using every intrinsic with NVVM (in a child without the simulator: compile_ptx
    needs no GPU) and, where a ptxas is found, assembles the PTX for sm_80 and sm_90."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    r = subprocess.run([sys.executable, "-c", _CODEGEN, str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=300)
    if r.returncode == 3:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, r.stdout + r.stderr
    ptxas = find_ptxas()
    assembled = None
    for name, cc, expected in (("k", "80", _EXPECTED_PTX), ("k", "90", _EXPECTED_PTX),
                               ("k90", "90", _EXPECTED_PTX_90)):
        path = tmp_path / f"{name}_sm{cc}.ptx"
        text = path.read_text()
        missing = [ins for ins in expected if ins not in text]
        assert not missing, f"sm_{cc}: instructions missing from the PTX: {missing}"
        for exe in ptxas:
            a = subprocess.run([exe, f"-arch=sm_{cc}", str(path), "-o", str(path) + ".cubin"],
                               capture_output=True, text=True, timeout=120)
            if "Unsupported .version" in a.stderr:
                continue        # a ptxas older than the NVVM that wrote the PTX: try the next one
            assert a.returncode == 0, f"{exe} -arch=sm_{cc}:\n{a.stderr}"
            assembled = exe
            break
    if assembled is None:
        pytest.skip(f"PTX generated and checked; no ptxas able to assemble it (tried {ptxas})")
