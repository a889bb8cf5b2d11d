"""FlashAttention forward (Algorithm 1 of the paper, FlashAttention-2 loop order), one body for every path.

One thread block owns a query tile Q_i (Br rows of one head of one batch). It walks the list of key tiles
the mask gives that tile; for each K_j, V_j it computes the scores S = Q_i K_j^T, updates the running row
max m and row sum l (the online softmax), rescales the output accumulator by exp(m_old - m_new), and adds
P V_j with P = exp(S - m). The N x N score matrix exists only tile by tile. At the end O = acc / l and
lse = m + log(l) (natural log), kept for the backward pass. Rows that see no key keep m = -inf and l = 0:
they output 0 and lse = -inf.

What differs between paths comes from the plan's TileOps (simt_tiles.py: fp32 FMA micro-tiles, P through
shared memory; tc_tiles.py: mma.sync with Q in registers, K/V by cp.async, P in registers;
wgmma_tiles.py: warpgroup MMA from shared memory); the walk, the masking, the softmax and the epilogue
are shared (walk.py, softmax.py, fragments.py).

Paths whose products are asynchronous (TileOps.pipe: wgmma) run the same algorithm software-pipelined,
as FlashAttention-3 does within a warpgroup: at key tile j the products S_j = Q K_j^T and O += P_{j-1}
V_{j-1} are issued together, the softmax of S_j (row max, P_j, the rescale factor) runs while the tensor
cores still multiply P_{j-1} V_{j-1}, and O is rescaled once that product is complete (the wait for it is
TileOps.pipe.wait_pv; ptxas moves a plain wait up to the one for S_j, before the softmax, which is the
default because it measured faster; MmaTiles.late_pv_wait keeps it after the softmax in the SASS:
hopper.py, "Where ptxas puts the waits"). K_{j+1} and V_j are copied during tile j into the buffers
K_{j-1} and V_{j-2} left, so one barrier per tile suffices.

Warp-specialised (TileOps.ws: wgmma tiles with `ring` > 0, FlashAttention-3's structure): one more
warpgroup, the producer, copies Q once and then K_j, V_j into stage j mod S of a ring of S buffers (by its
threads' cp.async, or with MmaTiles.tma by TMA boxes one thread issues, tma.py), and
the computing warpgroups run the pipelined body above with mbarrier waits in place of its block
barriers: a "full" mbarrier per buffer says its tile has landed, an "empty" one that every computing
thread is done reading it. setmaxnreg moves registers from the producer to the consumers. The
arithmetic, and so every output bit, is the pipelined body's. Persistent (MmaTiles.persistent, the default
of the warp-specialised tiles): as many blocks as the GPU holds at once, each taking query tiles (work
tiles) in turn (walk.make_work_order); the ring's stages and phases run on from one work tile to the next,
and the consumers release Q (an mbarrier) once their last S product is complete, so the producer copies
the next work tile's Q and first K, V while they finish the last one's P V and epilogue. With
MmaTiles.dynamic (opt-in: measured no faster, docs/PERFORMANCE.md) the producer thread draws each next work
tile from an atomic counter instead (so a block that drew short tiles takes more) and publishes it in
shared memory before announcing its Q; the consumers read it once Q's phase completes, and the end is a
Q phase the producer completes without bytes.

Launch contract (`launch`): grid walk.tile_grid (Tr, nheads, batch; causal: nheads, Tr, batch, the longest
tiles of each batch element first), or for a persistent kernel walk.persistent_grid (launch.resident_blocks
blocks); arguments q, k, v, out, lse as flat arrays with (batch, seqlen, head) element strides, the sequence
lengths, scale * log2(e), the causal offset, the mask lists (api.TileLists.lists), `work` = (Tr, nheads,
batch, section) for a persistent kernel (section: the (batch, head) pairs whose K and V fit the L2 budget
together, walk.section_pairs; (0, 0, 0, 0) otherwise, unused), and `maps`: the tensor maps of q, k, v
(flat uint64, tma.py) for a producer that copies by TMA (MmaTiles.tma), else one zero map (unused); the
warp-specialised kernel then takes `counter`: with MmaTiles.dynamic a zeroed int32 (work_counter) from
which its blocks draw their work tiles after the first (blockIdx.x), else a placeholder it never reads.
"""
from dataclasses import replace
from functools import lru_cache

