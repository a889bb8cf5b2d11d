"""SIMT path: fp32 arithmetic on CUDA cores. Tile loads, register-blocked micro-GEMMs, and the path's
`TileOps` (the contract forward.py / backward.py are written against, shared with tc_tiles.py).

Every tile lives in shared memory row-major, `rows x ld` with the head dim (or the key/query index) along
the row, so no tile is ever transposed: both products the attention passes need are of two shapes,

    mm_nt:  C[r, c] += sum_k A[r, k] * B[c, k]     (S = Q K^T, dP = dO V^T, S^T = K Q^T, dP^T = V dO^T)
    mm_nn:  C[r, n] += sum_k A[r, k] * B[k, n]     (O += P V, dV += P^T dO, dK += dS^T Q, dQ += dS K)

A thread (ty, tx) owns rows r = ty + i*TY (i < TM) of C. In mm_nt it owns columns c = tx + j*TX (j < TN);
in mm_nn it owns the DPT consecutive columns n = tx*DPT + m, so its B reads are contiguous (the SIMT
fragment of fragments.py). The k loop reads 4 consecutive values of each row it needs (16-byte shared
loads) and does 4*TM*TN multiply-adds with them from registers. Scores go through shared memory (a P
staging tile) on their way into mm_nn.

Row strides `ld` are odd multiples of 4 words: rows tx and tx+1 then start 4 banks apart, so the 16-byte
reads of a half-warp's 16 different rows hit every bank exactly twice (the minimum for 256 bytes), and
the two thread rows of a warp read rows in disjoint banks.

All loops run over closure constants, so NVVM unrolls them and the micro-tiles stay in registers.
"""
import math
from functools import lru_cache

from numba import cuda, float64, uint32

from .convert import acc_type, loader
from .fragments import TileOps, simt_fragment

from .launch import inline_device
from .ptx import ld1, ld2, ld4, st1, st4


@lru_cache(maxsize=None)
def make_load4(acc):
    """Four consecutive shared-memory elements in 16-byte loads (one v4.f32, or two v2.f64)."""
    if acc != float64:
        return ld4

    @inline_device
    def load4(smem, idx):
        a0, a1 = ld2(smem, idx)
        a2, a3 = ld2(smem, idx + 2)
        return a0, a1, a2, a3

    return load4


