"""The Hopper intrinsics of numba_flash.kernels.hopper, each in a small kernel, against independent numpy.

Runs unchanged on a cc 9.0 GPU (the inline-PTX intrinsics, sm_90a) and under the simulator (their Python
twins); on other GPUs the runtime tests skip. Every output is poisoned (NaN, or all-ones bits) before the
launch so that an element the kernel does not write fails. Inputs are fresh random numbers; the seed is
printed (shown with a failure) and NUMBA_FLASH_TEST_SEED=<seed> replays it.

The references here are written from the PTX ISA independently of hopper.py: the shared-memory images of the
wgmma operands are built on the host from the canonical layouts (the 128-byte swizzle also from its plain
statement: within each 1024-byte atom of 8 rows x 128 bytes, 16-byte chunk c of row r is stored at chunk
c ^ (r % 8)), the fragments from the register-fragment tables. Under the simulator these check the twins
against that reading of the ISA; on an H100/H200 they check the reading itself.

Picks the simulator itself (runtime.select() before numba.cuda is imported); the random inputs come from
conftest.py's `rng` fixture.
"""
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

from numba_flash import runtime

runtime.select()   # before numba.cuda is imported: the simulator unless a GPU answers

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from numba import cuda  # noqa: E402

from numba_flash.kernels import hopper, ptx  # noqa: E402
from numba_flash.kernels.launch import SIMULATOR, inline_device  # noqa: E402

U32_POISON = np.uint32(0xFFFFFFFF)
WG = 128


def _cc():
    if SIMULATOR:
        return None
    try:
        return cuda.get_current_device().compute_capability
    except Exception:       # no usable device (the code-generation child imports this module without one)
        return (0, 0)


# wgmma and setmaxnreg are sm_90a features: they run on cc 9.0 only (not on later architectures)
needs_sm90a = pytest.mark.skipif(
    not SIMULATOR and _cc() != (9, 0),
    reason=f"wgmma / setmaxnreg are sm_90a instructions: they need a cc 9.0 GPU (this one is cc {_cc()})")
# mbarrier transaction counts and cp.async.bulk: sm_90 and later
needs_sm90 = pytest.mark.skipif(
    not SIMULATOR and _cc() < (9, 0),
    reason=f"mbarrier expect_tx / try_wait and cp.async.bulk need cc >= 9.0 (this GPU is cc {_cc()})")
sim_only = pytest.mark.skipif(not SIMULATOR, reason="checks of the simulator twins (on a GPU: undefined "
                                                     "behaviour or a hang, not an error)")


@pytest.fixture(autouse=True, scope="module")
def prompt_thread_switches():
    """Under the simulator, a 1 ms GIL switch interval for this module (restored after it). The simulator's
    BlockManager busy-loops holding the GIL, so every wake-up of a simulated thread (128 per warpgroup
    collective) can wait a full interval for it: at the default 5 ms a wgmma test takes ~8x longer."""
    if not SIMULATOR:
        yield
        return
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.001)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def launch(kernel, blocks, threads, *args):
    """Run `kernel` on device copies of `args`; return the host copies of all of them."""
    dev = [cuda.to_device(np.ascontiguousarray(a)) for a in args]
    kernel[blocks, threads](*dev)
    return [d.copy_to_host() for d in dev]


# ------------------------------------------------------------------------------------------------------
# operands: 16-bit values and their shared-memory images (canonical layouts, PTX ISA 9.7.15.5.1.2)
# ------------------------------------------------------------------------------------------------------