import numpy as np
from numba import cuda, int32, uint32, uint64

from . import tma
from .convert import acc_constant, acc_type, storage_dtype, storer
from .fragments import make_store_rows, pair_packer
from .launch import Launchable, inline_device, kernel, resident_blocks, strides3
from .pipeline import make_pipeline
from .softmax import LOG2E, make_softmax
from .tiles import make_ops
from .walk import make_walk, make_work_order, persistent_grid, section_pairs, tile_grid
from .wgmma_tiles import swizzle_width


def _make_epilogue(plan, ops, finalize):
    """epilogue(m, l, acc, sl2, o, lse, b, h, row0, nq, o_st, lse_st, tid): O = acc / l and lse stored."""
    R = ops.frag.rows
    row_of, GROUP = ops.frag.row, ops.frag.group
    ACC = acc_type(plan.dtype)
    store_o = make_store_rows(ops.frag, plan.headdim, storer(plan.dtype), pair_packer(plan, ops.frag))

    @inline_device
    def epilogue(m, l, acc, sl2, o, lse, b, h, row0, nq, o_st, lse_st, tid):
        inv = cuda.local.array(R, ACC)
        lse_row = cuda.local.array(R, ACC)
        finalize(m, l, inv, lse_row, sl2)
        store_o(acc, inv, o, b * o_st[0] + h * o_st[2], row0, nq - row0, o_st[1], tid)
        if tid % GROUP == 0:      # one lane of each row's group writes its lse
            for i in range(R):
                r = row0 + row_of(tid, i)
                if r < nq:
                    lse[b * lse_st[0] + h * lse_st[1] + r] = lse_row[i]
        return

    return epilogue


@lru_cache(maxsize=None)
def make_forward_kernel(plan):
    ops = make_ops(plan, "fwd")
    BR, BC = plan.fwd.br, plan.fwd.bc
    R, C, CO = ops.frag.rows, ops.frag.cols, ops.frag.out_cols
    ACC = acc_type(plan.dtype)
    ZERO = acc_constant(plan.dtype, 0.0)
    walk = make_walk(BR, BC, plan.causal, over_keys=True)
    first_tile, next_tile, needs_mask, visible_cols, block_coords = walk
    begin, acquire = make_pipeline(ops)
    sm = make_softmax(ops.frag, plan.dtype, ops.exp2, visible_cols, plan.positive_scale,
                      narrow_mask=ops.path == "wgmma")
    scale_and_mask, online_update, update, rescale = sm.scale_and_mask, sm.online_update, sm.update, sm.rescale
    start = sm.start
    epilogue = _make_epilogue(plan, ops, sm.finalize)
    assert ops.ws is not None or not getattr(plan.fwd, "persistent", False), \
        ("a persistent forward is warp-specialised (wgmma, ring > 0)", plan.fwd)
    if ops.ws is not None:
        return _make_specialized(plan, ops, walk, scale_and_mask, update, rescale, start, epilogue)
    if ops.pipe is not None:
        return _make_pipelined(plan, ops, walk, scale_and_mask, update, rescale, start, epilogue)
    load_q, resident_ready, mm_nt, mm_pv = ops.load_resident, ops.resident_ready, ops.mm_nt, ops.mm_pv
    A_SHAPE, A_DT = ops.a_shape, ops.a_dtype

    @kernel(ops.threads, ops.smem_bytes, ops.min_blocks, ops.min_regs)
    def flash_fwd(q, k, v, o, lse, nq, nk, q_st, k_st, v_st, o_st, lse_st, scale_log2, offset,
                  kv_count, kv_index, mask_sh, mask_maxk, q_per_blk, k_per_blk, work, maps):
        smem = cuda.shared.array(0, ACC)
        i_tile, h, b = block_coords()
        tid = cuda.threadIdx.x
        row0 = i_tile * BR
        sl2 = ACC(scale_log2)
        kv = (k, b * k_st[0] + h * k_st[2], k_st[1], v, b * v_st[0] + h * v_st[2], v_st[1])

        qf = cuda.local.array(A_SHAPE, A_DT)
        load_q(smem, qf, 0, q, b * q_st[0] + h * q_st[2], row0, nq - row0, q_st[1], tid)
        mrow, nblk, t, sub, base, col0 = first_tile(kv_count, kv_index, h, i_tile, mask_sh, mask_maxk,
                                                    q_per_blk, k_per_blk, row0, nq, nk, offset)
        begin(smem, t < nblk, col0, nk, kv, tid)
        resident_ready(smem, qf, tid)

        m = cuda.local.array(R, ACC)
        l = cuda.local.array(R, ACC)
        acc = cuda.local.array((R, CO), ACC)
        s = cuda.local.array((R, C), ACC)
        start(m, l, acc)

        stage = 0
        phase = 0
        while t < nblk:
            nt, nsub, nbase, ncol0 = next_tile(kv_index, mrow, mask_maxk, k_per_blk, nblk, t, sub, base, row0,
                                               nq, nk, offset)
            acquire(smem, stage, phase, col0, nt < nblk, ncol0, nk, kv, tid)
            for i in range(R):
                for j in range(C):
                    s[i, j] = ZERO
            mm_nt(smem, qf, 0, stage, 0, s, tid)                              # S = Q K^T
            scale_and_mask(s, sl2, needs_mask(row0, col0, nq, nk, offset), tid, row0, col0, nq, nk,
                           offset)
            online_update(s, m, l, acc, sl2)                             # s <- P, acc *= alpha
            mm_pv(smem, s, stage, 1, acc, tid, False)                       # acc += P V
            t, sub, base, col0, stage, phase = nt, nsub, nbase, ncol0, 1 - stage, phase ^ stage

        epilogue(m, l, acc, sl2, o, lse, b, h, row0, nq, o_st, lse_st, tid)

    return Launchable(flash_fwd, ops.threads, ops.smem_bytes, ops.min_blocks, ops.min_regs)


