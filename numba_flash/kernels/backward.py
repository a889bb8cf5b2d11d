"""FlashAttention backward, FlashAttention-2 style: one body per kernel for every path.

1. prepare: `D = rowsum(dO * O)` per query row (the softmax backward's correction term); with a fused dQ
   also the float32 dQ accumulator zeroed.
2. dK/dV: one block per key tile K_j, V_j (resident), walking the query tiles listed for it. For each Q_i
   it recomputes S^T = K_j Q_i^T and P^T = exp(S^T - lse_i) from the saved log-sum-exp, then
       dV_j += P^T dO_i,   dP^T = V_j dO_i^T,   dS^T = P^T * (dP^T - D_i),   dK_j += scale * dS^T Q_i
   with dK_j, dV_j accumulated in registers until the end.
3. dQ, in one of three ways (`plan.dq_mode`, configs.py):
   "kernel" (deterministic, the default): a separate kernel, one block per query tile (Q_i, dO_i
       resident) walking its key tiles: S, P and dP again, dQ_i += scale * dS K_j. Two extra tile
       products per pair (7 instead of 5), but every dQ element has one writer, in a fixed order: same
       inputs, bitwise same gradients.
   "atomic" (tensor cores, deterministic=False): the dK/dV kernel itself adds dS K_j into a float32
       accumulator of dQ with unordered reductions (5 products per pair, as flash-attn), and a last
       kernel scales and converts it.
   "bulk" (wgmma only): as "atomic", but each warp adds its 16-row slab of dS K_j with one asynchronous
       bulk reduction from shared memory (`cp.reduce.async.bulk`, FlashAttention-3's scheme) instead of
       a `red` per element pair; the accumulator is laid out so that a slab is contiguous
       (wgmma_tiles.make_wgmma_dq_ops), and its conversion kernel reads that layout.
   In both fused modes the order of the additions, hence the last bits of dQ, varies from run to run.
   dS^T goes through shared memory (the product needs dS with the queries as rows); on wgmma the staged
   image is read by two products after one barrier, dQ_i = dS K_j and dK_j += dS^T Q_i
   (wgmma_tiles.make_wgmma_dq_ops), completed before the reductions.

S^T is computed as K Q^T directly, so nothing is transposed: the score fragments of P^T and dS^T are the
A operands of the next products (in registers on tensor cores, through shared memory on SIMT).

Paths whose products are asynchronous (TileOps.pipe: wgmma) issue the two score-shaped products of a tile
pair together and compute P (P^T) while the second (dP, dP^T) is still running; in dK/dV, dV += P^T dO
runs while dS^T is computed. All of a tile pair's products complete before the next tile's barrier, so
the streamed buffers are never written while read.

Launch contract (`launch`): the kernels in that order on one stream; grids walk.tile_grid (Tr or Tc,
nheads, batch; causal: nheads, Tr or Tc, batch, the longest tiles of each batch element first),
the prepare kernel's (blocks of query rows, nheads, batch), the dQ conversion's 1-D; D is a (batch,
nheads, seqlen_q) scratch vector of the lse's dtype, so is lse2 (lse in the log2 domain, which the dK/dV
kernel streams in lse's place), and the dQ accumulator a (batch, seqlen_q, nheads, DP) float32 scratch,
all allocated through `alloc`. The dK/dV and dQ kernels take a trailing `maps`: the tensor maps of their two
streamed tensors (Q, dO; K, V) where they copy them by TMA (MmaTiles.tma, `tma_maps`; a kernel whose maps
cannot be made runs without TMA), else a placeholder map they never read.
"""
import math
from dataclasses import replace
from functools import lru_cache

import numpy as np

from numba import cuda, float32, uint64

from . import ptx, tma
from .convert import acc_constant, acc_type, loader, storage_dtype, storer
from .fragments import make_store_rows, pair_packer
from .launch import Launchable, kernel, strides3
from .pipeline import make_pipeline
from .softmax import LOG2E, add, group_reducer
from .tiles import make_ops
from .walk import make_fill_invisible, make_walk, tile_grid


