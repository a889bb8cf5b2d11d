"""Tensor-core path: mma.sync m16n8k16 (float16 / bfloat16 in, float32 accumulate), sm_80 and later.

The path's `TileOps` (fragments.py) for the kernel bodies of forward.py and backward.py:

- Tiles stay in their 16-bit storage format in shared memory, row-major with the head dim along the row,
  padded by 16 bytes per row (row stride DP + 8 halves): the 8 rows an ldmatrix phase reads then start
  in 8 different 16-byte bank groups, so ldmatrix is conflict-free, and so are the cp.async writes.
- The resident operands (Q; Q and dO; K and V) are copied once, then (`a_regs`) read into registers as
  mma A fragments with ldmatrix.x4, MT m16 tiles per warp; warp w owns rows 16*MT*w ... of the tile.
- Streamed tiles (K, V; or Q, dO with lse and D) arrive by 16-byte cp.async into one of two buffers
  while the other is computed on (pipeline.py); inputs whose rows are not 16-byte aligned are copied
  with ordinary loads instead, into the same layout.
- mm_nt: S = A B^T with B's rows as the mma "col" operand: ldmatrix.x4 (no transpose) of a 16 x 16
  block of B gives the b0/b1 registers of two n8 tiles.
- mm_pv: acc += P B. P's fragment is the A operand without leaving registers: the accumulator layout of
  two adjacent n8 score tiles is, element for element, the A fragment of one k16 step (FlashAttention-2's
  register reuse), so P is only rounded to 16 bits and packed in pairs. B (V, dO, Q or K: [key][dim]) is
  read with ldmatrix.x4.trans, which turns its row-major 8 x 8 blocks into "col" fragments.

Fragment tables: PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type" and ldmatrix
(see ptx.py); the thread -> element map is fragments.mma_fragment.
"""
from functools import lru_cache

import numpy as np
from numba import cuda, uint32

from . import ptx
from .fragments import DqOps, Fragment, TileOps, make_red_rows, mma_fragment
from .launch import inline_device

CP_ASYNC_HALVES = 8      # one cp.async moves 16 bytes = 8 halves