def _make_tile_step(pp, needs_mask, scale_and_mask, update, rescale):
    """The two halves of a pipelined key tile j, between which the caller waits for P_j-1 V_j-1
    (pp.wait0) and may release the tile's buffers:
    softmax_j(s, pend_s, m, l, alpha, sl2, tid, row0, col0, nq, nk, offset) waits for S_j (pp.wait1),
    scales and masks it, and runs the online softmax (s <- P_j; returns whether a row max moved), while
    P_j-1 V_j-1 still runs; output_j(acc, pend_o, alpha, moved, s, pk) takes that product into acc,
    rescales acc by alpha and packs P_j as the next P V product's A operand."""

    @inline_device
    def softmax_j(s, pend_s, m, l, alpha, sl2, tid, row0, col0, nq, nk, offset):
        pp.wait1()
        pp.s_finish(s, pend_s)
        scale_and_mask(s, sl2, needs_mask(row0, col0, nq, nk, offset), tid, row0, col0, nq, nk, offset)
        return update(s, m, l, alpha, sl2)

    @inline_device
    def output_j(acc, pend_o, alpha, moved, s, pk):
        pp.o_finish(acc, pend_o)
        rescale(acc, alpha, moved)
        pp.pack(s, pk)

    return softmax_j, output_j


def _make_pipelined(plan, ops, walk, scale_and_mask, update, rescale, start, epilogue):
    """The forward with asynchronous products (module docstring): same arguments, walk, softmax, epilogue."""
    first_tile, next_tile, needs_mask, block_coords = walk.first_tile, walk.next_tile, walk.needs_mask, \
        walk.block_coords
    BR = plan.fwd.br
    R, C, CO = ops.frag.rows, ops.frag.cols, ops.frag.out_cols
    ACC = acc_type(plan.dtype)
    pp = ops.pipe
    KK = pp.steps
    load_q = ops.load_resident
    commit = ops.commit
    softmax_j, output_j = _make_tile_step(pp, needs_mask, scale_and_mask, update, rescale)

    @kernel(ops.threads, ops.smem_bytes, ops.min_blocks, ops.min_regs)
    def flash_fwd(q, k, v, o, lse, nq, nk, q_st, k_st, v_st, o_st, lse_st, scale_log2, offset,
                  kv_count, kv_index, mask_sh, mask_maxk, q_per_blk, k_per_blk, work, maps):
        smem = cuda.shared.array(0, ACC)
        i_tile, h, b = block_coords()
        tid = cuda.threadIdx.x
        row0 = i_tile * BR
        sl2 = ACC(scale_log2)
        kv = (k, b * k_st[0] + h * k_st[2], k_st[1], v, b * v_st[0] + h * v_st[2], v_st[1])

        qf = cuda.local.array(1, uint32)
        load_q(smem, qf, 0, q, b * q_st[0] + h * q_st[2], row0, nq - row0, q_st[1], tid)
        mrow, nblk, t, sub, base, col0 = first_tile(kv_count, kv_index, h, i_tile, mask_sh, mask_maxk,
                                                    q_per_blk, k_per_blk, row0, nq, nk, offset)
        m = cuda.local.array(R, ACC)
        l = cuda.local.array(R, ACC)
        alpha = cuda.local.array(R, ACC)
        acc = cuda.local.array((R, CO), ACC)
        s = cuda.local.array((R, C), ACC)
        pk = cuda.local.array((KK, 4), uint32)
        start(m, l, acc)
        if t < nblk:
            pp.stream_k(smem, 0, col0, nk, kv, tid)
            commit()
            # tile 0: S_0 alone
            nt, nsub, nbase, ncol0 = next_tile(kv_index, mrow, mask_maxk, k_per_blk, nblk, t, sub, base, row0,
                                               nq, nk, offset)
            pp.visible()
            cuda.syncthreads()                                            # Q, K_0 complete
            if nt < nblk:
                pp.stream_k(smem, 1, ncol0, nk, kv, tid)
            pp.stream_v(smem, 0, col0, nk, kv, tid)
            commit()
            pend_s = pp.s_issue(smem, 0, tid)
            pp.wait0()
            pp.s_finish(s, pend_s)
            scale_and_mask(s, sl2, needs_mask(row0, col0, nq, nk, offset), tid, row0, col0, nq, nk, offset)
            update(s, m, l, alpha, sl2)                                   # acc is zero: no rescale
            pp.pack(s, pk)
            t, sub, base, col0 = nt, nsub, nbase, ncol0
            buf = 1
            while t < nblk:
                nt, nsub, nbase, ncol0 = next_tile(kv_index, mrow, mask_maxk, k_per_blk, nblk, t, sub, base,
                                                   row0, nq, nk, offset)
                pp.visible()
                cuda.syncthreads()                       # K_j, V_j-1 complete; K_j-1, V_j-2 free
                if nt < nblk:
                    pp.stream_k(smem, 1 - buf, ncol0, nk, kv, tid)
                pp.stream_v(smem, buf, col0, nk, kv, tid)
                commit()
                pend_s = pp.s_issue(smem, buf, tid)                       # S_j = Q K_j^T
                pend_o = pp.pv_issue(smem, pk, 1 - buf, acc, False)       # O += P_j-1 V_j-1
                moved = softmax_j(s, pend_s, m, l, alpha, sl2, tid, row0, col0, nq, nk, offset)
                pp.wait_pv(col0 < nk)                                     # (col0 < nk: always; see wait_pv)
                output_j(acc, pend_o, alpha, moved, s, pk)
                t, sub, base, col0 = nt, nsub, nbase, ncol0
                buf = 1 - buf
            pp.visible()
            cuda.syncthreads()                                            # V_last complete
            pend_o = pp.pv_issue(smem, pk, 1 - buf, acc, True)
            pp.wait0()
            pp.o_finish(acc, pend_o)
        else:
            pp.visible()                                                  # Q's copy, unused
        epilogue(m, l, acc, sl2, o, lse, b, h, row0, nq, o_st, lse_st, tid)

    return Launchable(flash_fwd, ops.threads, ops.smem_bytes, ops.min_blocks, ops.min_regs)