def prepare_chunk(dtype_name):
    """Elements per lane per step of the prepare kernel: one 16-byte vector of the stored type."""
    return 16 // storage_dtype(dtype_name).itemsize


def prepare_vector(dtype_name, headdim, out, dout):
    """Whether the prepare kernel may read its chunks as 16-byte loads: the head dim a multiple of the
    chunk and every row of O and dO 16-byte aligned."""
    ch = prepare_chunk(dtype_name)
    return headdim % ch == 0 and out.aligned(ch) and dout.aligned(ch)


def prepare_lanes(headdim, dtype_name):
    """Lanes per row of the prepare kernel: a power of two, enough for a row's chunks, at most a warp."""
    chunks = -(-headdim // prepare_chunk(dtype_name))
    return min(32, 1 << (chunks - 1).bit_length())


@lru_cache(maxsize=None)
def make_prepare_kernel(headdim, dtype_name, vector, threads=128):
    """D[b, h, r] = sum_c dO[b, r, h, c] * O[b, r, h, c] - dlse[b, h, r] (if has_dlse); lse2[b, h, r] =
    lse[b, h, r] * log2(e), or +inf where lse is -inf (a row that saw no key: its P is then 0), the form
    the dK/dV kernel streams (so it converts nothing per tile); and zf[:nzf] = 0 over the whole grid (the
    fused dQ's accumulator). lse, lse2 and D share their (batch, head) strides (all (B, H, Nq) contiguous).

    A row is read by TPR consecutive lanes (prepare_lanes), each taking CH = prepare_chunk consecutive
    elements at a time, so a warp's loads cover whole rows; the lanes' partial sums meet in a butterfly of
    shuffles. `vector` (prepare_vector): a chunk is one 16-byte load; else CH element loads. Both sum in
    the same order with explicit FMAs, so D, hence every gradient, is bitwise the same for a view and
    its aligned contiguous copy. Grid: (row blocks of threads/TPR rows, heads, batch).

    With one thread per row (the first version) every warp-wide load touched 32 rows 4 KB apart:
    330-380 µs at 16k tokens x hidden 2048 on an H200, where the 134 MB it reads take ~40 µs and
    FlashAttention-2's kernel for it 70 (tools/kernel_times.py, 2026-12-04); lanes along rows with a 1-D
    grid (a 64-bit division per index), 87 µs."""
    ACC = acc_type(dtype_name)
    INF, NEG_INF, LOG2E_ACC = (acc_constant(dtype_name, x) for x in (math.inf, -math.inf, LOG2E))
    load_elem = loader(dtype_name)
    CH = prepare_chunk(dtype_name)
    TPR = prepare_lanes(headdim, dtype_name)
    assert threads % 32 == 0
    ldv = {2: ptx.ld2, 4: ptx.ld4, 8: ptx.ld8}[CH]
    reduce = group_reducer(TPR, add)
    ROWS = threads // TPR        # rows per block

    @cuda.jit
    def bwd_prepare(o, do, dvec, nq, o_st, do_st, d_st, zf, nzf, dlse, has_dlse, lse, lse2):
        # grid (row blocks, heads, batch): no integer division by run-time values (a 64-bit division is
        # some 70 instructions, which here would cost more than the loads)
        tid = cuda.threadIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        nblocks = cuda.gridDim.x * cuda.gridDim.y * cuda.gridDim.z
        block = (b * cuda.gridDim.y + h) * cuda.gridDim.x + cuda.blockIdx.x
        for e in range(block * threads + tid, nzf, nblocks * threads):
            zf[e] = float32(0)
        r = cuda.blockIdx.x * ROWS + tid // TPR
        acc = ACC(0)
        if r < nq:
            ob = b * o_st[0] + r * o_st[1] + h * o_st[2]
            db = b * do_st[0] + r * do_st[1] + h * do_st[2]
            for c in range((tid % TPR) * CH, headdim, TPR * CH):
                if vector:
                    ov = ldv(o, ob + c)
                    dv = ldv(do, db + c)
                    for e in range(CH):
                        acc = ptx.fma(load_elem(ov[e]), load_elem(dv[e]), acc)
                else:
                    for e in range(CH):
                        if c + e < headdim:
                            acc = ptx.fma(load_elem(ptx.ld1(o, ob + c + e)), load_elem(ptx.ld1(do, db + c + e)),
                                          acc)
        acc = reduce(acc)        # every lane of the warp takes part, rows past the end too
        if r < nq and tid % TPR == 0:
            di = b * d_st[0] + h * d_st[1] + r
            if has_dlse:     # lse's gradient: dS = P (dP - D + dlse), the same as D - dlse for D (api.py)
                acc -= dlse[di]
            dvec[di] = acc
            lr = lse[di]
            lse2[di] = lr * LOG2E_ACC if lr != NEG_INF else INF

    return Launchable(bwd_prepare, threads, 0)


def prepare_launch(dtype_name, stream, out, dout, dvec, zf, nzf, dlse, lse, lse2):
    """(kernel, grid, stream, args) of the prepare kernel for (B, Nq, H, d) views out, dout, the
    (B, H, Nq) views dvec, lse and lse2 (and dlse, or None), zeroing zf[:nzf]."""
    B, nq, H, d = out.shape
    kern = make_prepare_kernel(d, dtype_name, prepare_vector(dtype_name, d, out, dout))
    return (kern, (-(-nq * prepare_lanes(d, dtype_name) // kern.threads), H, B), stream,
            (out.flat, dout.flat, dvec.flat, nq, strides3(out), strides3(dout), (dvec.strides[0], dvec.strides[1]),
             zf.flat, nzf, (dlse if dlse is not None else dvec).flat, dlse is not None, lse.flat, lse2.flat))


@lru_cache(maxsize=None)
def make_dq_convert_kernel(headdim, padded, dtype_name, nc=0, pitch=0, threads=256):
    """dq[b, r, h, c] = scale * acc[...] in the output dtype, acc the fused dQ's float32 accumulator:
    (B, Nq, H, padded) (nc = 0: "atomic"), or the "bulk" mode's (B, H, padded / nc, nq_pad, pitch), element
    [b, h, c // nc, r, c % nc] (the kernel's `nq_pad` argument; unused for the first layout)."""
    store_elem = storer(dtype_name)
    SLABS = nc > 0
    NC = max(nc, 1)
    NCB = padded // NC

    @cuda.jit
    def bwd_dq_convert(acc, dq, nelem, nq, nheads, dq_st, scale, nq_pad):
        idx = cuda.grid(1)
        if idx >= nelem:
            return
        row = idx // headdim
        c = idx - row * headdim
        h = row % nheads
        r = (row // nheads) % nq
        b = row // (nheads * nq)
        if SLABS:
            a = ((b * nheads + h) * NCB + c // NC) * nq_pad * pitch + r * pitch + c % NC
        else:
            a = row * padded + c
        dq[b * dq_st[0] + r * dq_st[1] + h * dq_st[2] + c] = store_elem(acc[a] * float32(scale))

    return Launchable(bwd_dq_convert, threads, 0)


def _async(ops):
    """(whether the path's products are asynchronous, its AsyncBwdOps fields or Nones): a body takes the
    asynchronous branches only where the path has them (the constant condition prunes the others)."""
    if ops.pipe is None:
        return False, (None,) * 6
    return True, tuple(ops.pipe)


def _shared(plan, role, over_keys):
    """What both backward bodies take from the plan: the path's ops, its tiles, walk, masking, pipeline,
    epilogue."""
    ops = make_ops(plan, role)
    t = getattr(plan, role)
    walk = make_walk(t.br, t.bc, plan.causal, over_keys)
    store = make_store_rows(ops.frag, plan.headdim, storer(plan.dtype), pair_packer(plan, ops.frag))
    return (ops, t, walk, make_fill_invisible(ops.frag, walk.visible_cols, ops.path == "wgmma"), make_pipeline(ops),
            store)


@lru_cache(maxsize=None)
def make_dkdv_kernel(plan):
    fused = plan.dq_mode != "kernel"
    ops, t, walk, fill_invisible, (begin, acquire), store = _shared(plan, "dkdv", False)
    first_tile, next_tile, needs_mask, block_coords = walk.first_tile, walk.next_tile, walk.needs_mask, \
        walk.block_coords
    BC = t.bc
    R, C, CO = ops.frag.rows, ops.frag.cols, ops.frag.out_cols
    col_of = ops.frag.col
    ACC = acc_type(plan.dtype)
    ZERO, ONE = acc_constant(plan.dtype, 0.0), acc_constant(plan.dtype, 1.0)
    load_res, resident_ready, mm_nt, mm_pv, vec = (ops.load_resident, ops.resident_ready, ops.mm_nt,
                                                   ops.mm_pv, ops.vec)
    exp2 = ops.exp2
    A_SHAPE, A_DT = ops.a_shape, ops.a_dtype
    if fused:
        stage_ds, mm_dq, add_dq = ops.dq.stage, ops.dq.mm, ops.dq.add
        dq_finish, dk_staged, dq_drain = ops.dq.finish, ops.dq.dk, ops.dq.drain
        DQ_R, DQ_C = ops.dq.frag.rows, ops.dq.frag.out_cols
    else:
        stage_ds = mm_dq = add_dq = dq_finish = dk_staged = dq_drain = None
        DQ_R, DQ_C = 1, 1
    DRAIN = dq_drain is not None
    ASYNC, (nt_issue, pv_issue, wait1, wait0, s_finish, o_finish) = _async(ops)

    @kernel(ops.threads, ops.smem_bytes, ops.min_blocks, ops.min_regs)
    def flash_bwd_dkdv(q, k, v, do, lse, dvec, dk, dv, nq, nk, q_st, k_st, v_st, do_st, dk_st, dv_st,
                       lse_st, scale, scale_log2, offset, q_count, q_index, mask_sh, mask_maxq, q_per_blk,
                       k_per_blk, dq_acc, acc_st, maps):
        smem = cuda.shared.array(0, ACC)
        bars = cuda.shared.array(2, uint64)      # TMA streams (TileOps.landed): a buffer's tile has landed
        j_tile, h, b = block_coords()
        tid = cuda.threadIdx.x
        col0 = j_tile * BC
        sl2 = ACC(scale_log2)
        lse_base = b * lse_st[0] + h * lse_st[1]
        qdo = (q, b * q_st[0] + h * q_st[2], q_st[1], do, b * do_st[0] + h * do_st[2], do_st[1],
               lse, lse_base, dvec, lse_base, maps, bars, h, b)
        acc_base = b * acc_st[0] + h * acc_st[2]

        kvf = cuda.local.array(A_SHAPE, A_DT)
        load_res(smem, kvf, 0, k, b * k_st[0] + h * k_st[2], col0, nk - col0, k_st[1], tid)
        load_res(smem, kvf, 1, v, b * v_st[0] + h * v_st[2], col0, nk - col0, v_st[1], tid)
        mcol, nblk, t, sub, base, row0 = first_tile(q_count, q_index, h, j_tile, mask_sh, mask_maxq,
                                                    k_per_blk, q_per_blk, col0, nq, nk, offset)
        begin(smem, t < nblk, row0, nq, qdo, tid)
        resident_ready(smem, kvf, tid)

        dk_acc = cuda.local.array((R, CO), ACC)
        dv_acc = cuda.local.array((R, CO), ACC)
        st = cuda.local.array((R, C), ACC)
        dpt = cuda.local.array((R, C), ACC)
        dqf = cuda.local.array((DQ_R, DQ_C), ACC)
        for i in range(R):
            for j in range(CO):
                dk_acc[i, j] = ZERO
                dv_acc[i, j] = ZERO

        stage = 0
        phase = 0
        while t < nblk:
            nt, nsub, nbase, nrow0 = next_tile(q_index, mcol, mask_maxq, q_per_blk, nblk, t, sub, base, col0,
                                               nq, nk, offset)
            acquire(smem, stage, phase, row0, nt < nblk, nrow0, nq, qdo, tid)
            if ASYNC:
                pend_s = nt_issue(smem, 0, stage, 0, tid)                # S^T = K Q^T
                pend_dp = nt_issue(smem, 1, stage, 1, tid)               # dP^T = V dO^T, while P^T is made
                wait1()
                s_finish(st, pend_s)
            else:
                for i in range(R):
                    for j in range(C):
                        st[i, j] = ZERO
                        dpt[i, j] = ZERO
                mm_nt(smem, kvf, 0, stage, 0, st, tid)                   # S^T = K Q^T
            # The columns are queries: their lse (log2 domain; +inf for rows that saw no key, so their
            # P is 0: the prepare kernel's lse2) and D come from the streamed vectors, read where used.
            for j in range(C):
                lse2 = vec(smem, stage, 0, col_of(tid, j))
                for i in range(R):
                    st[i, j] = exp2(st[i, j] * sl2 - lse2)
            if needs_mask(row0, col0, nq, nk, offset):
                fill_invisible(st, ZERO, tid, col0, row0, nq, nk, offset)
            if ASYNC:
                pend_dv = pv_issue(smem, st, stage, 1, dv_acc, tid)      # dV += P^T dO, while dS^T is made
                wait1()
                s_finish(dpt, pend_dp)
            else:
                mm_pv(smem, st, stage, 1, dv_acc, tid, False)            # dV += P^T dO
                mm_nt(smem, kvf, 1, stage, 1, dpt, tid)                  # dP^T = V dO^T
            for j in range(C):
                dd = vec(smem, stage, 1, col_of(tid, j))
                for i in range(R):
                    dpt[i, j] = st[i, j] * (dpt[i, j] - dd)              # dS^T
            if fused:
                stage_ds(smem, dpt, tid)                                 # dS^T -> shared memory
            if ASYNC:
                if fused:
                    cuda.syncthreads()                                   # every warp's dS^T is there
                    pend_dk = dk_staged(smem, stage, dk_acc, tid)        # dK += dS^T Q, dS^T staged
                    pend_dq = mm_dq(smem, tid)                           # dQ_i (partial) = dS K_j
                else:
                    pend_dk = pv_issue(smem, dpt, stage, 0, dk_acc, tid)     # dK += dS^T Q
                wait0()
                o_finish(dv_acc, pend_dv)
                o_finish(dk_acc, pend_dk)
                if fused:        # (the next write of dS^T follows the next tile's barrier)
                    dq_finish(dqf, pend_dq)
                    add_dq(smem, dqf, dq_acc, acc_base, row0, nq - row0, acc_st[1], tid)
            else:
                if fused:
                    cuda.syncthreads()                                   # every warp's dS^T is there
                    for i in range(DQ_R):
                        for j in range(DQ_C):
                            dqf[i, j] = ZERO
                    mm_dq(smem, dqf, tid)                                # dQ_i (partial) = dS K_j
                    add_dq(smem, dqf, dq_acc, acc_base, row0, nq - row0, acc_st[1], tid)
                mm_pv(smem, dpt, stage, 0, dk_acc, tid, True)            # dK += dS^T Q
            t, sub, base, row0, stage, phase = nt, nsub, nbase, nrow0, 1 - stage, phase ^ stage
        if DRAIN:
            dq_drain(tid)                        # the bulk additions have read their staging rows

        sc = cuda.local.array(R, ACC)
        one = cuda.local.array(R, ACC)
        for i in range(R):
            sc[i] = ACC(scale)
            one[i] = ONE
        store(dk_acc, sc, dk, b * dk_st[0] + h * dk_st[2], col0, nk - col0, dk_st[1], tid)
        store(dv_acc, one, dv, b * dv_st[0] + h * dv_st[2], col0, nk - col0, dv_st[1], tid)

    return Launchable(flash_bwd_dkdv, ops.threads, ops.smem_bytes, ops.min_blocks, ops.min_regs)


@lru_cache(maxsize=None)
def make_dq_kernel(plan):
    ops, t, walk, fill_invisible, (begin, acquire), store = _shared(plan, "dq", True)
    first_tile, next_tile, needs_mask, block_coords = walk.first_tile, walk.next_tile, walk.needs_mask, \
        walk.block_coords
    BR = t.br
    R, C, CO = ops.frag.rows, ops.frag.cols, ops.frag.out_cols
    row_of = ops.frag.row
    ACC = acc_type(plan.dtype)
    INF, NEG_INF, ZERO, LOG2E_ACC = (acc_constant(plan.dtype, x) for x in (math.inf, -math.inf, 0.0, LOG2E))
    load_res, resident_ready, mm_nt, mm_pv = ops.load_resident, ops.resident_ready, ops.mm_nt, ops.mm_pv
    exp2 = ops.exp2
    A_SHAPE, A_DT = ops.a_shape, ops.a_dtype
    ASYNC, (nt_issue, pv_issue, wait1, wait0, s_finish, o_finish) = _async(ops)

    @kernel(ops.threads, ops.smem_bytes, ops.min_blocks, ops.min_regs)
    def flash_bwd_dq(q, k, v, do, lse, dvec, dq, nq, nk, q_st, k_st, v_st, do_st, dq_st, lse_st, scale,
                     scale_log2, offset, kv_count, kv_index, mask_sh, mask_maxk, q_per_blk, k_per_blk, maps):
        smem = cuda.shared.array(0, ACC)
        bars = cuda.shared.array(2, uint64)      # TMA streams (TileOps.landed): a buffer's tile has landed
        i_tile, h, b = block_coords()
        tid = cuda.threadIdx.x
        row0 = i_tile * BR
        sl2 = ACC(scale_log2)
        kv = (k, b * k_st[0] + h * k_st[2], k_st[1], v, b * v_st[0] + h * v_st[2], v_st[1], maps, bars, h, b)

        qf = cuda.local.array(A_SHAPE, A_DT)
        load_res(smem, qf, 0, q, b * q_st[0] + h * q_st[2], row0, nq - row0, q_st[1], tid)
        load_res(smem, qf, 1, do, b * do_st[0] + h * do_st[2], row0, nq - row0, do_st[1], tid)
        mrow, nblk, t, sub, base, col0 = first_tile(kv_count, kv_index, h, i_tile, mask_sh, mask_maxk,
                                                    q_per_blk, k_per_blk, row0, nq, nk, offset)
        begin(smem, t < nblk, col0, nk, kv, tid)
        resident_ready(smem, qf, tid)

        lse2 = cuda.local.array(R, ACC)
        dd = cuda.local.array(R, ACC)
        dq_acc = cuda.local.array((R, CO), ACC)
        s = cuda.local.array((R, C), ACC)
        dp = cuda.local.array((R, C), ACC)
        for i in range(R):
            r = row0 + row_of(tid, i)
            lse2[i] = INF          # rows past nq and rows that saw no key: P = 0
            dd[i] = ZERO
            if r < nq:
                lr = lse[b * lse_st[0] + h * lse_st[1] + r]
                if lr != NEG_INF:
                    lse2[i] = lr * LOG2E_ACC
                dd[i] = dvec[b * lse_st[0] + h * lse_st[1] + r]
            for j in range(CO):
                dq_acc[i, j] = ZERO

        stage = 0
        phase = 0
        while t < nblk:
            nt, nsub, nbase, ncol0 = next_tile(kv_index, mrow, mask_maxk, k_per_blk, nblk, t, sub, base, row0,
                                               nq, nk, offset)
            acquire(smem, stage, phase, col0, nt < nblk, ncol0, nk, kv, tid)
            if ASYNC:
                pend_s = nt_issue(smem, 0, stage, 0, tid)                # S = Q K^T
                pend_dp = nt_issue(smem, 1, stage, 1, tid)               # dP = dO V^T, while P is made
                wait1()
                s_finish(s, pend_s)
            else:
                for i in range(R):
                    for j in range(C):
                        s[i, j] = ZERO
                        dp[i, j] = ZERO
                mm_nt(smem, qf, 0, stage, 0, s, tid)                     # S = Q K^T
                mm_nt(smem, qf, 1, stage, 1, dp, tid)                    # dP = dO V^T
            for i in range(R):
                for j in range(C):
                    s[i, j] = exp2(s[i, j] * sl2 - lse2[i])              # P
            if needs_mask(row0, col0, nq, nk, offset):
                fill_invisible(s, ZERO, tid, row0, col0, nq, nk, offset)
            if ASYNC:
                wait0()
                s_finish(dp, pend_dp)
            for i in range(R):
                for j in range(C):
                    s[i, j] = s[i, j] * (dp[i, j] - dd[i])               # dS
            if ASYNC:
                pend_dq = pv_issue(smem, s, stage, 0, dq_acc, tid)       # dQ += dS K
                wait0()
                o_finish(dq_acc, pend_dq)
            else:
                mm_pv(smem, s, stage, 0, dq_acc, tid, False)             # dQ += dS K
            t, sub, base, col0, stage, phase = nt, nsub, nbase, ncol0, 1 - stage, phase ^ stage

        sc = cuda.local.array(R, ACC)
        for i in range(R):
            sc[i] = ACC(scale)
        store(dq_acc, sc, dq, b * dq_st[0] + h * dq_st[2], row0, nq - row0, dq_st[1], tid)

    return Launchable(flash_bwd_dq, ops.threads, ops.smem_bytes, ops.min_blocks, ops.min_regs)


def launches(plan, stream, dout, q, k, v, out, lse, dq, dk, dv, nq, nk, scale, offset, masks, alloc,
             dlse=None):
    """[(kernel, grid, stream, args)] of the backward pass: prepare, dK/dV, then dQ (its own kernel, or
    the fused dQ's conversion). Arrays are interop.View of (B, N, H, d) (lse, dlse: (B, H, Nq), dlse
    optional, contiguous as lse); masks.lists(br, bc, transpose) gives the walk arguments for a kernel's
    tiles; alloc(shape, dtype) allocates scratch in the inputs' framework."""
    B, H, d = q.shape[0], q.shape[2], q.shape[3]
    fused = plan.dq_mode != "kernel"
    plan, dkdv_maps = _with_maps(plan, "dkdv", (q, dout), plan.dkdv.br, stream)
    if not fused:
        plan, dq_maps = _with_maps(plan, "dq", (k, v), plan.dq.bc, stream)
    t = plan.dkdv
    dvec = alloc((B, H, nq), lse.dtype)
    lse2 = alloc((B, H, nq), lse.dtype)       # lse in the log2 domain (make_prepare_kernel), for dK/dV
    if plan.dq_mode == "bulk":
        # (B, H, column blocks, query rows rounded up to the tiles, pitch): a warp's 16 x nc slab is
        # contiguous; the kernel takes (batch, column block, head) strides as (acc_st[0], acc_st[1],
        # acc_st[2]) so that its (batch, head) base and its row "stride" argument keep their places
        from .wgmma_tiles import bulk_pitch, fused_dq_split
        dp = t.padded_headdim(d)
        nc = fused_dq_split(t, d)[1]
        pitch, ncb, nq_pad = bulk_pitch(nc), dp // nc, -(-nq // t.br) * t.br
        acc = alloc((B * H * ncb * nq_pad * pitch,), "float32")
        nzero = B * H * ncb * nq_pad * pitch
        acc_st = (H * ncb * nq_pad * pitch, nq_pad * pitch, ncb * nq_pad * pitch)
    elif fused:
        dp = t.padded_headdim(d)
        acc = alloc((B, nq, H, dp), "float32")
        nzero, acc_st = B * nq * H * dp, strides3(acc)
    else:
        acc, nzero, acc_st = alloc((1,), "float32"), 0, (0, 0, 0)
    lse_st = (lse.strides[0], lse.strides[1])
    common = (nq, nk, strides3(q), strides3(k), strides3(v), strides3(dout))
    out_ = []
    if nq > 0:
        out_.append(prepare_launch(plan.dtype, stream, out, dout, dvec, acc, nzero, dlse, lse, lse2))
    if nk > 0:
        out_.append((make_dkdv_kernel(plan), tile_grid(plan.causal, nk, t.bc, H, B, "seqlen_k"), stream,
                     (q.flat, k.flat, v.flat, dout.flat, lse2.flat, dvec.flat, dk.flat, dv.flat, *common,
                      strides3(dk), strides3(dv), lse_st, scale, scale * LOG2E, offset,
                      *masks.lists(t.br, t.bc, True), acc.flat, acc_st, dkdv_maps)))
    if nq > 0 and fused:
        bulk = plan.dq_mode == "bulk"
        conv = make_dq_convert_kernel(d, dp, plan.dtype, nc if bulk else 0, pitch if bulk else 0)
        n = B * nq * H * d
        out_.append((conv, (-(-n // conv.threads),), stream,
                     (acc.flat, dq.flat, n, nq, H, strides3(dq), scale, nq_pad if bulk else 0)))
    elif nq > 0:
        out_.append((make_dq_kernel(plan), tile_grid(plan.causal, nq, plan.dq.br, H, B, "seqlen_q"), stream,
                     (q.flat, k.flat, v.flat, dout.flat, lse.flat, dvec.flat, dq.flat, *common, strides3(dq),
                      lse_st, scale, scale * LOG2E, offset, *masks.lists(plan.dq.br, plan.dq.bc, False),
                      dq_maps)))
    return out_


def uses_tma(plan, role):
    """Whether kernel `role` of a backward plan copies its streamed tiles by TMA (MmaTiles.tma)."""
    t = getattr(plan, role)
    return plan.path == "wgmma" and plan.aligned and getattr(t, "tma", False)


def tma_maps(plan, role, views, rows, stream=0):
    """The `maps` argument of kernel `role` streaming the two (B, N, H, d) `views` by TMA in tiles of
    `rows` rows (one swizzle span of columns per box, tma.py), copied where the kernels run in order on
    `stream` (the launch's); None where one cannot be made. Views of the
    "numpy" framework (tools/ptx_report.py compiles without a GPU) get zero maps."""
    from .wgmma_tiles import swizzle_width
    sw = swizzle_width(getattr(plan, role).padded_headdim(plan.headdim))
    if views[0].framework == "numpy":
        return np.zeros(2 * tma.hopper.TMAP_WORDS, np.uint64)
    return tma.device_maps(tuple(tma.head_tile_spec(x, rows, sw // 2, sw) for x in views), views[0].device,
                           stream)


def _with_maps(plan, role, views, rows, stream=0):
    """(plan, maps) for kernel `role`: its TMA maps, or where it does not copy by TMA or they cannot be made
    (the plan then without TMA for that kernel), a placeholder the kernel never reads."""
    maps = tma_maps(plan, role, views, rows, stream) if uses_tma(plan, role) else None
    if maps is None:
        if uses_tma(plan, role):
            plan = replace(plan, **{role: replace(getattr(plan, role), tma=False)})
        maps = (np.zeros(tma.hopper.TMAP_WORDS, np.uint64) if views[0].framework == "numpy"
                else tma.placeholder(views[0].device))
    return plan, maps


def launch(*args):
    """Run the backward pass (arguments as `launches`)."""
    for kern, grid, stream, kargs in launches(*args):
        kern(grid, stream, *kargs)