def row_stride(width):
    """Smallest row stride >= width that is an odd multiple of 4 words (see the module docstring)."""
    ld = -(-width // 4) * 4
    if (ld // 4) % 2 == 0:
        ld += 4
    return ld


@lru_cache(maxsize=None)
def make_row_loader(rows, width, valid_width, ld, nthreads, load_elem, acc, vec_global=False):
    """load(smem, off, g, base, row0, nrows_valid, stride_row, tid): smem[off + r*ld + c] = g[...] as `acc`.

    Reads rows row0 .. row0+rows-1 of a (seqlen, width) slab of `g` starting at element `base` with row
    stride `stride_row` (the head dim is contiguous). Rows past `nrows_valid` and columns past `valid_width`
    are zero-filled: the products then need no bounds tests, and unwritten shared memory never reaches a
    result. Consecutive threads take consecutive columns, so global reads are coalesced.

    With `vec_global` (the dispatcher checked that every row starts 4-element aligned and valid_width is
    a multiple of 4) each thread moves 4 consecutive elements: one 16-byte (fp32) or 8-byte (16-bit)
    global load and one 16-byte shared store instead of four of each.
    """
    if vec_global:
        assert valid_width % 4 == 0 and width % 4 == 0 and acc != float64  # 4 doubles exceed 16 bytes
        chunks_per_row = width // 4
        total = rows * chunks_per_row
        steps = -(-total // nthreads)
        zero = acc(0)

        @inline_device
        def load_vec(smem, off, g, base, row0, nrows_valid, stride_row, tid):
            for s in range(steps):
                idx = tid + s * nthreads
                if total % nthreads == 0 or idx < total:
                    r = idx // chunks_per_row
                    c = (idx - r * chunks_per_row) * 4
                    v0 = zero
                    v1 = zero
                    v2 = zero
                    v3 = zero
                    if r < nrows_valid and c < valid_width:
                        x0, x1, x2, x3 = ld4(g, base + (row0 + r) * stride_row + c)
                        v0 = load_elem(x0)
                        v1 = load_elem(x1)
                        v2 = load_elem(x2)
                        v3 = load_elem(x3)
                    st4(smem, off + r * ld + c, (v0, v1, v2, v3))

        return load_vec

    total = rows * width
    assert total % nthreads == 0
    steps = total // nthreads

    @inline_device
    def load(smem, off, g, base, row0, nrows_valid, stride_row, tid):
        for s in range(steps):
            idx = tid + s * nthreads
            r = idx // width
            c = idx - r * width
            val = acc(0)
            if r < nrows_valid and c < valid_width:
                val = load_elem(ld1(g, base + (row0 + r) * stride_row + c))
            st1(smem, off + r * ld + c, val)

    return load


@lru_cache(maxsize=None)
def make_mm_nt(tm, tn, ty_count, tx_count, kdim, lda, ldb, acc):
    """mm(smem, offA, offB, C, ty, tx): C[i, j] += sum_k A[ty + i*TY, k] * B[tx + j*TX, k]."""
    assert kdim % 4 == 0
    load4 = make_load4(acc)

    @inline_device
    def mm(smem, off_a, off_b, c, ty, tx):
        a = cuda.local.array((tm, 4), acc)
        b = cuda.local.array((tn, 4), acc)
        for k0 in range(0, kdim, 4):
            for i in range(tm):
                a[i, 0], a[i, 1], a[i, 2], a[i, 3] = load4(smem, off_a + (ty + i * ty_count) * lda + k0)
            for j in range(tn):
                b[j, 0], b[j, 1], b[j, 2], b[j, 3] = load4(smem, off_b + (tx + j * tx_count) * ldb + k0)
            for kk in range(4):
                for i in range(tm):
                    for j in range(tn):
                        c[i, j] += a[i, kk] * b[j, kk]

    return mm


@lru_cache(maxsize=None)
def make_mm_nn(tm, npt, ty_count, kdim, lda, ldb, acc):
    """mm(smem, offA, offB, C, ty, tx): C[i, m] += sum_k A[ty + i*TY, k] * B[k, tx*NPT + m]."""
    assert kdim % 4 == 0
    load4 = make_load4(acc)
    # B's row segment of npt elements: 16-byte loads where npt allows (it is a multiple of 4 for head dims
    # that are multiples of 64 with 16 thread columns), else 8-byte, else scalar.
    vec = 4 if npt % 4 == 0 else (2 if npt % 2 == 0 and acc != float64 else 1)

    @inline_device
    def mm(smem, off_a, off_b, c, ty, tx):
        a = cuda.local.array((tm, 4), acc)
        b = cuda.local.array(npt, acc)
        col = off_b + tx * npt
        for k0 in range(0, kdim, 4):
            for i in range(tm):
                a[i, 0], a[i, 1], a[i, 2], a[i, 3] = load4(smem, off_a + (ty + i * ty_count) * lda + k0)
            for kk in range(4):
                brow = col + (k0 + kk) * ldb
                if vec == 4:
                    for m in range(0, npt, 4):
                        b[m], b[m + 1], b[m + 2], b[m + 3] = load4(smem, brow + m)
                elif vec == 2:
                    for m in range(0, npt, 2):
                        b[m], b[m + 1] = ld2(smem, brow + m)
                else:
                    for m in range(npt):
                        b[m] = ld1(smem, brow + m)
                for i in range(tm):
                    for m in range(npt):
                        c[i, m] += a[i, kk] * b[m]

    return mm


@lru_cache(maxsize=None)
def make_vector_loader(rows, nthreads, acc):
    """load(smem, off, g, base, row0, nrows_valid, tid): smem[off + r] = g[base + row0 + r], 0 past the end."""
    steps = -(-rows // nthreads)

    @inline_device
    def load(smem, off, g, base, row0, nrows_valid, tid):
        for s in range(steps):
            r = tid + s * nthreads
            if r < rows:
                val = acc(0)
                if r < nrows_valid:
                    val = acc(g[base + row0 + r])
                st1(smem, off + r, val)

    return load


def _noop():
    pass


noop = inline_device(_noop)


@lru_cache(maxsize=None)
def make_simt_ops(role, tiles, headdim, dtype_name, vec_global):
    """TileOps (fragments.py) of the SIMT path for one kernel role: "fwd" (resident Q; streams K, V),
    "dq" (resident Q, dO; streams K, V) or "dkdv" (resident K, V; streams Q, dO and lse, D)."""
    BM, BN = (tiles.bc, tiles.br) if role == "dkdv" else (tiles.br, tiles.bc)
    TY, TX = tiles.ty, tiles.tx
    NT = TY * TX
    TM, TN = BM // TY, BN // TX
    DP = tiles.padded_headdim(headdim)
    DPT = DP // TX
    ACC = acc_type(dtype_name)
    load_elem = loader(dtype_name)
    LD = row_stride(DP)            # resident and streamed tiles: rows x LD
    LDP = row_stride(BN)           # P staging tile (P, P^T, dS, dS^T): BM x LDP
    NA = 1 if role == "fwd" else 2
    OFF_B = NA * BM * LD
    # Forward: when P fits where K was, it goes there (K is dead once S is computed); the smaller
    # footprint lets two blocks share an SM (d=128: 101 KiB instead of 118).
    P_OVER_K = role == "fwd" and BM * LDP <= BN * LD
    OFF_P = OFF_B if P_OVER_K else OFF_B + 2 * BN * LD
    OFF_VEC = OFF_B + 2 * BN * LD if P_OVER_K else OFF_P + BM * LDP
    WORDS = OFF_VEC + (2 * BN if role == "dkdv" else 0)
    WORD_BYTES = 8 if dtype_name == "float64" else 4

    load_a = make_row_loader(BM, DP, headdim, LD, NT, load_elem, ACC, vec_global)
    load_b = make_row_loader(BN, DP, headdim, LD, NT, load_elem, ACC, vec_global)
    load_v = make_vector_loader(BN, NT, ACC)
    mm_nt_ = make_mm_nt(TM, TN, TY, TX, DP, LD, LD, ACC)
    mm_nn_ = make_mm_nn(TM, DPT, TY, BN, LDP, LD, ACC)

    @inline_device
    def load_resident(smem, afrag, slot, g, base, row0, nrows, stride, tid):
        load_a(smem, slot * BM * LD, g, base, row0, nrows, stride, tid)

    @inline_device
    def resident_ready(smem, afrag, tid):
        return   # the first streamed tile's barriers order the resident tile's stores

    if role == "dkdv":
        @inline_device
        def stream(smem, stage, t0, n_other, operands, tid):
            g0, b0, s0, g1, b1, s1, v0, vb0, v1, vb1 = operands[0:10]
            load_b(smem, OFF_B, g0, b0, t0, n_other - t0, s0, tid)
            load_b(smem, OFF_B + BN * LD, g1, b1, t0, n_other - t0, s1, tid)
            load_v(smem, OFF_VEC, v0, vb0, t0, n_other - t0, tid)
            load_v(smem, OFF_VEC + BN, v1, vb1, t0, n_other - t0, tid)
    else:
        @inline_device
        def stream(smem, stage, t0, n_other, operands, tid):
            g0, b0, s0, g1, b1, s1 = operands[0:6]
            load_b(smem, OFF_B, g0, b0, t0, n_other - t0, s0, tid)
            load_b(smem, OFF_B + BN * LD, g1, b1, t0, n_other - t0, s1, tid)

    @inline_device
    def vec(smem, stage, which, idx):
        return ld1(smem, OFF_VEC + which * BN + idx)

    @inline_device
    def mm_nt(smem, afrag, a_slot, stage, b_slot, c, tid):
        mm_nt_(smem, a_slot * BM * LD, OFF_B + b_slot * BN * LD, c, tid // TX, tid % TX)

    @inline_device
    def mm_pv(smem, p, stage, b_slot, acc, tid, lead_sync):
        ty = tid // TX
        tx = tid % TX
        if lead_sync or P_OVER_K:
            cuda.syncthreads()   # every thread is done reading the buffer P is about to overwrite
        for i in range(TM):
            prow = OFF_P + (ty + i * TY) * LDP + tx
            for j in range(TN):
                st1(smem, prow + j * TX, p[i, j])
        cuda.syncthreads()
        mm_nn_(smem, OFF_P, OFF_B + b_slot * BN * LD, acc, ty, tx)

    return TileOps(
        path="simt", stages=1, threads=NT, smem_bytes=WORDS * WORD_BYTES, min_blocks=tiles.min_blocks,
        min_regs=96, frag=simt_fragment(TM, TN, TY, TX, DPT), a_shape=(1,), a_dtype=uint32, exp2=math.exp2,
        load_resident=load_resident, resident_ready=resident_ready, stream=stream, commit=noop,
        wait_all=noop, vec=vec, mm_nt=mm_nt, mm_pv=mm_pv, dq=None)