def _make_specialized(plan, ops, walk, scale_and_mask, update, rescale, start, epilogue):
    """The warp-specialised forward (module docstring; ops.ws: fragments.WsOps): threads 0..127 are the
    producer warpgroup, which copies Q and then K_j, V_j into ring stage j mod S; the others compute
    exactly as the pipelined body does, with mbarrier waits where it has block barriers. Same arguments,
    walk, softmax and epilogue; the computing threads use their rank after the producer (ctid) wherever
    the pipelined body uses tid.

    Producer, tile j (stage s): wait until stage s is empty (the consumers finished tile j - S), copy K_j;
    once V_{j-1} (Q, for j = 0) has landed, mark it full; copy V_j; once K_j has landed, mark it full.
    So two tiles' copies are in flight and a tile is marked as soon as it is complete. With TMA
    (MmaTiles.tma, ws.fillers = 1) one producer thread does this alone: it announces each tile's bytes on
    the tile's "full" mbarrier and issues the tile's boxes, and the mbarrier completes when they have
    landed (wgmma_tiles._make_ws_ops). Consumers, tile j:
    wait for K_j and V_{j-1}, issue S_j with P_{j-1} V_{j-1}, run the softmax of S_j, and once P_{j-1}
    V_{j-1} is complete mark stage j-1 empty. Neither side waits for a phase the other can only
    complete after it: the producer's wait for stage s needs tile j - S released, which the consumers do
    at tile j - S + 1, for which the producer has already marked K and the V before it.

    A producer one tile behind (ws.lag: the tf32 path, which splits each tile into the images its products
    read) copies tile j elsewhere (put_k), and only then waits for stage s' of tile j - 1 to be empty
    (tile j - 1 - S released) and fills it from tile j - 1 (put_split). The consumers release tile j - 1 - S
    at tile j - S, which the producer marked full at its tile j - S + 1 <= j - 1: S >= 2 suffices.

    Ping-pong (ws.pingpong): warpgroup g issues a tile's products only in its turn (named barrier 1 + g)
    and then hands the turn to the other, so the two alternate on the tensor cores and each one's softmax
    runs during the other's products. Warpgroup 1 hands warpgroup 0 the first turn and keeps its last,
    so every barrier phase completes (both walk the same tiles)."""
    first_tile, next_tile, needs_mask = walk.first_tile, walk.next_tile, walk.needs_mask
    BR = plan.fwd.br
    R, C, CO = ops.frag.rows, ops.frag.cols, ops.frag.out_cols
    ACC = acc_type(plan.dtype)
    pp, ws = ops.pipe, ops.ws
    KK, S, P, NB = pp.steps, ws.stages, ws.producers, ws.nbars
    PING = ws.pingpong
    LAG = ws.lag
    PERSIST = plan.fwd.persistent
    assert not (LAG and PERSIST), ("a producer one tile behind its copies runs one work tile per block", plan.fwd)
    DYN = dynamic_order(plan)
    FULL_K, FULL_V, EMPTY, Q_EMPTY = 1, 1 + S, 1 + 2 * S, 1 + 3 * S
    work_first, work_more, work_step, work_coords = make_work_order(walk, plan.causal, PERSIST)
    softmax_j, output_j = _make_tile_step(pp, needs_mask, scale_and_mask, update, rescale)

    @kernel(ops.threads, ops.smem_bytes, ops.min_blocks, ops.min_regs)
    def flash_fwd(q, k, v, o, lse, nq, nk, q_st, k_st, v_st, o_st, lse_st, scale_log2, offset,
                  kv_count, kv_index, mask_sh, mask_maxk, q_per_blk, k_per_blk, work, maps, counter):
        smem = cuda.shared.array(0, ACC)
        bars = cuda.shared.array(NB, uint64)
        slot = cuda.shared.array(1, int32)       # DYN: the work tile the producer copies Q for
        tid = cuda.threadIdx.x
        if tid == 0:
            ws.init(bars)
        cuda.syncthreads()
        w = work_first()
        if tid < P:
            # ---------------- producer ----------------
            ws.reg_producer()
            if tid < ws.fillers:
                stage, phase, qphase = 0, 0, 0                 # ring position and Q's phase, across work tiles
                while work_more(w, work):
                    i_tile, h, b = work_coords(w, work)
                    row0 = i_tile * BR
                    kv = ws.kv_src(k, k_st, v, v_st, maps, b, h)
                    mrow, nblk, t, sub, base, col0 = first_tile(kv_count, kv_index, h, i_tile, mask_sh,
                                                                mask_maxk, q_per_blk, k_per_blk, row0, nq, nk,
                                                                offset)
                    if PERSIST:
                        ws.wait(bars, Q_EMPTY, qphase ^ 1)     # the last work tile's S products are done
                    if DYN:
                        slot[0] = w                            # published by Q's mbarrier (release)
                    ws.put_q(smem, bars, ws.q_src(q, q_st, maps, b, h), row0, nq, tid)
                    pstage, pphase = -1, 0                     # tile j - 1's stage (-1: Q) and phase
                    while t < nblk:
                        if LAG:
                            ws.put_k(smem, bars, stage, pstage, col0, nk, kv, tid)     # tile j copied
                            if pstage >= 0:
                                ws.wait(bars, EMPTY + pstage, pphase ^ 1)   # tile j - 1 - S released
                            ws.put_split(smem, bars, pstage, tid)           # tile j - 1 (Q) in, full
                        else:
                            ws.wait(bars, EMPTY + stage, phase ^ 1)    # tile j - S released (at once for j < S)
                            ws.put_k(smem, bars, stage, pstage, col0, nk, kv, tid)
                            ws.put_v(smem, bars, stage, col0, nk, kv, tid)
                        t, sub, base, col0 = next_tile(kv_index, mrow, mask_maxk, k_per_blk, nblk, t, sub,
                                                       base, row0, nq, nk, offset)
                        pstage, pphase = stage, phase
                        stage += 1
                        if stage == S:
                            stage, phase = 0, phase ^ 1
                    if LAG and pstage >= 0:
                        ws.wait(bars, EMPTY + pstage, pphase ^ 1)
                    ws.put_last(smem, bars, pstage, tid)
                    qphase ^= 1
                    if DYN:
                        w = cuda.atomic.add(counter, 0, 1) + int32(cuda.gridDim.x)
                    else:
                        w = work_step(w)
                if DYN:
                    # the end, announced as a Q phase without bytes (after the consumers released the last Q,
                    # so they never see two Q phases complete while waiting for one)
                    ws.wait(bars, Q_EMPTY, qphase ^ 1)
                    slot[0] = w
                    ws.arrive(bars, 0)
        else:
            # ---------------- consumers ----------------
            ws.reg_consumer()
            ctid = tid - P
            sl2 = ACC(scale_log2)
            m = cuda.local.array(R, ACC)
            l = cuda.local.array(R, ACC)
            alpha = cuda.local.array(R, ACC)
            acc = cuda.local.array((R, CO), ACC)
            s = cuda.local.array((R, C), ACC)
            pk = cuda.local.array((KK, 4), uint32)
            stage, phase, qphase = 0, 0, 0
            if DYN:
                ws.wait(bars, 0, qphase)                 # Q of the first work tile: the slot holds it
                w = slot[0]
            while work_more(w, work):
                i_tile, h, b = work_coords(w, work)
                row0 = i_tile * BR
                mrow, nblk, t, sub, base, col0 = first_tile(kv_count, kv_index, h, i_tile, mask_sh, mask_maxk,
                                                            q_per_blk, k_per_blk, row0, nq, nk, offset)
                start(m, l, acc)
                if t < nblk:
                    if PING and ctid >= 128:
                        ws.your_turn(ctid)                                     # warpgroup 0 issues first
                    ws.wait(bars, 0, qphase)                                   # Q
                    ws.wait(bars, FULL_K + stage, phase)                       # K_0
                    if PING:
                        ws.my_turn(ctid)
                    pend_s = pp.s_issue(smem, stage, ctid)
                    if PING:
                        ws.your_turn(ctid)
                    pp.wait0()
                    pp.s_finish(s, pend_s)
                    scale_and_mask(s, sl2, needs_mask(row0, col0, nq, nk, offset), ctid, row0, col0, nq, nk,
                                   offset)
                    update(s, m, l, alpha, sl2)                                # acc is zero: no rescale
                    pp.pack(s, pk)
                    t, sub, base, col0 = next_tile(kv_index, mrow, mask_maxk, k_per_blk, nblk, t, sub, base,
                                                   row0, nq, nk, offset)
                    pstage, pphase = stage, phase                              # tile j - 1
                    stage += 1
                    if stage == S:
                        stage, phase = 0, phase ^ 1
                    while t < nblk:
                        ws.wait(bars, FULL_K + stage, phase)                   # K_j
                        ws.wait(bars, FULL_V + pstage, pphase)                 # V_j-1
                        if PING:
                            ws.my_turn(ctid)
                        pend_s = pp.s_issue(smem, stage, ctid)                 # S_j = Q K_j^T
                        pend_o = pp.pv_issue(smem, pk, pstage, acc, False)     # O += P_j-1 V_j-1
                        if PING:
                            ws.your_turn(ctid)
                        moved = softmax_j(s, pend_s, m, l, alpha, sl2, ctid, row0, col0, nq, nk, offset)
                        pp.wait_pv(col0 < nk)                                  # P_j-1 V_j-1 complete
                        ws.arrive(bars, EMPTY + pstage)                        # K_j-1, V_j-1 read
                        output_j(acc, pend_o, alpha, moved, s, pk)
                        t, sub, base, col0 = next_tile(kv_index, mrow, mask_maxk, k_per_blk, nblk, t, sub,
                                                       base, row0, nq, nk, offset)
                        pstage, pphase = stage, phase
                        stage += 1
                        if stage == S:
                            stage, phase = 0, phase ^ 1
                    if PERSIST:
                        ws.arrive(bars, Q_EMPTY)                               # every S product complete
                    ws.wait(bars, FULL_V + pstage, pphase)                     # V_last
                    if PING:
                        ws.my_turn(ctid)
                    pend_o = pp.pv_issue(smem, pk, pstage, acc, True)
                    if PING and ctid < 128:
                        ws.your_turn(ctid)          # warpgroup 1 issues last: no turn to hand over
                    pp.wait0()
                    pp.o_finish(acc, pend_o)
                    if PERSIST:
                        ws.arrive(bars, EMPTY + pstage)                        # K_last, V_last read
                elif PERSIST:
                    # Q is unused, but its phase is waited for: a producer thread that left it for the next
                    # work tile's Q would otherwise arrive there before a slower one arrived here
                    ws.wait(bars, 0, qphase)
                    ws.arrive(bars, Q_EMPTY)
                epilogue(m, l, acc, sl2, o, lse, b, h, row0, nq, o_st, lse_st, ctid)
                qphase ^= 1
                if DYN:
                    ws.wait(bars, 0, qphase)             # the next work tile's Q, or the end
                    w = slot[0]
                else:
                    w = work_step(w)

    return Launchable(flash_fwd, ops.threads, ops.smem_bytes, ops.min_blocks, ops.min_regs)