def random_bits(rng, shape, dtype):
    """(uint16 bits, float64 values) of random nonzero float16 / bfloat16 numbers (exact in both)."""
    x = rng.standard_normal(shape)
    x[x == 0] = 1.0
    if dtype == "float16":
        bits = x.astype(np.float16).view(np.uint16)
        return bits, bits.view(np.float16).astype(np.float64)
    bits = (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)     # truncation: exact bf16
    bits[(bits & 0x7FFF) == 0] = 0x3F80
    return bits, (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


SWIZZLE = {"none": hopper.SWIZZLE_NONE, "128": hopper.SWIZZLE_128B, "64": hopper.SWIZZLE_64B,
           "32": hopper.SWIZZLE_32B}


def swizzle_offsets(linear, width):
    """CuTe Swizzle<B, 4, 3> of the PTX ISA's table (B = 3, 2, 1 for 128, 64, 32 bytes): the 16-byte chunk
    bits 4..4+B of a byte offset inside an (8 x width)-byte atom XORed with bits 7..7+B."""
    b = {128: 3, 64: 2, 32: 1}[width]
    return linear ^ (((linear >> 7) & ((1 << b) - 1)) << 4)


def operand_image(X, layout):
    """The shared-memory image of operand X (R x K, uint16 bits; R = M of A or N of B, K a multiple of 16)
    in `layout` = "<major>/<swizzle>[/<order>]": major K (X[r][k] K-contiguous, trans 0) or MN (trans 1);
    swizzle none / 128 / 64 / 32; order (no swizzle only) of the 8 x 16-byte core matrices: "k" puts the
    two along K next to each other, "mn" the ones along R.
    Returns (image as uint32 words, LBO, SBO, swizzle mode, start byte offset of each k16 step). The image
    must be placed at a 1024-byte-aligned shared address (the swizzle uses absolute address bits)."""
    R, K = X.shape
    r = np.arange(R).reshape(-1, 1)
    k = np.arange(K).reshape(1, -1)
    major, swz, *order = layout.split("/")
    steps = np.arange(K // 16)
    if swz == "none":
        # core matrices of 8 lines x 16 bytes (lines along R for K-major, along K for MN-major); in both
        # majors LBO steps 8 k and SBO 8 rows of R
        if order == ["k"]:
            lbo, sbo = 128, 128 * (K // 8)
        else:
            lbo, sbo = 128 * (R // 8), 128
        if major == "K":
            off = (r // 8) * sbo + (k // 8) * lbo + (r % 8) * 16 + (k % 8) * 2
        else:
            off = (r // 8) * sbo + (k // 8) * lbo + (k % 8) * 16 + (r % 8) * 2
        starts = steps * 2 * lbo                    # 16 k = two core matrices along K
    else:
        s = int(swz)
        e = s // 2                                  # elements per swizzle row
        if major == "K":
            # atoms of 8 rows x s bytes stacked along R (SBO = 8s); the next s bytes of K after all rows
            sbo, lbo = 8 * s, 16                     # LBO unused for K-major swizzled ("assumed 1")
            lin = (2 * k // s) * R * s + (r // 8) * sbo + (r % 8) * s + (2 * k) % s
            starts = (32 * steps // s) * R * s + (32 * steps) % s
        else:
            # atoms of 8 k-rows x s bytes (e elements of R): along K at SBO = 8s, along R at LBO
            sbo = 8 * s
            lbo = (K // 8) * sbo
            lin = (r // e) * lbo + (k // 8) * sbo + (k % 8) * s + (r % e) * 2
            starts = steps * 2 * sbo
        off = swizzle_offsets(lin, s)
        if s == 128 and major == "K":
            # the plain statement of the 128B swizzle must give the same image
            atom, row, chunk = lin // 1024, (lin // 128) % 8, (lin // 16) % 8
            assert np.array_equal(off, atom * 1024 + row * 128 + (chunk ^ row) * 16 + lin % 16)
    nbytes = R * K * 2
    assert off.max() < nbytes and np.unique(off).size == off.size, "layout is not a bijection"
    img = np.zeros(nbytes // 2, np.uint16)
    img[off // 2] = X
    return img.view(np.uint32), lbo, sbo, SWIZZLE[swz], starts.astype(np.int64)


def acc_positions(n):
    """(rows, cols) of D (64 x n) held by accumulator j of warpgroup thread q: arrays (128, n/2), from the
    fragment table of wgmma .m64nNk16 (Figure "register fragment layout for accumulator matrix D")."""
    q = np.arange(WG).reshape(-1, 1)
    j = np.arange(n // 2).reshape(1, -1)
    w, g, t = q // 32, (q % 32) // 4, q % 4
    rows = 16 * w + g + 8 * ((j // 2) % 2)
    cols = 8 * (j // 4) + 2 * t + j % 2
    return np.broadcast_to(rows, cols.shape), cols


def to_fragments(M, n):
    """An accumulator-shaped 64 x n matrix as the 128 threads' registers, flat (thread-major)."""
    rows, cols = acc_positions(n)
    return np.ascontiguousarray(M[rows, cols].astype(np.float32)).reshape(-1)


def from_fragments(frag, n):
    rows, cols = acc_positions(n)
    D = np.full((64, n), np.nan, np.float32)
    D[rows, cols] = frag.reshape(WG, n // 2)
    return D


def a_registers(A_bits):
    """The A fragment of wgmma .m64nNk16 (64 x 16, uint16 bits) as 4 b32 registers per thread, (128 * 4):
    register i of thread q holds A[16w + g + 8 * (i % 2)][2t + 8 * (i // 2) + {0 (bits 0-15), 1}]."""
    regs = np.empty((WG, 4), np.uint32)
    for q in range(WG):
        w, g, t = q // 32, (q % 32) // 4, q % 4
        for i in range(4):
            row, col = 16 * w + g + 8 * (i % 2), 2 * t + 8 * (i // 2)
            regs[q, i] = int(A_bits[row, col]) | int(A_bits[row, col + 1]) << 16
    return regs.reshape(-1)


def check_product(D, A, Bt, C):
    """D = A Bt^T (+ C) to 1e-6 of the terms' magnitude: exact products, float32 accumulation."""
    assert not np.isnan(D).any(), f"{np.isnan(D).sum()} accumulators not written (or NaN)"
    ref = A @ Bt.T + C
    scale = np.abs(A) @ np.abs(Bt).T + np.abs(C)
    err = np.abs(D - ref) / scale
    where = np.unravel_index(err.argmax(), err.shape)
    assert err.max() < 1e-6, f"wgmma error {err.max():.3g} of the terms' magnitude at D{list(where)}"
    rel = np.linalg.norm(D - ref) / np.linalg.norm(ref)
    assert rel < 1e-6, f"relative error {rel:.3g}"


# ------------------------------------------------------------------------------------------------------
# kernels: operand images -> 1024-byte-aligned shared memory -> K/16 chained wgmmas -> fragments
# ------------------------------------------------------------------------------------------------------

_KERNELS = {}
ALIGN_WORDS = 256          # room to move an image up to the next 1024-byte boundary


def wgmma_kernel(dtype, n, trans_a, trans_b, k, a_words, b_words, a_regs=False, groups=1):
    """Kernel(imgA, imgB, Afrag, P, startsA, startsB, Cfrag, Dfrag). P = (lboA, sboA, swzA, lboB, sboB, swzB,
    scale_d of the first step). Each warpgroup w of `groups` uses its own A (image w, or registers) and C."""
    key = (dtype, n, trans_a, trans_b, k, a_words, b_words, a_regs, groups)
    if key in _KERNELS:
        return _KERNELS[key]
    if a_regs:
        mma = hopper.wgmma_f16_rs if dtype == "float16" else hopper.wgmma_bf16_rs
    else:
        mma = hopper.wgmma_f16 if dtype == "float16" else hopper.wgmma_bf16
    NACC = n // 2
    N = n
    TA, TB = trans_a, trans_b
    KSTEPS = k // 16
    SA = groups * a_words + ALIGN_WORDS
    SB = b_words + ALIGN_WORDS
    A_BYTES = a_words * 4
    REGS = a_regs

    @cuda.jit
    def kernel(imgA, imgB, Afrag, P, startsA, startsB, Cfrag, Dfrag):
        sa = cuda.shared.array(SA, np.uint32)
        sb = cuda.shared.array(SB, np.uint32)
        t = cuda.threadIdx.x
        wg = t // 128
        pa = ((1024 - hopper.shared_address(sa) % 1024) % 1024) // 4
        pb = ((1024 - hopper.shared_address(sb) % 1024) % 1024) // 4
        for i in range(t, imgA.size, cuda.blockDim.x):
            sa[pa + i] = imgA[i]
        for i in range(t, imgB.size, cuda.blockDim.x):
            sb[pb + i] = imgB[i]
        hopper.fence_proxy_async_shared()       # generic-proxy stores, read by the async proxy (wgmma)
        cuda.syncthreads()
        scale = P[6]
        acc = hopper.wgmma_acc_load(Cfrag, t * NACC, N)
        acc = hopper.wgmma_fence_operand(acc)
        hopper.wgmma_fence()
        for j in range(KSTEPS):
            db = hopper.make_smem_desc(sb, pb * 4 + startsB[j], P[3], P[4], P[5])
            if REGS:
                r = (t * KSTEPS + j) * 4
                # through the A-register pin (an identity the kernels use before their fence)
                a0, a1, a2, a3 = hopper.wgmma_fence_a(Afrag[r], Afrag[r + 1], Afrag[r + 2], Afrag[r + 3])
                acc = mma(a0, a1, a2, a3, db, acc, scale, TB)
            else:
                da = hopper.make_smem_desc(sa, pa * 4 + wg * A_BYTES + startsA[j], P[0], P[1], P[2])
                acc = mma(da, db, acc, scale, TA, TB)
            scale = 1
        hopper.wgmma_commit_group()
        hopper.wgmma_wait_group(0)
        acc = hopper.wgmma_fence_operand(acc)
        hopper.wgmma_acc_store(Dfrag, t * NACC, acc)

    _KERNELS[key] = kernel
    return kernel


def run_wgmma(rng, dtype="float16", n=64, layout_a="K/128", layout_b="K/128", k=64, scale_d=1,
              a_regs=False, groups=1):
    """Random A (per warpgroup), Bt and C; D from the kernel; checked against float64 numpy."""
    trans_a = int(layout_a.startswith("MN"))
    trans_b = int(layout_b.startswith("MN"))
    A_bits, A = zip(*(random_bits(rng, (64, k), dtype) for _ in range(groups)))
    Bt_bits, Bt = random_bits(rng, (n, k), dtype)
    imgs = [operand_image(a, layout_a) for a in A_bits]
    img_b, lbo_b, sbo_b, swz_b, starts_b = operand_image(Bt_bits, layout_b)
    _, lbo_a, sbo_a, swz_a, starts_a = imgs[0]
    img_a = np.concatenate([im[0] for im in imgs])
    if a_regs:
        # registers of k-step j: the A fragment of columns 16j..16j+15, per thread
        frags = [np.stack([a_registers(a[:, 16 * j:16 * j + 16]).reshape(WG, 4) for j in range(k // 16)], 1)
                 for a in A_bits]
        afrag = np.concatenate(frags).reshape(-1)
        img_a = np.zeros(4, np.uint32)
    else:
        afrag = np.zeros(4, np.uint32)
    C = [rng.standard_normal((64, n)) for _ in range(groups)]
    C = [c.astype(np.float32).astype(np.float64) for c in C]
    if scale_d:
        cfrag = np.concatenate([to_fragments(c, n) for c in C])
    else:
        cfrag = np.full(groups * WG * n // 2, np.nan, np.float32)   # scale_d = 0: C must not be read
    P = np.array([lbo_a, sbo_a, swz_a, lbo_b, sbo_b, swz_b, scale_d], np.int64)
    kernel = wgmma_kernel(dtype, n, trans_a, trans_b, k, img_a.size // groups, img_b.size, a_regs, groups)
    dfrag = np.full(groups * WG * n // 2, np.nan, np.float32)
    *_, dfrag = launch(kernel, 1, groups * WG, img_a, img_b, afrag, P, starts_a, starts_b, cfrag, dfrag)
    for w in range(groups):
        D = from_fragments(dfrag[w * WG * n // 2:(w + 1) * WG * n // 2], n)
        check_product(D, A[w], Bt, C[w] if scale_d else 0 * C[w])


# ------------------------------------------------------------------------------------------------------
# descriptors
# ------------------------------------------------------------------------------------------------------

@cuda.jit
def _desc_kernel(params, out, addr):
    buf = cuda.shared.array(4096, np.uint32)
    i = cuda.threadIdx.x
    if i == 0:
        addr[0] = hopper.shared_address(buf)
    if i < params.shape[0]:
        d = hopper.make_smem_desc(buf, params[i, 0], params[i, 1], params[i, 2], params[i, 3])
        out[2 * i] = d
        # stepping K inside a swizzle atom adds to the address field (no carry out of its 14 bits here)
        out[2 * i + 1] = d + np.uint64(params[i, 4] >> 4)


def test_smem_desc_fields_match_the_ptx_encoding(rng):
    rows = [(0, 128, 256, 0, 32), (16, 1024, 128, 0, 64), (2048, 16, 1024, 1, 32), (1024, 16, 512, 2, 16),
            (4096 - 16, 16, 256, 3, 16)]
    for _ in range(11):
        rows.append((16 * int(rng.integers(0, 8192)), 16 * int(rng.integers(0, 16384)),
                     16 * int(rng.integers(0, 16384)), int(rng.integers(0, 4)), 16 * int(rng.integers(0, 8))))
    params = np.array(rows, np.int64)
    out = np.full(2 * len(rows), np.iinfo(np.uint64).max, np.uint64)
    _, out, addr = launch(_desc_kernel, 1, 32, params, out, np.zeros(1, np.uint32))
    base = int(addr[0])
    assert base % 16 == 0
    for i, (off, lbo, sbo, swz, step) in enumerate(rows):
        d = int(out[2 * i])
        # matrix-descriptor-encode(x) = (x & 0x3FFFF) >> 4 in bits 0-13, 16-29, 32-45; swizzle in 62-63
        want = (((base + off) & 0x3FFFF) >> 4) | ((lbo & 0x3FFFF) >> 4) << 16 | ((sbo & 0x3FFFF) >> 4) << 32 \
            | swz << 62
        assert d == want, f"row {i}: {d:#018x} != {want:#018x}"
        assert d & 0x3FFF == (base + off) >> 4 & 0x3FFF
        assert int(out[2 * i + 1]) == want + (step >> 4)
    # the hand example: LBO 128 -> 8 << 16, SBO 256 -> 16 << 32, no swizzle
    assert int(out[0]) & ~0x3FFF == 0x0000_0010_0008_0000
    # 128B swizzle, LBO 16 (unused: 1), SBO 1024 -> 64 << 32
    assert int(out[4]) & ~0x3FFF == 0x4000_0040_0001_0000


# ------------------------------------------------------------------------------------------------------
# wgmma, A and B from shared memory
# ------------------------------------------------------------------------------------------------------

@needs_sm90a
@pytest.mark.parametrize("layout", ["K/none/k", "K/none/mn", "K/128", "K/64", "K/32"])
def test_wgmma_k_major_layouts(rng, layout):
    """Both operands K-major in each canonical layout; 4 chained k16 steps accumulate onto a random C."""
    run_wgmma(rng, "float16", 64, layout, layout)


@needs_sm90a
@pytest.mark.parametrize("layout_a,layout_b,n", [
    ("K/128", "MN/128", 64), ("K/128", "MN/128", 128), ("K/none/k", "MN/none/k", 64),
    ("K/none/k", "MN/none/mn", 64), ("MN/128", "K/128", 64), ("MN/none/mn", "MN/none/k", 64),
    ("MN/64", "MN/64", 64), ("MN/32", "MN/32", 64),
], ids=lambda v: str(v).replace("/", ""))
def test_wgmma_mn_major_operands(rng, layout_a, layout_b, n):
    """trans_a / trans_b = 1: M-major A, N-major B (B stored [k][n], as V is in P.V); N = 128 with the 128B
    swizzle spans two 64-element atoms along N (LBO)."""
    run_wgmma(rng, "float16", n, layout_a, layout_b)


@needs_sm90a
@pytest.mark.parametrize("scale_d", [1, 0], ids=["accumulate", "overwrite"])
@pytest.mark.parametrize("n", [64, 128, 256])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_wgmma_shapes_and_scale_d(rng, dtype, n, scale_d):
    """m64nNk16, f16 and bf16, the 128B-swizzled K-major layout; scale_d = 0 must ignore C (NaN here)."""
    run_wgmma(rng, dtype, n, "K/128", "K/128", scale_d=scale_d)


@needs_sm90a
def test_wgmma_warpgroups_do_not_mix(rng):
    """Two warpgroups of one block, each its own A and C, the same B."""
    run_wgmma(rng, "bfloat16", 64, "K/128", "K/none/mn", groups=2)


# ------------------------------------------------------------------------------------------------------
# wgmma, A from registers
# ------------------------------------------------------------------------------------------------------

@needs_sm90a
@pytest.mark.parametrize("dtype,n,layout_b", [
    ("float16", 64, "K/128"), ("bfloat16", 64, "K/128"), ("float16", 128, "K/none/mn"),
    ("bfloat16", 128, "K/128"), ("float16", 64, "MN/128"), ("bfloat16", 128, "MN/128"),
], ids=lambda v: str(v).replace("/", ""))
def test_wgmma_a_from_registers(rng, dtype, n, layout_b):
    """A as 4 packed b32 registers per thread (the mma.sync m16n8k16 A layout per warp's 16 rows); with an
    N-major B (trans_b = 1) this is P.V with P in registers and V stored [k][n]."""
    run_wgmma(rng, dtype, n, "K/128", layout_b, a_regs=True)


# ------------------------------------------------------------------------------------------------------
# the simulator's wgmma protocol checks
# ------------------------------------------------------------------------------------------------------

MODE_NO_FENCE, MODE_EARLY_READ, MODE_WAIT1_READ, MODE_SPLIT_DESC, MODE_DIVERGENT = range(5)


@cuda.jit
def _protocol_kernel(mode, out):
    sa = cuda.shared.array(2048 + 256, np.uint32)
    t = cuda.threadIdx.x
    for i in range(t, sa.size, cuda.blockDim.x):
        sa[i] = 0
    cuda.syncthreads()
    pa = ((1024 - hopper.shared_address(sa) % 1024) % 1024) // 4
    d = hopper.make_smem_desc(sa, pa * 4, 16, 1024, 1)
    if mode[0] == MODE_SPLIT_DESC and t == 5:
        d = hopper.make_smem_desc(sa, pa * 4 + 32, 16, 1024, 1)
    acc = hopper.wgmma_acc_zeros(64)
    if mode[0] != MODE_NO_FENCE:
        hopper.wgmma_fence()
    if mode[0] == MODE_DIVERGENT and t >= 64:
        return
    acc = hopper.wgmma_f16(d, d, acc, 0, 0, 0)
    hopper.wgmma_commit_group()
    if mode[0] == MODE_EARLY_READ:
        out[t] = acc[0]
    hopper.wgmma_fence()
    acc2 = hopper.wgmma_f16(d, d, acc, 1, 0, 0)
    hopper.wgmma_commit_group()
    hopper.wgmma_wait_group(1)
    out[t] = acc[0]           # the older group is complete after wait_group(1)
    if mode[0] == MODE_WAIT1_READ:
        out[t] = acc2[0]
    hopper.wgmma_wait_group(0)
    out[t] = acc2[0]


@sim_only
@pytest.mark.parametrize("mode,match", [
    (MODE_NO_FENCE, "no wgmma_fence"), (MODE_EARLY_READ, "read before a wgmma_wait_group"),
    (MODE_WAIT1_READ, "read before a wgmma_wait_group"), (MODE_SPLIT_DESC, "warpgroup-uniform"),
    (MODE_DIVERGENT, "exited without reaching the warpgroup collective"),
], ids=["missing-fence", "read-before-wait", "read-newest-after-wait1", "non-uniform-desc", "divergent"])
def test_sim_wgmma_protocol_errors(mode, match):
    with pytest.raises(RuntimeError, match=match):
        _protocol_kernel[1, WG](np.array([mode], np.int64), np.zeros(WG, np.float32))


@sim_only
def test_sim_wgmma_protocol_accepts_the_correct_sequence():
    out = np.full(WG, np.nan, np.float32)
    _protocol_kernel[1, WG](np.array([-1], np.int64), out)
    assert (out == 0).all()


@sim_only
def test_sim_wgmma_needs_a_full_warpgroup():
    with pytest.raises(RuntimeError, match="needs a full warpgroup"):
        _protocol_kernel[1, 64](np.array([-1], np.int64), np.zeros(64, np.float32))


# ------------------------------------------------------------------------------------------------------
# mbarrier
# ------------------------------------------------------------------------------------------------------

@cuda.jit
def _arrivals_kernel(flags):
    """count = blockDim: the phase completes exactly at the last arrival. flags[t] = try_wait answers
    (parity 0, parity 1) before any arrival, after all but thread 127's, after the wait; then a second phase."""
    bars = cuda.shared.array(2, np.uint64)
    t = cuda.threadIdx.x
    if t == 0:
        hopper.mbarrier_init(bars, 1, cuda.blockDim.x)
        hopper.fence_mbarrier_init()
    cuda.syncthreads()
    flags[t, 0] = hopper.mbarrier_try_wait_parity(bars, 1, 0)      # phase 0 running: False
    flags[t, 1] = hopper.mbarrier_try_wait_parity(bars, 1, 1)      # "previous" phase: True
    cuda.syncthreads()
    if t != 127:
        hopper.mbarrier_arrive(bars, 1)
    cuda.syncthreads()
    flags[t, 2] = hopper.mbarrier_try_wait_parity(bars, 1, 0)      # one arrival missing: False
    cuda.syncthreads()
    if t == 127:
        hopper.mbarrier_arrive(bars, 1)
    hopper.mbarrier_wait_parity(bars, 1, 0)
    flags[t, 3] = hopper.mbarrier_try_wait_parity(bars, 1, 0)      # phase 0 done: True
    flags[t, 4] = hopper.mbarrier_try_wait_parity(bars, 1, 1)      # phase 1 running: False
    cuda.syncthreads()
    hopper.mbarrier_arrive(bars, 1)
    while not hopper.mbarrier_try_wait_parity(bars, 1, 1):         # the polling form of the wait
        pass
    flags[t, 5] = hopper.mbarrier_try_wait_parity(bars, 1, 0)      # phase 2 running: False


@needs_sm90
def test_mbarrier_phase_completes_at_the_last_arrival():
    flags = np.full((WG, 6), 7, np.uint8)
    flags, = launch(_arrivals_kernel, 1, WG, flags)
    want = np.array([0, 1, 0, 1, 0, 0], np.uint8)
    bad = np.flatnonzero((flags != want).any(1))
    assert bad.size == 0, f"threads {bad[:8]}: try_wait answers {flags[bad[0]]}, want {want}"


@cuda.jit
def _tx_kernel(G, out, flags):
    """The transaction count gates a phase: arrive_expect_tx of 48 bytes completes only with the bytes;
    expect_tx (no arrival) plus a copy completes only at the arrival."""
    sm = cuda.shared.array(64, np.uint32)
    bars = cuda.shared.array(2, np.uint64)
    t = cuda.threadIdx.x
    for i in range(t, 64, cuda.blockDim.x):
        sm[i] = 0xFFFFFFFF
    if t == 0:
        hopper.mbarrier_init(bars, 0, 1)
        hopper.mbarrier_init(bars, 1, 1)
        hopper.fence_mbarrier_init()
    hopper.fence_proxy_async_shared()
    cuda.syncthreads()
    if t == 0:
        hopper.mbarrier_arrive_expect_tx(bars, 0, 48)
    cuda.syncthreads()
    flags[t, 0] = hopper.mbarrier_try_wait_parity(bars, 0, 0)      # arrived, 48 bytes pending: False
    cuda.syncthreads()
    if t == 32:                                                     # any thread may issue the copies
        hopper.cp_async_bulk_g2s(sm, 0, G, 0, 16, bars, 0)
        hopper.cp_async_bulk_g2s(sm, 16, G, 8, 32, bars, 0)        # G: uint32, element 8 = byte 32
    hopper.mbarrier_wait_parity(bars, 0, 0)
    if t == 0:
        hopper.mbarrier_expect_tx(bars, 1, 64)
        hopper.cp_async_bulk_g2s(sm, 128, G, 16, 64, bars, 1)
    cuda.syncthreads()
    flags[t, 1] = hopper.mbarrier_try_wait_parity(bars, 1, 0)      # no arrival yet: False
    cuda.syncthreads()
    if t == 0:
        hopper.mbarrier_arrive(bars, 1)
    hopper.mbarrier_wait_parity(bars, 1, 0)
    flags[t, 2] = hopper.mbarrier_try_wait_parity(bars, 1, 0)      # True
    for i in range(t, 64, cuda.blockDim.x):
        out[i] = sm[i]


@needs_sm90
def test_mbarrier_transaction_count_gates_the_phase(rng):
    G = rng.integers(0, 2**32 - 1, 64, dtype=np.uint64).astype(np.uint32)
    out = np.full(64, U32_POISON, np.uint32)
    flags = np.full((WG, 3), 7, np.uint8)
    _, out, flags = launch(_tx_kernel, 1, WG, G, out, flags)
    assert (flags == np.array([0, 0, 1], np.uint8)).all(), f"try_wait answers {np.unique(flags, axis=0)}"
    want = np.full(64, U32_POISON, np.uint32)
    want[0:4] = G[0:4]          # bytes 0-15 from byte 0
    want[4:12] = G[8:16]        # bytes 16-47 from byte 32
    want[32:48] = G[16:32]      # bytes 128-191 from byte 64
    np.testing.assert_array_equal(out, want)


# ------------------------------------------------------------------------------------------------------
# cp.async.bulk
# ------------------------------------------------------------------------------------------------------

SMEM_WORDS = 2048               # 8 KiB of shared destination


@inline_device
def _poison_and_init_one_mbarrier(sm, nwords, bars):
    """The copy tests' prologue: sm[:nwords] all-ones bits (unwritten words fail), mbarrier 0 initialised for
    one arrival, both visible to the asynchronous proxy and to every thread."""
    t = cuda.threadIdx.x
    for i in range(t, nwords, cuda.blockDim.x):
        sm[i] = 0xFFFFFFFF
    if t == 0:
        hopper.mbarrier_init(bars, 0, 1)
        hopper.fence_mbarrier_init()
    hopper.fence_proxy_async_shared()
    cuda.syncthreads()


@cuda.jit
def _bulk_kernel(G, chunks, out):
    """chunks[c] = (global byte offset, shared byte offset, bytes): thread c % blockDim issues chunk c, all
    expected by thread 0 in one phase; then everybody waits and copies the shared memory out."""
    sm = cuda.shared.array(SMEM_WORDS, np.uint32)
    bars = cuda.shared.array(1, np.uint64)
    t = cuda.threadIdx.x
    _poison_and_init_one_mbarrier(sm, SMEM_WORDS, bars)
    if t == 0:
        total = 0
        for c in range(chunks.shape[0]):
            total += chunks[c, 2]
        hopper.mbarrier_arrive_expect_tx(bars, 0, total)
    cuda.syncthreads()
    for c in range(t, chunks.shape[0], cuda.blockDim.x):
        hopper.cp_async_bulk_g2s(sm, chunks[c, 1], G, chunks[c, 0] // 4, chunks[c, 2], bars, 0)
    hopper.mbarrier_wait_parity(bars, 0, 0)
    for i in range(t, SMEM_WORDS, cuda.blockDim.x):
        out[i] = sm[i]


@needs_sm90
def test_cp_async_bulk_copies_every_chunk_before_the_phase_completes(rng):
    nchunks = 40
    sizes = 16 * rng.integers(1, 7, nchunks)                # 16 .. 96 bytes
    slots = rng.permutation(SMEM_WORDS * 4 // 128)[:nchunks]  # disjoint 128-byte destination slots
    dst = slots * 128 + 16 * rng.integers(0, 2, nchunks)
    src = 16 * rng.integers(0, 4096 // 16 - 6, nchunks)
    chunks = np.stack([src, dst, sizes], 1).astype(np.int64)
    G = rng.integers(0, 2**32 - 1, 1024, dtype=np.uint64).astype(np.uint32)
    out = np.full(SMEM_WORDS, U32_POISON, np.uint32)
    _, _, out = launch(_bulk_kernel, 1, WG, G, chunks, out)
    want = np.full(SMEM_WORDS, U32_POISON, np.uint32)
    for s, d, n in chunks:
        want[d // 4:(d + n) // 4] = G[s // 4:(s + n) // 4]
    np.testing.assert_array_equal(out, want)


PHASES = 5


@cuda.jit
def _pipeline_kernel(G, out, flags):
    """One mbarrier reused for PHASES phases, parity p & 1: thread 0 expects and copies tile p (256 bytes)
    into alternating buffers, everyone waits, checks it, and copies it out."""
    sm = cuda.shared.array(128, np.uint32)
    bars = cuda.shared.array(1, np.uint64)
    t = cuda.threadIdx.x
    if t == 0:
        hopper.mbarrier_init(bars, 0, 1)
        hopper.fence_mbarrier_init()
    cuda.syncthreads()
    for p in range(PHASES):
        flags[p, t, 0] = hopper.mbarrier_try_wait_parity(bars, 0, p & 1)        # False
        flags[p, t, 1] = hopper.mbarrier_try_wait_parity(bars, 0, (p + 1) & 1)  # True
        cuda.syncthreads()
        if t == 0:
            hopper.mbarrier_arrive_expect_tx(bars, 0, 256)
            hopper.cp_async_bulk_g2s(sm, (p % 2) * 256, G, p * 64, 256, bars, 0)
        hopper.mbarrier_wait_parity(bars, 0, p & 1)
        flags[p, t, 2] = hopper.mbarrier_try_wait_parity(bars, 0, p & 1)        # True
        if t < 64:
            out[p * 64 + t] = sm[(p % 2) * 64 + t]
        # nobody starts phase p + 1 before everyone has seen phase p complete (and read its buffer)
        cuda.syncthreads()


@needs_sm90
def test_mbarrier_reused_over_phases_with_parity(rng):
    G = rng.integers(0, 2**32 - 1, PHASES * 64, dtype=np.uint64).astype(np.uint32)
    out = np.full(PHASES * 64, U32_POISON, np.uint32)
    flags = np.full((PHASES, WG, 3), 7, np.uint8)
    _, out, flags = launch(_pipeline_kernel, 1, WG, G, out, flags)
    assert (flags == np.array([0, 1, 1], np.uint8)).all(), f"try_wait answers {np.unique(flags.reshape(-1, 3), axis=0)}"
    np.testing.assert_array_equal(out, G)


# ------------------------------------------------------------------------------------------------------
# cp.reduce.async.bulk: float32 additions from shared memory, in bulk groups
# ------------------------------------------------------------------------------------------------------

BULK_ROUNDS = 5
BULK_SLAB = 128                 # floats a warp adds per round (32 lanes x 4)
BULK_STAGING = 4 * BULK_SLAB    # two slabs per warp, two warps (a shared array's shape: a constant name)


@cuda.jit
def _bulk_reduce_kernel(vals, acc):
    """Two warps, each with two staging slabs it alternates between: in round r every lane stores its 4
    values of vals[r] into slab r % 2, lane 0 waits until at most one group (the other slab's) may still
    read its source, then adds the slab to acc[16 + 128 w ...] and, every other round, its first half also
    to acc[272 + 64 w ...]; it drains its groups before the block exits."""
    stg = cuda.shared.array(BULK_STAGING, np.float32)
    t = cuda.threadIdx.x
    lane, w = t % 32, t // 32
    for r in range(BULK_ROUNDS):
        base = (2 * w + r % 2) * BULK_SLAB
        if lane == 0:
            hopper.bulk_wait_group_read(1)          # the group that read this slab two rounds ago is done
        ptx.syncwarp()
        for i in range(4):
            stg[base + 4 * lane + i] = vals[r, t, i]
        hopper.fence_proxy_async_shared()
        ptx.syncwarp()
        if lane == 0:
            hopper.bulk_reduce_add_f32(acc, 16 + BULK_SLAB * w, stg, 4 * base, 4 * BULK_SLAB)
            if r % 2 == 0:
                hopper.bulk_reduce_add_f32(acc, 272 + 64 * w, stg, 4 * base, 2 * BULK_SLAB)
            hopper.bulk_commit_group()
    if lane == 0:
        hopper.bulk_wait_group(0)


@needs_sm90
def test_bulk_reduce_adds_each_slab_once_with_two_groups_in_flight(rng):
    # small integers: every order of the additions gives the same float32 sums
    vals = rng.integers(-1000, 1000, (BULK_ROUNDS, 64, 4)).astype(np.float32)
    acc0 = rng.integers(-1000, 1000, 416).astype(np.float32)
    _, acc = launch(_bulk_reduce_kernel, 1, 64, vals, acc0)
    want = acc0.astype(np.float64)
    for r in range(BULK_ROUNDS):
        for w in range(2):
            slab = vals[r, 32 * w:32 * w + 32].reshape(-1)
            want[16 + 128 * w:16 + 128 * w + 128] += slab
            if r % 2 == 0:
                want[272 + 64 * w:272 + 64 * w + 64] += slab[:64]
    np.testing.assert_array_equal(acc, want.astype(np.float32))


@cuda.jit
def _bulk_reduce_unwaited_kernel(acc):
    stg = cuda.shared.array(32, np.float32)
    t = cuda.threadIdx.x
    stg[t] = 1.0
    hopper.fence_proxy_async_shared()
    ptx.syncwarp()
    if t == 0:
        hopper.bulk_reduce_add_f32(acc, 0, stg, 0, 128)
        hopper.bulk_commit_group()
        hopper.bulk_reduce_add_f32(acc, 32, stg, 0, 128)     # never committed nor waited for


@sim_only
def test_bulk_reduce_twin_adds_only_groups_a_wait_covers():
    """The simulator performs a group's additions at the wait that covers it: a kernel that exits without
    waiting (on a GPU: shared memory released under a copy still reading it) adds nothing there."""
    acc, = launch(_bulk_reduce_unwaited_kernel, 1, 32, np.zeros(64, np.float32))
    assert not acc.any()


@sim_only
def test_bulk_reduce_twin_checks_alignment_and_bounds():
    @cuda.jit
    def bad(acc, which):
        stg = cuda.shared.array(64, np.float32)
        if cuda.threadIdx.x == 0:
            if which[0] == 0:
                hopper.bulk_reduce_add_f32(acc, 2, stg, 0, 16)       # global byte 8: not 16-byte aligned
            elif which[0] == 1:
                hopper.bulk_reduce_add_f32(acc, 0, stg, 4, 16)       # shared byte 4
            elif which[0] == 2:
                hopper.bulk_reduce_add_f32(acc, 0, stg, 0, 24)       # 24 bytes
            else:
                hopper.bulk_reduce_add_f32(acc, 60, stg, 0, 32)      # past the array's end
    for which, msg in enumerate(("global destination", "shared source", "multiple of 16", "outside")):
        with pytest.raises(Exception, match=msg):
            launch(bad, 1, 32, np.zeros(64, np.float32), np.array([which]))

# ------------------------------------------------------------------------------------------------------
# TMA: cp.async.bulk.tensor by tensor maps (tma.py encodes them: the driver on a GPU, its own format here)
# ------------------------------------------------------------------------------------------------------

TMA_WORDS = 4096                 # 16 KiB of shared destination past the first 1024-byte-aligned address
TMA_SMEM_WORDS = TMA_WORDS + 256  # and room to align it (a constant name: Numba types the shape from it)


@cuda.jit
def _tma_kernel(G, maps, boxes, out):
    """boxes[i] = (map, c0, c1, c2, c3, shared byte offset past the aligned start): thread 0 expects the
    boxes' bytes (boxes[0, 6] in total) and issues them; everyone waits, then the shared image is copied
    out."""
    sm = cuda.shared.array(TMA_SMEM_WORDS, np.uint32)
    bars = cuda.shared.array(1, np.uint64)
    t = cuda.threadIdx.x
    _poison_and_init_one_mbarrier(sm, TMA_SMEM_WORDS, bars)
    at = (1024 - hopper.shared_address(sm) % 1024) % 1024
    if t == 0:
        hopper.mbarrier_arrive_expect_tx(bars, 0, boxes[0, 6])
        for i in range(boxes.shape[0]):
            hopper.tma_load_4d(sm, at + boxes[i, 5], maps, boxes[i, 0], G, boxes[i, 1], boxes[i, 2],
                               boxes[i, 3], boxes[i, 4], bars, 0)
    hopper.mbarrier_wait_parity(bars, 0, 0)
    for i in range(t, TMA_WORDS, cuda.blockDim.x):
        out[i] = sm[at // 4 + i]


def _device_ptr(a):
    """Address of a device array's first element (the simulator's: its numpy array's)."""
    return a._ary.__array_interface__["data"][0] if SIMULATOR else a.__cuda_array_interface__["data"][0]


def _tma_reference(T, box, coords, swizzle):
    """The box of T (a (B, N, H, d) uint16 array) at coords (c0 column, c1 head, c2 row, c3 batch) as its
    shared image: rows of box[0] elements (b3 x b2 x b1 of them, zero bits outside T), then with a swizzle of
    S bytes each 16-byte chunk c of row r moved to chunk c ^ ((r * rowbytes // 128) % (S // 16)) -- the
    ISA's statement for 128 bytes (c ^ r % 8 in 8-row atoms), 64 (c ^ (r // 2) % 4) and 32 (c ^ (r // 4) % 2)."""
    B, N, H, d = T.shape
    b0, b1, b2, b3 = box
    img = np.zeros((b3, b2, b1, b0), np.uint16)
    for i3 in range(b3):
        for i2 in range(b2):
            for i1 in range(b1):
                x1, x2, x3 = coords[1] + i1, coords[2] + i2, coords[3] + i3
                if 0 <= x1 < H and 0 <= x2 < N and 0 <= x3 < B:
                    for i0 in range(b0):
                        x0 = coords[0] + i0
                        if 0 <= x0 < d:
                            img[i3, i2, i1, i0] = T[x3, x2, x1, x0]
    rows = img.reshape(-1, b0)
    if not swizzle:
        return rows.reshape(-1)
    cpr = b0 * 2 // 16
    out = np.empty_like(rows)
    for r in range(rows.shape[0]):
        for c in range(cpr):
            cc = c ^ ((r * b0 * 2 // 128) % (swizzle // 16))
            out[r, 8 * cc:8 * cc + 8] = rows[r, 8 * c:8 * c + 8]
    return out.reshape(-1)


@needs_sm90
def test_tma_load_4d_copies_boxes_swizzled_with_zeros_outside_the_tensor(rng):
    """Three tensor maps of one strided (B, N, H, d) tensor (rows padded, heads interleaved): boxes of
    64 / 32 / 16 columns with the 128 / 64 / 32-byte swizzles, some reaching past the last row, past the
    head dim and before row 0 (zeros there). On a GPU this checks tma.py's map layout and the simulator's
    swizzle against the hardware."""
    from numba_flash.kernels import tma
    B, N, H, d = 2, 37, 3, 56
    row_pad = 8                                                       # strides stay multiples of 16 bytes
    storage = rng.integers(0, 2**16, B * N * H * (d + row_pad), dtype=np.uint64).astype(np.uint16)
    T = np.lib.stride_tricks.as_strided(storage, (B, N, H, d),
                                        tuple(2 * x for x in (N * H * (d + row_pad), H * (d + row_pad),
                                                              d + row_pad, 1)))
    dev = cuda.to_device(storage)
    ptr = _device_ptr(dev)
    st = (2 * (d + row_pad), 2 * H * (d + row_pad), 2 * N * H * (d + row_pad))
    specs = [((64, 1, 32, 1), 128), ((32, 1, 16, 1), 64), ((16, 1, 8, 1), 32)]
    maps = [tma.encode(ptr, 2, (d, H, N, B), st, box, sw) for box, sw in specs]
    assert all(m is not None for m in maps)
    # (map, c0, c1, c2, c3, shared byte offset)
    boxes = [(0, 0, 1, 20, 1, 0), (0, 0, 2, 0, 0, 4096), (1, 32, 0, 30, 1, 8192), (2, 48, 2, -3, 1, 9216),
             (1, 0, 1, -5, 0, 10240)]
    want = np.full(TMA_WORDS * 2, 0xFFFF, np.uint16)
    total = 0
    for m, c0, c1, c2, c3, off in boxes:
        box, sw = specs[m]
        img = _tma_reference(T, box, (c0, c1, c2, c3), sw)
        want[off // 2:off // 2 + img.size] = img
        total += 2 * img.size
    arr = np.array([(*b, total) for b in boxes], np.int64)
    out = np.full(TMA_WORDS, U32_POISON, np.uint32)
    dmaps = cuda.to_device(np.concatenate(maps))
    dboxes, dout = cuda.to_device(arr), cuda.to_device(out)
    _tma_kernel[1, WG](dev, dmaps, dboxes, dout)
    np.testing.assert_array_equal(dout.copy_to_host().view(np.uint16), want)


def test_tma_encode_refuses_what_tma_cannot_express():
    """Strides or an address off 16 bytes, a box row wider than its swizzle: None (the kernels then copy by
    cp.async). Under the simulator tma.py checks these itself; on a GPU the driver refuses them."""
    from numba_flash.kernels import tma
    if not SIMULATOR and tma._driver_encode() is None:
        pytest.skip("no CUDA driver with cuTensorMapEncodeTiled")
    ok = dict(ptr=1 << 20, itemsize=2, dims=(64, 2, 100, 1), strides=(128, 256, 25600), box=(64, 1, 64, 1),
              swizzle=128)
    if not SIMULATOR:   # a real address for the driver
        keep = cuda.device_array(1 << 16, np.uint16)
        ok["ptr"] = _device_ptr(keep)
    assert tma.encode(**ok) is not None
    assert tma.encode(**{**ok, "strides": (136, 272, 27200)}) is None           # 136: not a multiple of 16
    assert tma.encode(**{**ok, "ptr": ok["ptr"] + 8}) is None
    assert tma.encode(**{**ok, "box": (128, 1, 64, 1)}) is None                # 256-byte rows, 128B swizzle


class _FakeDriver:
    """tma.MapSlots' driver calls, logged instead of made (the slots' hazard logic, without a GPU)."""

    def __init__(self):
        self.log, self.nevents, self.allocs = [], 0, 0

    def device_alloc(self, nbytes):
        self.allocs += 1
        return self.allocs << 20

    def host_alloc(self, nbytes):
        return np.zeros(nbytes // 8, np.uint64)

    def event(self):
        self.nevents += 1
        return self.nevents

    def copy_async(self, dst, view, stream):
        self.log.append(("copy", dst, stream, tuple(int(x) for x in view)))

    def record(self, ev, stream):
        self.log.append(("record", ev, stream))

    def wait_host(self, ev):
        self.log.append(("wait_host", ev))

    def stream_wait(self, stream, ev):
        self.log.append(("stream_wait", stream, ev))


def test_tma_map_slots_copy_in_stream_order_and_wait_only_across_streams():
    """A ring of 2 slots: new maps are copied asynchronously on the launch's stream into 64-byte aligned
    slots; on one stream nothing waits but a slot's host half for its previous copy; a launch on another
    stream waits for the copy (once); rewriting a slot another stream read first makes the copy's stream
    wait for that stream's work."""
    from numba_flash.kernels import tma
    drv = _FakeDriver()
    slots = tma.MapSlots(drv, 2)
    words = [np.arange(i, i + 32, dtype=np.uint64) for i in range(3)]
    s0, a0 = slots.put("a", words[0], 7)
    s1, a1 = slots.put("b", words[1], 7)
    assert (s0, s1) == (0, 1) and a1.ptr - a0.ptr == 384 and a0.ptr % 64 == 0 and a0.size == 32
    assert [e[0] for e in drv.log] == ["copy", "record", "copy", "record"]
    assert drv.log[0] == ("copy", 1 << 20, 7, tuple(range(32)))
    drv.log.clear()
    slots.use(s0, 7)
    assert drv.log == []                                   # same stream: ordered after the copy already
    slots.use(s1, 9)
    slots.use(s1, 9)
    assert drv.log == [("stream_wait", 9, slots.copied[1])]
    drv.log.clear()
    s2, a2 = slots.put("c", words[2], 7)                   # slot 0 again: only stream 7 read it
    assert s2 == 0 and a2.ptr == a0.ptr and slots.owner == ["c", "b"]
    assert drv.log == [("wait_host", slots.copied[0]), ("copy", 1 << 20, 7, tuple(range(2, 34))),
                       ("record", slots.copied[0], 7)]
    drv.log.clear()
    slots.put("d", words[0], 7)                            # slot 1, which stream 9 read
    assert drv.log[:3] == [("wait_host", slots.copied[1]), ("record", slots.cross, 9),
                           ("stream_wait", 7, slots.cross)]
    assert drv.log[3][0] == "copy" and drv.log[3][1] == (1 << 20) + 384


def test_tma_device_maps_copy_new_maps_once_and_again_after_their_slot_is_reused(monkeypatch):
    """device_maps on a GPU (its driver and encoder stood in for): the same specs give the same slot with
    no second copy; once the ring has come round the answer is copied anew; specs TMA cannot express give
    None without a copy."""
    from numba_flash.kernels import tma
    drv = _FakeDriver()
    monkeypatch.setattr(tma, "SIMULATOR", False)
    monkeypatch.setattr(tma, "_cache", {})
    monkeypatch.setattr(tma, "_slots", {0: tma.MapSlots(drv, 2)})
    monkeypatch.setattr(tma, "encode", lambda ptr, *a: None if ptr < 0 else np.full(16, ptr, np.uint64))
    spec = [((p, (64, 1, 10, 1), (128, 128, 1280), (64, 1, 64, 1), 128),) for p in range(3)]
    copies = lambda: sum(e[0] == "copy" for e in drv.log)      # noqa: E731
    first = tma.device_maps(spec[0], 0, 5)
    assert copies() == 1 and tma.device_maps(spec[0], 0, 5) is first and copies() == 1
    tma.device_maps(spec[1], 0, 5)
    tma.device_maps(spec[2], 0, 5)                         # takes slot 0 from spec[0]
    again = tma.device_maps(spec[0], 0, 5)
    assert copies() == 4 and again.ptr == first.ptr + 384          # spec[0] now in slot 1
    assert tma.device_maps(((-1, (64, 1, 10, 1), (128, 128, 1280), (64, 1, 64, 1), 128),), 0, 5) is None
    assert copies() == 4


def test_tma_maps_captured_in_a_cuda_graph_get_slots_the_ring_never_reuses(monkeypatch):
    """While the launch's stream is being captured, device_maps answers from the captured slots: one per
    map set (the same set, the same slot, its copy added to each capture), no event calls (a capture
    forbids waiting), the ring untouched; eager calls after it never rewrite those slots; a capture before
    any call, or more sets than CAPTURE_SLOTS, is a RuntimeError saying what to do."""
    from numba_flash.kernels import tma
    drv = _FakeDriver()
    monkeypatch.setattr(tma, "SIMULATOR", False)
    monkeypatch.setattr(tma, "CAPTURE_SLOTS", 2)
    monkeypatch.setattr(tma, "_cache", {})
    monkeypatch.setattr(tma, "_slots", {})
    monkeypatch.setattr(tma, "_cuda_driver", lambda: drv)
    monkeypatch.setattr(tma, "encode", lambda ptr, *a: np.full(16, ptr, np.uint64))
    capture = [True]
    monkeypatch.setattr(tma, "_capturing", lambda: capture[0])
    spec = [((p, (64, 1, 10, 1), (128, 128, 1280), (64, 1, 64, 1), 128),) for p in range(1, 5)]
    with pytest.raises(RuntimeError, match="run a call once"):
        tma.device_maps(spec[0], 0, 5)
    capture[0] = False
    tma.device_maps(spec[3], 0, 5)                         # the warm-up call makes the slots
    slots = tma._slots[0]
    drv.log.clear()
    capture[0] = True
    a, b = tma.device_maps(spec[0], 0, 5), tma.device_maps(spec[0], 0, 5)
    c = tma.device_maps(spec[1], 0, 5)
    assert a.ptr == b.ptr == slots.capture_base and c.ptr == slots.capture_base + 384
    assert [e[0] for e in drv.log] == ["copy"] * 3 and drv.log[0][3] == (1,) * 16
    assert slots.owner[1:] == [None] * (slots.n - 1)
    with pytest.raises(RuntimeError, match="captured 2 different sets"):
        tma.device_maps(spec[2], 0, 5)
    capture[0] = False
    for sp in spec * 3:
        tma.device_maps(sp, 0, 5)
    assert all(e[1] < slots.capture_base for e in drv.log[3:] if e[0] == "copy")
    assert list(slots.capture_host[:16]) == [1] * 16 and list(slots.capture_host[48:64]) == [2] * 16


@cuda.jit
def _misaligned_bulk_kernel(G, out):
    sm = cuda.shared.array(64, np.uint32)
    bars = cuda.shared.array(1, np.uint64)
    hopper.mbarrier_init(bars, 0, 1)
    hopper.cp_async_bulk_g2s(sm, 8, G, 0, 16, bars, 0)


@cuda.jit
def _uninit_kernel(G, out):
    bars = cuda.shared.array(1, np.uint64)
    hopper.mbarrier_arrive(bars, 0)


@cuda.jit
def _deadlock_kernel(G, out):
    bars = cuda.shared.array(1, np.uint64)
    if cuda.threadIdx.x == 0:
        hopper.mbarrier_init(bars, 0, 1)
    cuda.syncthreads()
    hopper.mbarrier_wait_parity(bars, 0, 0)         # nobody arrives


@cuda.jit
def _spin_deadlock_kernel(G, out):
    bars = cuda.shared.array(1, np.uint64)
    if cuda.threadIdx.x == 0:
        hopper.mbarrier_init(bars, 0, 1)
    cuda.syncthreads()
    if cuda.threadIdx.x % 2:
        while not hopper.mbarrier_try_wait_parity(bars, 0, 0):     # nobody arrives
            pass
    else:
        cuda.syncthreads()


@sim_only
@pytest.mark.parametrize("kernel,exc,match", [
    (_misaligned_bulk_kernel, ValueError, "not 16-byte aligned"),
    (_uninit_kernel, RuntimeError, "not initialised"),
    (_deadlock_kernel, RuntimeError, "deadlocked"),
    (_spin_deadlock_kernel, RuntimeError, "deadlocked"),
], ids=["misaligned-bulk-copy", "uninitialised-mbarrier", "deadlock", "polling-deadlock"])
def test_sim_mbarrier_misuse_fails_fast(kernel, exc, match):
    import time
    t = time.monotonic()
    with pytest.raises(exc, match=match):
        kernel[1, 32](np.zeros(64, np.uint32), np.zeros(1, np.uint32))
    assert time.monotonic() - t < 10


def _slow_arrival_kernel(bars_out, rounds, pause):
    """Thread 0 waits for phase 0 of mbarrier 0; thread 1 first completes `rounds` phases of mbarrier 1,
    one every `pause` seconds (host time: the simulator runs this as Python), then arrives at mbarrier 0."""
    bars = cuda.shared.array(2, np.uint64)
    t = cuda.threadIdx.x
    if t == 0:
        hopper.mbarrier_init(bars, 0, 1)
        hopper.mbarrier_init(bars, 1, 1)
    cuda.syncthreads()
    if t == 0:
        hopper.mbarrier_wait_parity(bars, 0, 0)
        bars_out[0] = 1
    else:
        for _ in range(rounds):
            time.sleep(pause)
            hopper.mbarrier_arrive(bars, 1)
        time.sleep(pause)
        hopper.mbarrier_arrive(bars, 0)


@sim_only
def test_sim_mbarrier_wait_times_out_only_without_progress(monkeypatch):
    """The simulator's last-resort time-out counts from the block's last completed barrier phase: a wait
    longer than NUMBA_FLASH_SIMWARP_TIMEOUT while other barriers keep completing is no hang (a loaded test
    run, one warpgroup computing a tile in Python while the other waits), a wait with none is."""
    from numba_flash.kernels import simwarp
    kern = cuda.jit(_slow_arrival_kernel)
    monkeypatch.setattr(simwarp, "TIMEOUT_S", 1.0)
    out = np.zeros(1, np.uint32)
    kern[1, 2](out, 6, 0.4)            # waits ~2.8 s, a phase completes every 0.4 s
    assert out[0] == 1
    t = time.monotonic()
    with pytest.raises(RuntimeError, match="no other barrier of the block completed a phase"):
        kern[1, 2](np.zeros(1, np.uint32), 0, 3.0)
    assert time.monotonic() - t < 10


# ------------------------------------------------------------------------------------------------------
# setmaxnreg
# ------------------------------------------------------------------------------------------------------

# ptxas applies setmaxnreg only when it knows the register count at entry, i.e. with launch bounds that
# include a minimum block count: (384, 1) gives 168 registers, exactly 40 x 128 + 232 x 256, the split of a
# producer warpgroup and two consumer warpgroups.
_jit_384 = cuda.jit if SIMULATOR else cuda.jit(launch_bounds=(384, 1))


@_jit_384
def _maxnreg_kernel(x, out):
    t = cuda.threadIdx.x
    if t < 128:
        hopper.setmaxnreg_dec(40)
        out[t] = x[t] + 1.0
    else:
        hopper.setmaxnreg_inc(232)
        out[t] = x[t] * 2.0


@needs_sm90a
def test_setmaxnreg_producer_consumer_split(rng):
    x = rng.standard_normal(384).astype(np.float32)
    _, out = launch(_maxnreg_kernel, 2, 384, x, np.full(384, np.nan, np.float32))
    np.testing.assert_array_equal(out, np.where(np.arange(384) < 128, x + 1, x * 2).astype(np.float32))


@sim_only
def test_sim_setmaxnreg_rejects_invalid_counts():
    with pytest.raises(ValueError, match="multiple of 8"):
        hopper.setmaxnreg_inc(100)
    with pytest.raises(ValueError, match="multiple of 8"):
        hopper.setmaxnreg_dec(16)


# ------------------------------------------------------------------------------------------------------
# GPU code generation: every intrinsic compiles (NVVM, sm_90a), assembles (ptxas) and becomes the expected
# SASS -- without a GPU
# ------------------------------------------------------------------------------------------------------

_CODEGEN = textwrap.dedent('''
    import sys
    import numpy as np
    from numba import cuda, types
    from numba_flash.kernels import hopper as H

    N128 = 128
    N256 = 256
    N64 = 64

    def k(imgA, Cf, Df, G, A32):
        sa = cuda.shared.array(8192, np.uint32)
        bars = cuda.shared.array(2, np.uint64)
        t = cuda.threadIdx.x
        pa = ((1024 - H.shared_address(sa) % 1024) % 1024) // 4
        if t == 0:
            H.mbarrier_init(bars, 0, 1)
            H.mbarrier_init(bars, 1, 1)
            H.fence_mbarrier_init()
        for i in range(t, imgA.size, 128):
            sa[pa + i] = imgA[i]
        H.fence_proxy_async_shared()
        cuda.syncthreads()
        if t == 0:
            H.mbarrier_arrive_expect_tx(bars, 0, 64)
            H.cp_async_bulk_g2s(sa, pa * 4 + 16384, G, 0, 64, bars, 0)
            H.mbarrier_expect_tx(bars, 1, 16)
            H.mbarrier_arrive(bars, 1)
        H.mbarrier_wait_parity(bars, 0, 0)
        ok = H.mbarrier_try_wait_parity(bars, 1, 0)
        da = H.make_smem_desc(sa, pa * 4, 16, 1024, 1)
        db = H.make_smem_desc(sa, pa * 4 + 16384, 16, 1024, 1)
        acc = H.wgmma_acc_load(Cf, t * 64, N128)
        acc = H.wgmma_fence_operand(acc)
        H.wgmma_fence()
        acc = H.wgmma_f16(da, db, acc, 1, 0, 0)
        acc = H.wgmma_f16(da + 2, db + 2, acc, 1, 1, 1)
        acc = H.wgmma_bf16(da, db, acc, 1, 0, 1)
        a0, a1, a2, a3 = H.wgmma_fence_a(A32[t * 4], A32[t * 4 + 1], A32[t * 4 + 2], A32[t * 4 + 3])
        acc = H.wgmma_f16_rs(a0, a1, a2, a3, db, acc, 1, 1)
        acc = H.wgmma_bf16_rs(A32[t * 4], A32[t * 4 + 1], A32[t * 4 + 2], A32[t * 4 + 3], db, acc, 1, 0)
        H.wgmma_commit_group()
        z = H.wgmma_acc_zeros(N256)
        z = H.wgmma_f16(da, db, z, 0, 0, 0)
        y = H.wgmma_acc_zeros(N64)
        y = H.wgmma_bf16(da, db, y, 0, 0, 0)
        H.wgmma_commit_group()
        H.wgmma_wait_group(1)
        acc = H.wgmma_fence_operand(acc)
        H.wgmma_acc_store(Df, t * 64, acc)
        H.wgmma_wait_group(0)
        z = H.wgmma_fence_operand(z)
        y = H.wgmma_fence_operand(y)
        H.wgmma_acc_store(Df, 8192 + t * 128, z)
        H.wgmma_acc_store(Df, 3 * 8192 + t * 32, y)
        if ok:
            Df[0] = 1.0

    try:
        from numba.cuda.cudadrv.nvvm import NVVM
        NVVM()
        from numba.cuda.cudadrv.nvrtc import get_supported_ccs
        get_supported_ccs()
    except Exception as exc:   # no libNVVM / libNVRTC here: nothing to check
        print("SKIP: no CUDA compiler libraries (NVVM and NVRTC):", str(exc).splitlines()[0][:200])
        sys.exit(3)

    # and the runtime tests' own kernels, as a cc 9.0 GPU will compile them
    sys.path.insert(0, sys.argv[2])
    import test_hopper as th
    u32, i64, f32 = types.uint32[::1], types.int64[::1], types.float32[::1]
    flags2, flags3 = types.uint8[:, ::1], types.uint8[:, :, ::1]
    wg = (u32, u32, u32, i64, i64, i64, f32, f32)
    kernels = [
        ("k", k, (u32, f32, f32, types.uint8[::1], u32), None),
        ("wg_f16_n64", th.wgmma_kernel("float16", 64, 0, 0, 64, 2048, 2048).py_func, wg, None),
        ("wg_bf16_n256_tb", th.wgmma_kernel("bfloat16", 256, 1, 1, 64, 2048, 8192).py_func, wg, None),
        ("wg_rs_f16_n128_tb", th.wgmma_kernel("float16", 128, 0, 1, 64, 1, 4096, a_regs=True).py_func, wg, None),
        ("desc", th._desc_kernel.py_func, (types.int64[:, ::1], types.uint64[::1], u32), None),
        ("arrivals", th._arrivals_kernel.py_func, (flags2,), None),
        ("tx", th._tx_kernel.py_func, (u32, u32, flags2), None),
        ("bulk", th._bulk_kernel.py_func, (u32, types.int64[:, ::1], u32), None),
        ("pipeline", th._pipeline_kernel.py_func, (u32, u32, flags3), None),
        ("maxnreg", th._maxnreg_kernel.py_func, (f32, f32), (384, 1)),
        ("pingpong", th._pingpong_kernel.py_func, (types.int32[::1],), None),
    ]
    # cc (9, 0, "a"): the architecture-specific target sm_90a that wgmma and setmaxnreg need (a cc 9.0
    # device gets it by default; compile_ptx without a device needs it spelled out)
    # Device functions (the tests' shared prologues) compile for the current device when typed: give
    # numba one without a driver, as tools/ptx_report.py does.
    import numba.cuda.dispatcher as disp

    class _Device:
        compute_capability = (9, 0)

    disp.get_current_device = lambda: _Device()
    for name, fn, args, bounds in kernels:
        text, _ = cuda.compile_ptx(fn, args, cc=(9, 0, "a"), launch_bounds=bounds)
        with open(f"{sys.argv[1]}/{name}.ptx", "w") as f:
            f.write(text)
''')

_EXPECTED = {  # kernel: (PTX substrings, SASS substrings)
    "k": ([".target sm_90a",
           "wgmma.fence.sync.aligned;", "wgmma.commit_group.sync.aligned;", "wgmma.wait_group.sync.aligned 1;",
           "wgmma.wait_group.sync.aligned 0;", "fence.proxy.async.shared::cta;",
           "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16",
           "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16",
           "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16",
           "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16",
           "mbarrier.init.shared::cta.b64", "fence.mbarrier_init.release.cluster;",
           "mbarrier.arrive.shared::cta.b64", "mbarrier.arrive.expect_tx.shared::cta.b64",
           "mbarrier.expect_tx.relaxed.cta.shared::cta.b64", "mbarrier.try_wait.parity.shared::cta.b64",
           "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes"],
          ["HGMMA.64x128x16.F32", "HGMMA.64x128x16.F32.BF16", "HGMMA.64x256x16.F32", "HGMMA.64x64x16.F32.BF16",
           "UBLKCP", "SYNCS.EXCH.64", "SYNCS.ARRIVE.TRANS64", "SYNCS.PHASECHK.TRANS64", "WARPGROUP.ARRIVE",
           "WARPGROUP.DEPBAR"]),
    "wg_f16_n64": (["m64n64k16.f32.f16.f16", "p, 1, 1, 0, 0;"], ["HGMMA.64x64x16.F32"]),
    "wg_bf16_n256_tb": (["m64n256k16.f32.bf16.bf16", "p, 1, 1, 1, 1;"], ["HGMMA.64x256x16.F32.BF16"]),
    "wg_rs_f16_n128_tb": (["m64n128k16.f32.f16.f16", "p, 1, 1, 1;"], ["HGMMA.64x128x16.F32"]),
    "desc": ([".target sm_90a"], []),
    "arrivals": (["mbarrier.arrive.shared::cta.b64", "mbarrier.try_wait.parity.shared::cta.b64"],
                 ["SYNCS.PHASECHK.TRANS64"]),
    "tx": (["mbarrier.expect_tx", "cp.async.bulk.shared::cluster.global"], ["UBLKCP"]),
    "bulk": (["cp.async.bulk.shared::cluster.global"], ["UBLKCP"]),
    "pipeline": (["cp.async.bulk.shared::cluster.global"], ["UBLKCP"]),
    "maxnreg": (["setmaxnreg.dec.sync.aligned.u32 40;", "setmaxnreg.inc.sync.aligned.u32 232;"], ["USETMAXREG"]),
    "pingpong": (["bar.sync", "bar.arrive"], ["BAR.SYNC", "BAR.ARV"]),
}


def _nvidia_tool(name):
    """A CUDA tool from the NVIDIA wheels (the toolkit of the NVVM in use) or the PATH."""
    import glob
    found = []
    try:
        import nvidia
        for root in nvidia.__path__:
            found += sorted(glob.glob(os.path.join(root, "*", "bin", name)))
    except ImportError:
        pass
    found.append(shutil.which(name))
    return next((p for p in found if p and os.path.exists(p)), None)


def test_gpu_codegen_assembles_for_sm90a(tmp_path):
    """A kernel using every intrinsic, and the runtime tests' kernels, compile with NVVM for sm_90a (in a
    child without the simulator: compile_ptx needs no GPU), contain each instruction, assemble with
    ptxas -arch=sm_90a and, where cuobjdump is found, become HGMMA / UBLKCP / SYNCS / USETMAXREG SASS."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    r = subprocess.run([sys.executable, "-c", _CODEGEN, str(tmp_path), os.path.dirname(os.path.abspath(__file__))],
                       env=env, capture_output=True, text=True, timeout=600)
    if r.returncode == 3:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, r.stdout + r.stderr
    for name, (ptx_ops, _) in _EXPECTED.items():
        text = (tmp_path / f"{name}.ptx").read_text()
        missing = [ins for ins in [".target sm_90a"] + ptx_ops if ins not in text]
        assert not missing, f"{name}: missing from the PTX: {missing}"
    ptxas = _nvidia_tool("ptxas")
    if ptxas is None:
        pytest.skip("PTX generated and checked; no ptxas to assemble it")
    objdump = _nvidia_tool("cuobjdump")
    sass_checked = False
    for name, (_, sass_ops) in _EXPECTED.items():
        ptx, cubin = tmp_path / f"{name}.ptx", tmp_path / f"{name}.cubin"
        a = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(ptx), "-o", str(cubin)], capture_output=True,
                           text=True, timeout=120)
        if "Unsupported .version" in a.stderr:
            pytest.skip(f"{ptxas} is older than the NVVM that wrote the PTX")
        assert a.returncode == 0, f"ptxas -arch=sm_90a {name}:\n{a.stderr}"
        # ptxas drops setmaxnreg with an info line when it cannot tell the register count at entry, and
        # serialises wgmma when the pipeline is ill-formed: neither may happen here
        assert "ignored" not in a.stderr and "serialized" not in a.stderr, f"{name}:\n{a.stderr}"
        if objdump:
            # cuobjdump prints SASS through nvdisasm, which it looks for beside itself or on PATH
            e = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(objdump), os.environ.get("PATH", "")]))
            d = subprocess.run([objdump, "-sass", str(cubin)], capture_output=True, text=True, env=e, timeout=120)
            if d.returncode == 0 and re.search(r"/\*[0-9a-f]{4}\*/", d.stdout):     # instruction offsets
                missing = [op for op in sass_ops if op not in d.stdout]
                assert not missing, f"{name}: missing from the SASS: {missing}"
                sass_checked = True
    if objdump and not sass_checked:
        pytest.skip("PTX checked and assembled; cuobjdump printed no SASS")


# ------------------------------------------------------------------------------------------------------
# named barriers (bar.sync / bar.arrive): the ping-pong of two groups of warps
# ------------------------------------------------------------------------------------------------------

PING_ROUNDS = 5


@cuda.jit
def _pingpong_kernel(log):
    """Two groups (warps 0-1, warps 2-3) take turns: group g waits at barrier 1 + g (its own 64 threads
    plus the other group's arrival), writes its turn, arrives at the other group's barrier. Group 1 lets
    group 0 go first and skips its last arrival, so every barrier phase completes."""
    turn = cuda.shared.array(1, np.int32)
    t = cuda.threadIdx.x
    g = t // 64
    if t == 0:
        turn[0] = 0
    cuda.syncthreads()
    if g == 1:
        hopper.named_barrier_arrive(1, 128)
    for r in range(PING_ROUNDS):
        hopper.named_barrier_sync(1 + g, 128)
        k = turn[0]
        hopper.named_barrier_sync(3 + g, 64)        # every thread of the group has read the turn
        if t % 64 == 0:
            log[k] = g * 100 + r
            turn[0] = k + 1
        if g == 0 or r < PING_ROUNDS - 1:
            hopper.named_barrier_arrive(2 - g, 128)


def test_named_barriers_alternate_two_groups_strictly():
    log = np.full(2 * PING_ROUNDS, -1, np.int32)
    log, = launch(_pingpong_kernel, 1, 128, log)
    want = np.array([g * 100 + r for r in range(PING_ROUNDS) for g in (0, 1)], np.int32)
    np.testing.assert_array_equal(log, want)


@sim_only
def test_named_barrier_twin_reports_a_deadlock_and_bad_arguments():
    @cuda.jit
    def stuck(out):
        if cuda.threadIdx.x < 32:
            hopper.named_barrier_sync(1, 64)    # the other warp never arrives
        out[0] = 1

    @cuda.jit
    def bad(out):
        hopper.named_barrier_sync(0, 32)
        out[0] = 1

    with pytest.raises(RuntimeError, match="deadlocked.*named barrier 1"):
        stuck[1, 64](np.zeros(1, np.int32))
    with pytest.raises(ValueError, match="barrier 0 outside"):
        bad[1, 32](np.zeros(1, np.int32))