def make_tile_copy(rows, dp, headdim, aligned, nthreads, chunk_word, row_words=None, pass_words=None,
                   elem_bytes=2):
    """copy(smem, off, g, base, row0, nrows, stride, tid): a rows x dp tile of 16-bit elements (elem_bytes=4:
    float32, into a float32 smem) into shared memory <- rows row0.. of g (head dim contiguous), zeros past
    nrows rows and past the head dim. chunk_word(smem, off, r, ch) is the layout: the shared-memory word
    where 16-byte chunk ch of row r of the tile at `off` starts (its 8, or 4, elements are contiguous there).
    `aligned`: every source row starts 16-byte aligned, so chunks move by cp.async (committed by the
    caller); otherwise by ordinary loads and 16-bit (32-bit) shared stores into the same layout.
    row_words: where a row starts a fixed number of words after the previous one and its chunks follow
    each other (padded rows), that number, so stepping down rows is one add. pass_words: where only every
    (nthreads // chunks per row)-th row is that far from the one before (a swizzle repeating down the
    rows), the words between them, so a thread's passes down the tile are fixed offsets from its first
    chunk (one register instead of one per pass). Used by the mma.sync (padded rows), wgmma (swizzled)
    and tf32 (float32, swizzled) paths."""
    assert elem_bytes in (2, 4)
    E = 16 // elem_bytes                   # elements per 16-byte chunk
    cpr = dp // E                          # 16-byte chunks per row
    zero_bits = np.uint16(0)
    zero32 = np.float32(0)
    if aligned and nthreads % cpr == 0:
        # each thread keeps one chunk column and steps down the rows, so one pass costs two adds and a
        # compare
        rstep = nthreads // cpr
        passes = -(-rows // rstep)

        @inline_device
        def copy(smem, off, g, base, row0, nrows, stride, tid):
            r = tid // cpr
            ch = tid % cpr
            col_ok = ch * E < headdim
            src = base + (row0 + r) * stride + ch * E
            dst = chunk_word(smem, off, r, ch)
            for s in range(passes):
                if rows % rstep == 0 or r + s * rstep < rows:
                    ok = col_ok and r + s * rstep < nrows
                    if row_words is not None:
                        dst_s = dst + s * rstep * row_words
                    elif pass_words is not None:
                        dst_s = dst + s * pass_words
                    else:
                        dst_s = chunk_word(smem, off, r + s * rstep, ch)
                    ptx.cp_async16(smem, dst_s, g, src + s * rstep * stride if ok else base, ok)
            return
    elif aligned:
        @inline_device
        def copy(smem, off, g, base, row0, nrows, stride, tid):
            for s in range(-(-rows * cpr // nthreads)):
                ci = tid + s * nthreads
                if (rows * cpr) % nthreads == 0 or ci < rows * cpr:
                    r = ci // cpr
                    ch = ci - r * cpr
                    ok = r < nrows and ch * E < headdim
                    src = base + (row0 + r) * stride + ch * E if ok else base
                    ptx.cp_async16(smem, chunk_word(smem, off, r, ch), g, src, ok)
            return
    elif elem_bytes == 4:
        @inline_device
        def copy(smem, off, g, base, row0, nrows, stride, tid):
            for s in range(-(-rows * dp // nthreads)):
                e = tid + s * nthreads
                if (rows * dp) % nthreads == 0 or e < rows * dp:
                    r = e // dp
                    c = e - r * dp
                    w = chunk_word(smem, off, r, c // E) + c % E
                    smem[w] = g[base + (row0 + r) * stride + c] if r < nrows and c < headdim else zero32
            return
    else:
        @inline_device
        def copy(smem, off, g, base, row0, nrows, stride, tid):
            for s in range(-(-rows * dp // nthreads)):
                e = tid + s * nthreads
                if (rows * dp) % nthreads == 0 or e < rows * dp:
                    r = e // dp
                    c = e - r * dp
                    if row_words is not None:       # a row's chunks are contiguous
                        h = 2 * chunk_word(smem, off, r, 0) + c
                    else:
                        h = 2 * chunk_word(smem, off, r, c // CP_ASYNC_HALVES) + c % CP_ASYNC_HALVES
                    if r < nrows and c < headdim:
                        ptx.st_shared_b16(smem, h, g[base + (row0 + r) * stride + c])
                    else:   # zero bits (a float16 constant would make NVVM reject the IR)
                        ptx.st_shared_b16(smem, h, zero_bits)
            return
    return copy


def make_vec_stream(bn, nthreads, vec_word):
    """stream_vecs(smem, stage, t0, n_other, operands, tid): a dK/dV kernel's lse and D vectors (bn float32
    each, from operands[6:10] = (lse, base, D, base)) by 4-byte cp.async to shared word vec_word(smem) +
    (2 * stage + which) * bn, zeros past row n_other."""
    @inline_device
    def stream_vecs(smem, stage, t0, n_other, operands, tid):
        v0, vb0, v1, vb1 = operands[6:10]
        voff = vec_word(smem) + 2 * stage * bn
        for s in range(-(-bn // nthreads)):
            r = tid + s * nthreads
            if r < bn:
                ok = r < n_other - t0
                ptx.cp_async4(smem, voff + r, v0, vb0 + t0 + r if ok else vb0, ok)
                ptx.cp_async4(smem, voff + bn + r, v1, vb1 + t0 + r if ok else vb1, ok)
        return
    return stream_vecs


def make_stream(role, copy_b, off_b, tile_size, bn, nthreads, vec_word):
    """stream(smem, stage, t0, n_other, operands, tid), vec(smem, stage, which, idx): the streaming half of
    a tensor-core path's TileOps (mma.sync and wgmma share it). Streamed tile `slot` of buffer `stage` is
    copied by copy_b (make_tile_copy) to off_b + (2 * stage + slot) * tile_size, in copy_b's offset units,
    from operands[0:6] = (g0, base, row stride, g1, base, row stride). A dK/dV kernel (role "dkdv") also
    streams its lse and D vectors (make_vec_stream), which `vec` reads back."""
    if role == "dkdv":
        stream_vecs = make_vec_stream(bn, nthreads, vec_word)

        @inline_device
        def stream(smem, stage, t0, n_other, operands, tid):
            g0, b0, s0, g1, b1, s1 = operands[0:6]
            off = off_b + 2 * stage * tile_size
            copy_b(smem, off, g0, b0, t0, n_other - t0, s0, tid)
            copy_b(smem, off + tile_size, g1, b1, t0, n_other - t0, s1, tid)
            stream_vecs(smem, stage, t0, n_other, operands, tid)
            return
    else:
        @inline_device
        def stream(smem, stage, t0, n_other, operands, tid):
            g0, b0, s0, g1, b1, s1 = operands[0:6]
            off = off_b + 2 * stage * tile_size
            copy_b(smem, off, g0, b0, t0, n_other - t0, s0, tid)
            copy_b(smem, off + tile_size, g1, b1, t0, n_other - t0, s1, tid)
            return

    @inline_device
    def vec(smem, stage, which, idx):
        return ptx.ld1(smem, vec_word(smem) + (2 * stage + which) * bn + idx)

    return stream, vec


@lru_cache(maxsize=None)
def make_mma_n16(mma):
    """mma_n16(c, i, j, a, m, b0, b1, b2, b3): c[i:i+2, j:j+4] += A B for one m16 x k16 A fragment
    (a[m, 0:4]) and an n16 x k16 B block given as the four ldmatrix registers of two n8 tiles (b0, b1 for
    columns 0-7, b2, b3 for 8-15); c holds accumulator fragments as [2 * m16 tile + half, 2 * n8 tile +
    element] (fragments.mma_fragment)."""
    @inline_device
    def mma_n16(c, i, j, a, m, b0, b1, b2, b3):
        c[i, j], c[i, j + 1], c[i + 1, j], c[i + 1, j + 1] = mma(
            a[m, 0], a[m, 1], a[m, 2], a[m, 3], b0, b1, c[i, j], c[i, j + 1], c[i + 1, j], c[i + 1, j + 1])
        c[i, j + 2], c[i, j + 3], c[i + 1, j + 2], c[i + 1, j + 3] = mma(
            a[m, 0], a[m, 1], a[m, 2], a[m, 3], b2, b3,
            c[i, j + 2], c[i, j + 3], c[i + 1, j + 2], c[i + 1, j + 3])
        return
    return mma_n16


@lru_cache(maxsize=None)
def make_tc_ops(role, tiles, headdim, dtype_name, aligned, fused_dq=False, vector_red=False):
    """TileOps of the tensor-core path for one kernel role ("fwd", "dq", "dkdv"; see simt_tiles).

    fused_dq (dkdv only): also provide stage_ds / mm_dq / add_dq, the dK/dV kernel's own dQ = dS K
    (backward.py); vector_red: add dQ with red.global.add.v2.f32 (sm_90) instead of two scalar reds."""
    assert dtype_name in ("float16", "bfloat16")
    BM, BN = (tiles.bc, tiles.br) if role == "dkdv" else (tiles.br, tiles.bc)
    W = tiles.warps
    NTHREADS = 32 * W
    MT = BM // (16 * W)
    assert MT * 16 * W == BM and BN % 16 == 0, (role, tiles)
    DP = tiles.padded_headdim(headdim)     # head dim padded to a multiple of 16 (zero-filled)
    KS = DP // 16                          # k16 steps over the head dim
    NT = BN // 8                           # n8 tiles of a score row
    DT = DP // 8                           # n8 tiles of an output row
    LDW = (DP + 8) // 2                    # row stride in 32-bit words (16-byte pad, see above)
    NA = 1 if role == "fwd" else 2
    AREG = tiles.a_regs
    OFF_B = NA * BM * LDW                  # words; streamed: [stage][slot] tiles of BN x LDW
    OFF_VEC = OFF_B + 2 * 2 * BN * LDW     # dK/dV: [stage][lse, D] vectors of BN float32
    OFF_DS = OFF_VEC + (2 * 2 * BN if role == "dkdv" else 0)
    # fused dQ: dS^T staged as 16-bit [key][query], rows padded by 16 bytes like the tiles (LDS words)
    LDS = (BN + 8) // 2
    assert not fused_dq or role == "dkdv"
    WORDS = OFF_DS + (BM * LDS if fused_dq else 0)
    mma = ptx.mma_f16 if dtype_name == "float16" else ptx.mma_bf16
    mma_n16 = make_mma_n16(mma)
    pack = ptx.pack_f16x2 if dtype_name == "float16" else ptx.pack_bf16x2

    @inline_device
    def padded_chunk(smem, off, r, ch):
        return off + r * LDW + ch * 4

    def make_copy(rows):
        return make_tile_copy(rows, DP, headdim, aligned, NTHREADS, padded_chunk, LDW)

    copy_a, copy_b = make_copy(BM), make_copy(BN)

    @inline_device
    def load_resident(smem, afrag, slot, g, base, row0, nrows, stride, tid):
        copy_a(smem, slot * BM * LDW, g, base, row0, nrows, stride, tid)
        ptx.cp_async_commit()

    @inline_device
    def a_fragment(smem, slot, mt, ks, tid):
        """ldmatrix.x4 of the m16 x k16 block (m tile mt of this warp, k step ks) of resident tile `slot`:
        lanes 0-15 address rows 0-15 at column 0, lanes 16-31 the same rows at column 8."""
        lane = tid % 32
        row = (tid // 32) * (16 * MT) + lane % 16
        return ptx.ldmatrix_x4(smem, row * LDW + 4 * (lane // 16), slot * BM * LDW + mt * 16 * LDW + ks * 8)

    @inline_device
    def resident_ready(smem, afrag, tid):
        ptx.cp_async_wait_group(1)      # the resident copies; the first streamed tile may still fly
        cuda.syncthreads()
        if AREG:
            for slot in range(NA):
                for mt in range(MT):
                    for ks in range(KS):
                        (afrag[slot, mt, ks, 0], afrag[slot, mt, ks, 1], afrag[slot, mt, ks, 2],
                         afrag[slot, mt, ks, 3]) = a_fragment(smem, slot, mt, ks, tid)
        return

    @inline_device
    def vec_word(smem):
        return OFF_VEC

    stream, vec = make_stream(role, copy_b, OFF_B, BN * LDW, BN, NTHREADS, vec_word)

    @inline_device
    def mm_nt(smem, afrag, a_slot, stage, b_slot, c, tid):
        """c[2MT, 2NT] += A[a_slot] B^T, B = streamed tile b_slot (BN rows x DP)."""
        lane = tid % 32
        boff = OFF_B + (2 * stage + b_slot) * BN * LDW
        lane_nt = (lane % 8 + 8 * (lane // 16)) * LDW + 4 * ((lane // 8) % 2)
        a = cuda.local.array((MT, 4), uint32)
        for ks in range(KS):
            for mt in range(MT):
                if AREG:
                    for x in range(4):
                        a[mt, x] = afrag[a_slot, mt, ks, x]
                else:
                    a[mt, 0], a[mt, 1], a[mt, 2], a[mt, 3] = a_fragment(smem, a_slot, mt, ks, tid)
            for n2 in range(NT // 2):
                # matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
                b0, b1, b2, b3 = ptx.ldmatrix_x4(smem, boff + lane_nt, n2 * 16 * LDW + ks * 8)
                for mt in range(MT):
                    mma_n16(c, 2 * mt, 4 * n2, a, mt, b0, b1, b2, b3)
        return

    @inline_device
    def mm_pv(smem, p, stage, b_slot, acc, tid, lead_sync):
        """acc[2MT, 2DT] += P B with P = p[2MT, 2NT] (this thread's score fragment) and B = streamed tile
        b_slot (BN rows x DP, row-major)."""
        lane = tid % 32
        boff = OFF_B + (2 * stage + b_slot) * BN * LDW
        lane_pv = (lane % 8 + 8 * ((lane // 8) % 2)) * LDW + 4 * (lane // 16)
        a = cuda.local.array((MT, 4), uint32)
        for kk in range(BN // 16):
            for mt in range(MT):
                i = 2 * mt
                j = 4 * kk
                a[mt, 0] = pack(p[i, j], p[i, j + 1])               # row g,   columns 2t, 2t+1
                a[mt, 1] = pack(p[i + 1, j], p[i + 1, j + 1])       # row g+8
                a[mt, 2] = pack(p[i, j + 2], p[i, j + 3])           # row g,   columns 8+2t, 9+2t
                a[mt, 3] = pack(p[i + 1, j + 2], p[i + 1, j + 3])   # row g+8
            for d2 in range(DT // 2):
                # matrices: (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15)
                b0, b1, b2, b3 = ptx.ldmatrix_x4_trans(smem, boff + lane_pv, kk * 16 * LDW + d2 * 8)
                for mt in range(MT):
                    mma_n16(acc, 2 * mt, 4 * d2, a, mt, b0, b1, b2, b3)
        return

    frag = mma_fragment(MT, NT, DT)
    dq = make_dq_ops(BM, BN, W, DP, LDW, OFF_DS, LDS, mma, pack, vector_red, frag) if fused_dq else None

    # Registers per thread, roughly: MT*(DP/2) output floats per accumulator, MT*BN/2 score floats per
    # score tile, NA*MT*DP/4 words of A fragments; the launch bounds leave room for them.
    a_words = NA * MT * KS * 4 if AREG else 0
    need = (2 if role == "dkdv" else 1) * MT * DP // 2 + (2 if role != "fwd" else 1) * MT * BN // 2 + a_words
    min_regs = min(255, max(128, need + 64))
    return TileOps(
        path="mma", stages=2, threads=NTHREADS, smem_bytes=WORDS * 4, min_blocks=tiles.min_blocks,
        min_regs=min_regs, frag=frag,
        a_shape=(NA, MT, KS, 4) if AREG else (1,), a_dtype=uint32, exp2=ptx.ex2,
        load_resident=load_resident, resident_ready=resident_ready, stream=stream,
        commit=ptx.cp_async_commit, wait_all=ptx.cp_async_wait_all, vec=vec, mm_nt=mm_nt, mm_pv=mm_pv,
        dq=dq)


def make_dq_ops(BM, BN, W, DP, LDW, OFF_DS, LDS, mma, pack, vector_red, sfrag):
    """The dK/dV kernel's own dQ_i += dS K_j (fragments.DqOps).

    dS^T is in registers as the score fragment (rows: this warp's keys, columns: the BN queries); dQ
    needs dS with the queries as rows, and every key of the tile in each row's sum. So the warps stage
    dS^T in shared memory as 16-bit [key][query] rows (stage_ds), and after a barrier each warp reads its
    share of dS back as mma A fragments with ldmatrix.trans: the .trans of an 8 x 8 block of dS^T stored
    by keys is, lane for lane, the A-fragment block of dS (PTX ISA, ldmatrix). B is the resident K tile
    (keys x head dim, row-major: ldmatrix.trans as in mm_pv). The BN x DP output is cut into units of one
    m16 query tile x DP/CG columns, one unit per warp when there are as many units as warps.
    """
    QT = BN // 16                          # m16 query tiles
    DT = DP // 8
    if QT >= W:
        assert QT % W == 0, (BN, W)
        MQ, CG = QT // W, 1
    else:
        assert W % QT == 0, (BN, W)
        MQ = 1
        CG = max(c for c in range(1, W // QT + 1) if (DT // 2) % c == 0 and (W // QT) % c == 0)
    NQ = DT // CG                          # n8 tiles of a unit (even: DT // 2 is a multiple of CG)
    ACTIVE = QT * CG if QT < W else W      # warps with a unit
    R, C, srow, scol = sfrag.rows, sfrag.cols, sfrag.row, sfrag.col
    mma_n16 = make_mma_n16(mma)

    @inline_device
    def unit(tid):
        """(first m16 query tile, first output column) of this warp's unit."""
        w = tid // 32
        if QT >= W:
            return w * MQ, 0
        return w % QT, (w // QT) * NQ * 8

    @inline_device
    def row(tid, i):
        qt, _ = unit(tid)
        return (qt + i // 2) * 16 + (i % 2) * 8 + (tid % 32) // 4

    @inline_device
    def col(tid, j):
        _, c0 = unit(tid)
        return c0 + (j // 2) * 8 + 2 * (tid % 4) + j % 2

    @inline_device
    def stage_ds(smem, p, tid):
        """This thread's dS^T fragment p (the score layout: rows keys, columns queries) -> shared memory
        as 16-bit pairs (columns 2t, 2t+1 are adjacent). Lanes g, t of a store write row g, word t:
        rows LDS = 4 (mod 8) words apart put the warp's 32 words in 32 banks."""
        for i in range(R):
            w = OFF_DS + srow(tid, i) * LDS
            for j in range(0, C, 2):
                ptx.st_shared_b32(smem, w + scol(tid, j) // 2, pack(p[i, j], p[i, j + 1]))
        return

    @inline_device
    def mm_dq(smem, dq, tid):
        """dq[2MQ, 2NQ] += (this warp's rows of dS) K, dS from the staged dS^T."""
        if tid // 32 < ACTIVE:
            lane = tid % 32
            qt0, c0 = unit(tid)
            lane_a = OFF_DS + (lane % 8 + 8 * (lane // 16)) * LDS + 4 * ((lane // 8) % 2)
            lane_b = (lane % 8 + 8 * ((lane // 8) % 2)) * LDW + 4 * (lane // 16)
            a = cuda.local.array((MQ, 4), uint32)
            for kk in range(BM // 16):
                for mq in range(MQ):
                    # matrices: (q 0-7, k 0-7), (q 8-15, k 0-7), (q 0-7, k 8-15), (q 8-15, k 8-15)
                    a[mq, 0], a[mq, 1], a[mq, 2], a[mq, 3] = ptx.ldmatrix_x4_trans(
                        smem, lane_a + (qt0 + mq) * 8, kk * 16 * LDS)
                for d2 in range(NQ // 2):
                    b0, b1, b2, b3 = ptx.ldmatrix_x4_trans(smem, lane_b + c0 // 2, kk * 16 * LDW + d2 * 8)
                    for mq in range(MQ):
                        mma_n16(dq, 2 * mq, 4 * d2, a, mq, b0, b1, b2, b3)
        return

    red = make_red_rows(row, col, 2 * MQ, 2 * NQ, vector_red)

    @inline_device
    def add_dq(smem, dq, g, base, row0, nrows, stride, tid):
        """g[base + (row0 + r) * stride + c] += dq[i, j] for this warp's elements (r, c), r < nrows; the
        accumulator's rows are DP floats wide, so every column exists and pairs are 8-byte aligned."""
        if tid // 32 < ACTIVE:
            red(dq, g, base, row0, nrows, stride, tid)
        return

    return DqOps(frag=Fragment(2 * MQ, 0, 2 * NQ, 4, row, col, col), stage=stage_ds, mm=mm_dq, add=add_dq)