def dynamic_order(plan):
    """Whether the forward of `plan` takes its work tiles from a counter (MmaTiles.dynamic): persistent,
    warp-specialised, its producer one TMA thread (the one that draws them)."""
    t = plan.fwd
    return bool(plan.path == "wgmma" and t.ring and t.persistent and t.tma and t.dynamic)


def launches(plan, stream, q, k, v, out, lse, nq, nk, scale, offset, masks):
    """[(kernel, grid, stream, args)] of the forward pass. q, k, v, out: interop.View of (B, N, H, d); lse:
    View of (B, H, Nq); masks.lists(br, bc, transpose) gives the walk arguments for the kernel's tiles.
    A plan whose producer copies by TMA (MmaTiles.tma) runs without it where the tensor maps of q, k, v
    cannot be made (tma_maps). A tf32 plan with MmaTiles.presplit first launches the kernel that splits
    k and v into scratch (tf32_tiles.presplit_launch)."""
    B, H = q.shape[0], q.shape[2]
    maps = None
    if _uses_tma(plan):
        maps = tma_maps(plan, q, k, v, stream)
        if maps is None:
            plan = replace(plan, fwd=replace(plan.fwd, tma=False))
    if maps is None:
        maps = np.zeros(tma.hopper.TMAP_WORDS, np.uint64) if q.framework == "numpy" else tma.placeholder(q.device)
    first = []
    if plan.path == "tf32" and plan.fwd.presplit:     # K, V split once into scratch images, which the kernel
        from .tf32_tiles import presplit_launch       # takes as its K and V operands
        split, k, v = presplit_launch(plan.fwd, plan.headdim, stream, k, v)
        first = [split] if split is not None else []
    kern = make_forward_kernel(plan)
    if getattr(plan.fwd, "persistent", False):
        section = 0
        if plan.causal:     # a section's K and V within the L2 (walk.section_pairs)
            section = section_pairs(2 * nk * plan.headdim * storage_dtype(plan.dtype).itemsize, H * B)
        grid, work = persistent_grid(nq, plan.fwd.br, H, B, resident_blocks(kern), section)
    else:
        grid, work = tile_grid(plan.causal, nq, plan.fwd.br, H, B, "seqlen_q"), (0, 0, 0, 0)
    args = (q.flat, k.flat, v.flat, out.flat, lse.flat, nq, nk, strides3(q), strides3(k), strides3(v),
            strides3(out), (lse.strides[0], lse.strides[1]), scale * LOG2E, offset,
            *masks.lists(plan.fwd.br, plan.fwd.bc, False), work, maps)
    if getattr(plan.fwd, "ring", 0):
        args += (work_counter(q, stream) if dynamic_order(plan) else maps,)    # (a placeholder: never read)
    return first + [(kern, grid, stream, args)]


def work_counter(like, stream):
    """A zeroed int32 counter for one dynamic-order launch (MmaTiles.dynamic), allocated in the framework
    of the View `like` and zeroed on `stream` (the launch's; torch's current stream for torch): its own
    per launch, so launches on other streams, graph replays and a launch that failed half-way never share
    or inherit a count."""
    from .. import interop
    if like.framework != "torch" and (like.device == "cpu" or like.framework == "numpy"):
        buf = np.zeros(1, np.int32)            # the simulator's, or tools/ptx_report.py's (compiling only)
    else:
        buf = interop.empty_like_framework(like.framework, like.device, (1,), "int32")
    view = interop.flat_view(buf, "work counter")       # (its DeviceBuffer keeps buf alive)
    if like.framework == "torch":
        buf.zero_()                            # on torch's current stream: the launch's
    elif not isinstance(buf, np.ndarray):
        tma.zero_int32(view.ptr, 1, stream)
    return view.flat


def _uses_tma(plan):
    return plan.path == "wgmma" and plan.aligned and plan.fwd.ring > 0 and plan.fwd.tma


def tma_maps(plan, q, k, v, stream=0):
    """The kernel's `maps` argument for a TMA producer: the tensor maps of Q (box: the query tile), K and V
    (the key tile), one swizzle span of columns per box (tma.py), where the kernels run (copied there in
    order on `stream`, the launch's); None where one cannot be made. Views of the "numpy" framework
    (tools/ptx_report.py compiles without a GPU) get zero maps."""
    dp = plan.fwd.padded_headdim(plan.headdim)
    sw = swizzle_width(dp)
    if q.framework == "numpy":
        return np.zeros(3 * tma.hopper.TMAP_WORDS, np.uint64)
    specs = tuple(tma.head_tile_spec(x, rows, sw // 2, sw) for x, rows in ((q, plan.fwd.br), (k, plan.fwd.bc),
                                                                          (v, plan.fwd.bc)))
    return tma.device_maps(specs, q.device, stream)


def launch(*args):
    """Run the forward pass (arguments as `launches`)."""
    for kern, grid, stream, kargs in launches(*args):
        kern(grid, stream, *kargs)
