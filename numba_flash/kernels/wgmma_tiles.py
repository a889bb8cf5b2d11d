"""Warpgroup tensor-core path (Hopper `wgmma.mma_async`, sm_90a): the TileOps of the forward and backward kernels.

The forward body of forward.py, unchanged, on warpgroup MMA instead of mma.sync (hopper.py has the
intrinsics and their simulator twins):

- A block is `warps` warps = warps/4 warpgroups; warpgroup g owns query rows 64g .. 64g+63 of the tile and
  each warp 16 of them, so a thread's score and output fragments are exactly mma.sync's m16n8 fragments
  with one m16 tile per warp (fragments.mma_fragment(1, ...)): the wgmma m64nN accumulator layout is that
  table repeated down the four warps. Masking, the online softmax and the epilogue are the shared ones.
- Q, K and V stay in shared memory as 16-bit tiles in the canonical K-major layout with the widest swizzle
  the padded head dim allows (128 bytes for d = 64, 128, 256; 64 or 32 for smaller dims): column blocks of
  SW/2 elements, each BM (or BN) rows of SW bytes, 16-byte chunk c of row r stored at chunk c ^ (r % 8)
  (hopper.py states the swizzle on absolute address bits, hence a run-time alignment of the buffer to
  1024 bytes). K and V share that image: for S = Q K^T, K is the K-major B operand; for O += P V, V read
  through an MN-major descriptor (trans-b) is the same bytes.
- S = Q K^T: per k16 step of the head dim one m64nBNk16 wgmma with both operands from shared memory.
  O += P V: P is packed to 16 bits in registers (the accumulator layout of S is the A-register layout of
  the next product, as on mma.sync) and each k16 step of the keys is one m64nDk16 wgmma with A from
  registers. The products are asynchronous (`AsyncOps`): forward.py's pipelined body issues S_j with
  P_{j-1} V_{j-1} and runs the softmax of S_j while the latter is still on the tensor cores.
- K and V tiles stream into two buffers each by 16-byte cp.async (tc_tiles.make_tile_copy), written
  straight into the swizzled image; a `fence.proxy.async` after each wait makes those (generic-proxy)
  writes visible to the wgmma reads (async proxy) before the barrier.

- Warp-specialised forward (tiles.ring = S > 0; `_make_ws_ops`, forward.py's _make_specialized): a
  producer warpgroup in front of the computing ones copies Q and streams K, V into an S-stage ring of the
  same swizzled buffers, guarded by mbarriers instead of a block barrier per tile; setmaxnreg gives the
  consumers 224 registers and the producer 56 (two consumer warpgroups). tiles.pingpong: the two
  consumer warpgroups take turns to issue their products (named barriers), so one's softmax overlaps
  the other's products. Chosen through the tiles (NUMBA_FLASH_FWD_TILES="128,128,8,0,0,2[,1]"); not the
  default until it measures faster.

The backward kernels of backward.py (dK/dV over key tiles, dQ over query tiles) run on the same layout with
the resident tile's rows (keys, or queries) as the wgmma M dimension: make_wgmma_bwd_ops. Past head dim
128 a "wgmma" plan's backward kernels are "mma" plans (configs.backward_path). With deterministic=False the
dK/dV kernel computes dQ itself (make_wgmma_dq_ops: dS^T staged in a swizzled shared image that two SS
wgmmas read, float32 reductions into a global accumulator), where the tiles allow it (fused_dq_split).
"""
from functools import lru_cache

from numba import cuda, float32, uint32

from . import hopper, ptx
from .fragments import AsyncBwdOps, AsyncOps, DqOps, Fragment, TileOps, WsOps, make_red_rows, mma_fragment
from .launch import inline_device
from .tc_tiles import make_stream, make_tile_copy, make_vec_stream

ALIGN = 1024               # bytes: a 128B-swizzle atom (8 rows x 128 bytes)


def swizzle_width(padded_headdim, elem_bytes=2):
    """Bytes per row of one column block: the widest swizzle (128, 64, 32) dividing a row of the head dim
    (elements of elem_bytes: 2, or 4 for the tf32 path's float32 images)."""
    row = elem_bytes * padded_headdim
    return next(s for s in (128, 64, 32) if row % s == 0)


@inline_device
def base_bytes(smem):
    """Bytes from smem[0] to the first 1024-byte-aligned shared address."""
    return (ALIGN - hopper.shared_address(smem) % ALIGN) % ALIGN


@inline_device
def desc_at(smem, off, lbo, sbo, swizzle):
    """The matrix descriptor of the operand at byte `off` of smem (`off` counted from smem[0], past the
    aligned start): the aligned start's descriptor, which does not change over the kernel (so it is made
    once), stepped by hopper.smem_desc_add. Products then step each k16 slice by one more add."""
    base = base_bytes(smem)
    return hopper.smem_desc_add(hopper.make_smem_desc(smem, base, lbo, sbo, swizzle), off - base)


@inline_device
def desc_pair(smem, aoff, lbo_a, sbo_a, swizzle_a, boff, lbo_b, sbo_b, swizzle_b):
    """desc_at for an A and a B operand."""
    return desc_at(smem, aoff, lbo_a, sbo_a, swizzle_a), desc_at(smem, boff, lbo_b, sbo_b, swizzle_b)


def make_swizzled_copy(rows, dp, headdim, aligned, nthreads, fixed_passes=False, elem_bytes=2):
    """copy(smem, off, g, base, row0, nrows, stride, tid) (tc_tiles.make_tile_copy): the rows x dp tile
    at byte `off` past the aligned start, in the swizzled K-major image (module docstring; elem_bytes=4:
    float32 elements, the tf32 path's images). fixed_passes: where a thread's rows are a whole number of
    swizzle periods apart, address its later chunks as fixed offsets from its first (fewer registers: the
    producer warpgroup's copies)."""
    sw = swizzle_width(dp, elem_bytes)
    cpb = sw // 16                         # chunks per row of one column block
    xmask = {128: 7, 64: 3, 32: 1}[sw]
    cpr = dp * elem_bytes // 16            # 16-byte chunks per row
    rstep = nthreads // cpr if nthreads % cpr == 0 else 0
    pass_words = None
    if fixed_passes and rstep and (rstep * sw) % 128 == 0 and (rstep * sw >> 7) % (xmask + 1) == 0:
        pass_words = rstep * sw // 4       # the XOR pattern repeats: the same chunk, rstep rows down

    @inline_device
    def swizzled_chunk(smem, off, r, ch):
        return (base_bytes(smem) + off + (ch // cpb) * rows * sw + r * sw
                + (((ch % cpb) ^ ((r * sw >> 7) & xmask)) << 4)) // 4
    return make_tile_copy(rows, dp, headdim, aligned, nthreads, swizzled_chunk, pass_words=pass_words,
                          elem_bytes=elem_bytes)


@inline_device
def _nothing():
    return


def make_tile_streams(copy, off_b, t_bytes, then):
    """(stream_k, stream_v)(smem, buf, t0, n_other, operands, tid): copy the K (V) tile of keys t0.. into
    buffer `buf`'s K (V) image (shared bytes off_b + (2 buf [+ 1]) t_bytes from the aligned start) with
    `copy` (make_swizzled_copy's), then call `then()` (e.g. commit the copies as one group). operands: the
    kernel's (k, k base, k row stride, v, v base, v row stride)."""

    @inline_device
    def stream_k(smem, buf, t0, n_other, operands, tid):
        g0, b0, s0, g1, b1, s1 = operands
        copy(smem, off_b + 2 * buf * t_bytes, g0, b0, t0, n_other - t0, s0, tid)
        then()

    @inline_device
    def stream_v(smem, buf, t0, n_other, operands, tid):
        g0, b0, s0, g1, b1, s1 = operands
        copy(smem, off_b + (2 * buf + 1) * t_bytes, g1, b1, t0, n_other - t0, s1, tid)
        then()

    return stream_k, stream_v


@lru_cache(maxsize=None)
def _acc_io(nacc):
    """to_acc(c) -> tuple, from_acc(c, acc): the (2, nacc/2) fragment array c[h, 2*nt + e] of the
    m16n8 layout <-> the nacc wgmma accumulators acc[4*nt + 2*h + e] (hopper.py's fragment table)."""
    order = [(h, 2 * (j // 4) + j % 2) for j in range(nacc) for h in [(j >> 1) & 1]]
    src = "def to_acc(c):\n    return (" + ", ".join(f"c[{h}, {k}]" for h, k in order) + ",)\n"
    src += "def from_acc(c, a):\n" + "".join(f"    c[{h}, {k}] = a[{j}]\n" for j, (h, k) in enumerate(order))
    src += "    return\n"
    ns = {}
    exec(compile(src, f"<wgmma acc io {nacc}>", "exec"), ns)
    return inline_device(ns["to_acc"]), inline_device(ns["from_acc"])


@inline_device
def copies_visible():
    """After this thread's copies landed: make them visible to wgmma (async proxy); then a barrier."""
    ptx.cp_async_wait_all()
    hopper.fence_proxy_async_shared()


@inline_device
def wait1():
    """All but the newest committed wgmma group complete."""
    hopper.wgmma_wait_group(1)


@inline_device
def wait0():
    """Every committed wgmma group complete."""
    hopper.wgmma_wait_group(0)


@inline_device
def wait0_late(flag):
    """wait0 that stays after the code before it (hopper.py, "Where ptxas puts the waits"): `flag`, any
    run-time condition uniform over the warpgroup, picks one of two spellings; both wait."""
    if flag:
        hopper.wgmma_wait_group(0)
    else:
        hopper.wgmma_wait_group_alt(0)


@inline_device
def wait0_flag(flag):
    """wait0 with wait0_late's signature (MmaTiles.late_pv_wait = False: where ptxas puts it)."""
    hopper.wgmma_wait_group(0)


SWIZZLE_MODES = {128: hopper.SWIZZLE_128B, 64: hopper.SWIZZLE_64B, 32: hopper.SWIZZLE_32B}


@lru_cache(maxsize=None)
def make_products(dtype_name, dp, rows_a, rows_b):
    """The warpgroup products of every kernel of the path, on swizzled K-major tiles of dp columns (rows_a
    rows for the resident operand, rows_b for a streamed one; byte offsets include the aligned start).
    Returns (ss, pack, pack_pinned, rs, s_finish, o_finish):

    ss(smem, aoff, boff)            -> pending A Bᵀ (64 rows of A at aoff, the rows_b rows of B at boff),
                                       from zero: dp/16 SS wgmmas m64n(rows_b)k16, fenced and committed
    pack(p, pk), pack_pinned(p, pk) the score fragment p (64 x rows_b) -> 16-bit A registers pk[k16 step,
                                    4]; pinned: through hopper.wgmma_fence_a, so every conversion precedes
                                    the next fence (for a product issued right after the packing)
    rs(smem, pk, boff, o, fence)    -> pending o + P B (P from pk, B the rows_b x dp tile at boff read
                                       MN-major): rows_b/16 RS wgmmas m64n(dp)k16, committed; fence:
                                       wgmma_fence first (registers were written since the last one)
    s_finish(c, pending), o_finish(c, pending)   the completed product into the fragment array c
    """
    sw = swizzle_width(dp)
    swmode = SWIZZLE_MODES[sw]
    sbo = 8 * sw                           # next 8 rows (one atom)
    ks_steps = dp // 16
    kk_steps = rows_b // 16
    l_a = rows_a * sw                      # bytes of one column block of the resident tile
    l_b = rows_b * sw                      # ... of a streamed tile: its LBO when read MN-major
    lbo_k = 16                             # K-major swizzled: LBO unused ("assumed 1")
    n_s = rows_b                           # a literal of wgmma_acc_zeros (a bound name, see hopper.py)
    if dtype_name == "float16":
        wg_ss, wg_rs, cvt = hopper.wgmma_f16, hopper.wgmma_f16_rs, ptx.pack_f16x2
    else:
        wg_ss, wg_rs, cvt = hopper.wgmma_bf16, hopper.wgmma_bf16_rs, ptx.pack_bf16x2
    _, from_s = _acc_io(rows_b // 2)
    to_o, from_o = _acc_io(dp // 2)

    @inline_device
    def ss(smem, aoff, boff):
        acc = hopper.wgmma_acc_zeros(n_s)
        da0, db0 = desc_pair(smem, aoff, lbo_k, sbo, swmode, boff, lbo_k, sbo, swmode)
        hopper.wgmma_fence()
        for ks in range(ks_steps):
            da = hopper.smem_desc_add(da0, (ks * 32 // sw) * l_a + (ks * 32) % sw)
            db = hopper.smem_desc_add(db0, (ks * 32 // sw) * l_b + (ks * 32) % sw)
            acc = wg_ss(da, db, acc, 0 if ks == 0 else 1, 0, 0)     # scale_d = 0: the product starts at zero
        hopper.wgmma_commit_group()
        return acc

    def make_pack(pin):
        @inline_device
        def pack(p, pk):
            for kk in range(kk_steps):
                j = 4 * kk
                a0 = cvt(p[0, j], p[0, j + 1])               # row g,   columns 2t, 2t+1
                a1 = cvt(p[1, j], p[1, j + 1])               # row g+8
                a2 = cvt(p[0, j + 2], p[0, j + 3])           # row g,   columns 8+2t, 9+2t
                a3 = cvt(p[1, j + 2], p[1, j + 3])           # row g+8
                if pin:
                    a0, a1, a2, a3 = hopper.wgmma_fence_a(a0, a1, a2, a3)
                pk[kk, 0], pk[kk, 1], pk[kk, 2], pk[kk, 3] = a0, a1, a2, a3
            return
        return pack

    @inline_device
    def rs(smem, pk, boff, o, fence):
        acc = hopper.wgmma_fence_operand(to_o(o))
        db0 = desc_at(smem, boff, l_b, sbo, swmode)
        if fence:
            hopper.wgmma_fence()
        for kk in range(kk_steps):
            db = hopper.smem_desc_add(db0, kk * 16 * sw)
            acc = wg_rs(pk[kk, 0], pk[kk, 1], pk[kk, 2], pk[kk, 3], db, acc, 1, 1)
        hopper.wgmma_commit_group()
        return acc

    @inline_device
    def s_finish(c, acc):
        from_s(c, hopper.wgmma_fence_operand(acc))

    @inline_device
    def o_finish(c, acc):
        from_o(c, hopper.wgmma_fence_operand(acc))

    return ss, make_pack(False), make_pack(True), rs, s_finish, o_finish


@lru_cache(maxsize=None)
def make_wgmma_ops(role, tiles, headdim, dtype_name, aligned, fused_dq=False):
    """TileOps of the warpgroup path for kernel `role`. The forward's ("fwd") products are asynchronous
    (`pipe`, forward.py's pipelined body; the synchronous fields mm_nt, mm_pv, stream, ... are None); so
    are the backward's ("dkdv", "dq": make_wgmma_bwd_ops; fused_dq: the dK/dV kernel's own dQ, its
    additions "atomic" or "bulk", configs.DQ_MODES)."""
    if role != "fwd":
        return make_wgmma_bwd_ops(role, tiles, headdim, dtype_name, aligned, fused_dq)
    assert dtype_name in ("float16", "bfloat16")
    BM, BN, W = tiles.br, tiles.bc, tiles.warps
    assert W % 4 == 0 and BM == 16 * W, ("a warp owns 16 rows, a warpgroup 64", tiles)
    assert BN % 16 == 0 and BN <= 256, tiles
    RING = tiles.ring
    assert RING == 0 or RING >= 2, tiles
    NTHREADS = 32 * W                      # computing threads (after the producer warpgroup, if any)
    DP = tiles.padded_headdim(headdim)
    assert DP <= 256, headdim
    SW = swizzle_width(DP)
    KK = BN // 16                          # k16 steps of P V over the keys
    NT, DT = BN // 8, DP // 8
    NACC_S, NACC_O = BN // 2, DP // 2
    Q_BYTES = BM * DP * 2
    T_BYTES = BN * DP * 2                  # one streamed tile (K or V)
    OFF_B = Q_BYTES                        # streamed: [buffer][K, V] tiles, bytes from the aligned start
    SMEM = ALIGN + Q_BYTES + 2 * max(2, RING) * T_BYTES
    ss, pack_p, _, rs, s_finish, o_finish = make_products(dtype_name, DP, BM, BN)

    copy_a, copy_b = (make_swizzled_copy(rows, DP, headdim, aligned, NTHREADS) for rows in (BM, BN))

    @inline_device
    def load_resident(smem, afrag, slot, g, base, row0, nrows, stride, tid):
        copy_a(smem, 0, g, base, row0, nrows, stride, tid)
        ptx.cp_async_commit()

    # K and V of one buffer index hold different tiles (K_j+1 is copied while V_j-1 is still read)
    stream_k, stream_v = make_tile_streams(copy_b, OFF_B, T_BYTES, _nothing)

    @inline_device
    def s_issue(smem, buf, tid):
        base = base_bytes(smem)
        return ss(smem, base + (tid // 128) * 64 * SW, base + OFF_B + 2 * buf * T_BYTES)     # S = Q K^T

    @inline_device
    def pv_issue(smem, pk, buf, o, fence):
        return rs(smem, pk, base_bytes(smem) + OFF_B + (2 * buf + 1) * T_BYTES, o, fence)    # O += P V

    pipe = AsyncOps(steps=KK, stream_k=stream_k, stream_v=stream_v, visible=copies_visible, s_issue=s_issue,
                    pv_issue=pv_issue, wait1=wait1, wait0=wait0, s_finish=s_finish, o_finish=o_finish,
                    pack=pack_p, wait_pv=wait0_late if tiles.late_pv_wait else wait0_flag)

    # Registers: BN/2 score and DP/2 output floats, BN/4 words of packed P; the rest is the softmax state
    # and addresses.
    min_regs = min(255, max(128, NACC_S + NACC_O + BN // 4 + 64))
    ws, threads, min_blocks = None, NTHREADS, tiles.min_blocks
    if RING:
        ws = _make_ws_ops(RING, W // 4, BM, BN, DP, headdim, aligned, OFF_B, T_BYTES, tiles.pingpong,
                          tiles.tma and aligned)
        threads, min_blocks = NTHREADS + ws.producers, 1
    return TileOps(
        path="wgmma", stages=2, threads=threads, smem_bytes=SMEM, min_blocks=min_blocks,
        min_regs=min_regs, frag=mma_fragment(1, NT, DT), a_shape=(1,), a_dtype=uint32, exp2=ptx.ex2,
        load_resident=load_resident, resident_ready=None, stream=None, commit=ptx.cp_async_commit,
        wait_all=copies_visible, vec=None, mm_nt=None, mm_pv=None, dq=None, pipe=pipe, ws=ws)


# setmaxnreg of a warp-specialised block, by its number of computing warpgroups: the launch bounds
# (384, 1) leave 168 registers per thread at entry; the producer gives most of its share to the two
# consumers. ptxas sm_90a, fp16, causal or not (2026-12-02): at (56, 224) no spills at d=64 and 128 (the
# consumers use up to 207 at d=128); at (40, 232) the producer spills 4 / 56 bytes, at (24, 240) 64 / 132.
# One consumer warpgroup (256 threads) already has 255. Three (192-query tiles, 512 threads, 128 registers
# at entry; a tuning option): 32 + 3 x 160 fills the register file; d=64 then spills 20 bytes (ptxas
# 13.5; 64 at (24, 160), 48 at (40, 152)), so that count is not a default.
WS_REGS = {2: (56, 224), 3: (32, 160)}


@lru_cache(maxsize=None)
def make_turns(pingpong, consumers):
    """(my_turn, your_turn)(ctid) of the ping-pong (fragments.WsOps): named barrier 1 + g is warpgroup g's
    turn; it completes when g's 128 threads wait there and the other warpgroup's 128 have arrived (handed
    the turn over). Literal barrier numbers: ptxas then reserves barriers 0-2 only, not all 16."""
    assert not pingpong or consumers == 2, ("the ping-pong takes two computing warpgroups", consumers)
    TURN = 2 * hopper.WARPGROUP

    @inline_device
    def my_turn(ctid):
        if ctid < 128:
            hopper.named_barrier_sync(1, TURN)
        else:
            hopper.named_barrier_sync(2, TURN)

    @inline_device
    def your_turn(ctid):
        if ctid < 128:
            hopper.named_barrier_arrive(2, TURN)
        else:
            hopper.named_barrier_arrive(1, TURN)

    return my_turn, your_turn


@inline_device
def pointer_q_src(q, q_st, maps, b, h):
    """WsOps.q_src of a producer that copies from the arrays themselves: (q, its (b, h) base, row stride)."""
    return q, b * q_st[0] + h * q_st[2], q_st[1]


@inline_device
def pointer_kv_src(k, k_st, v, v_st, maps, b, h):
    """WsOps.kv_src likewise: (k, base, row stride, v, base, row stride)."""
    return k, b * k_st[0] + h * k_st[2], k_st[1], v, b * v_st[0] + h * v_st[2], v_st[1]


@lru_cache(maxsize=None)
def make_ws_barriers(ring, fillers, consumers):
    """(init, arrive, wait, reg_producer, reg_consumer, regs) of a warp-specialised forward (fragments.WsOps):
    the mbarriers [Q, full K x ring, full V x ring, empty x ring, Q empty] with `fillers` producer arrivals
    for the "full" ones and every consumer thread's for the "empty" ones, and setmaxnreg by the number of
    consumer warpgroups (WS_REGS; no-ops where it has no entry)."""
    FULL_K, FULL_V, EMPTY, Q_EMPTY = 1, 1 + ring, 1 + 2 * ring, 1 + 3 * ring
    CONSUMER_THREADS = 128 * consumers
    regs = WS_REGS.get(consumers)
    P_REGS, C_REGS = regs if regs else (None, None)

    @inline_device
    def init(bars):
        hopper.mbarrier_init(bars, 0, fillers)               # Q has landed
        for s in range(ring):
            hopper.mbarrier_init(bars, FULL_K + s, fillers)
            hopper.mbarrier_init(bars, FULL_V + s, fillers)
            hopper.mbarrier_init(bars, EMPTY + s, CONSUMER_THREADS)   # every consumer thread done reading
        hopper.mbarrier_init(bars, Q_EMPTY, CONSUMER_THREADS)         # persistent: done with Q
        hopper.fence_mbarrier_init()

    @inline_device
    def arrive(bars, idx):
        hopper.mbarrier_arrive(bars, idx)

    @inline_device
    def wait(bars, idx, parity):
        hopper.mbarrier_wait_parity(bars, idx, parity)

    if regs:
        @inline_device
        def reg_producer():
            hopper.setmaxnreg_dec(P_REGS)

        @inline_device
        def reg_consumer():
            hopper.setmaxnreg_inc(C_REGS)
    else:
        @inline_device
        def reg_producer():
            return

        reg_consumer = reg_producer
    return init, arrive, wait, reg_producer, reg_consumer, regs


def _make_ws_ops(ring, consumers, bm, bn, dp, headdim, aligned, off_b, t_bytes, pingpong, tma):
    """WsOps of the warp-specialised forward (fragments.WsOps; forward.py's _make_specialized), buffer
    `stage` of the ring being the pipelined body's buffer. The producer warpgroup fills the same swizzled
    images in one of two ways:
    cp.async (tma False): its 128 threads copy 16-byte chunks (ordinary loads where rows are not 16-byte
        aligned), each waits for its own copies to land and arrives on the tile's "full" mbarrier (count
        128) once they have;
    TMA (tma True; tma.py, hopper.tma_load_4d): one thread copies each tile as boxes of one swizzle span
        of columns (one per column block of the image), announcing the tile's bytes on its "full" mbarrier
        (count 1), which completes when they have landed; the other producer threads only give up their
        registers. The host falls back to cp.async where TMA cannot express the inputs (forward.launches)."""
    P = hopper.WARPGROUP
    NB = 2 + 3 * ring
    FULL_K, FULL_V = 1, 1 + ring                           # make_ws_barriers' order
    FILLERS = 1 if tma else P                              # producer threads that copy and arrive
    init, arrive, wait, reg_producer, reg_consumer, regs = make_ws_barriers(ring, FILLERS, consumers)

    if tma:
        sw = swizzle_width(dp)
        CB = sw // 2                                       # columns per box (16-bit elements)
        NCB = dp // CB                                     # boxes per tile: one per column block
        Q_BYTES = 2 * bm * dp                              # (a K or V tile: t_bytes)

        @inline_device
        def q_src(q, q_st, maps, b, h):
            return maps, q, h, b

        @inline_device
        def kv_src(k, k_st, v, v_st, maps, b, h):
            return maps, k, v, h, b

        @inline_device
        def put_q(smem, bars, src, row0, nq, ptid):
            maps, g, h, b = src
            hopper.mbarrier_arrive_expect_tx(bars, 0, Q_BYTES)
            at = base_bytes(smem)
            for c in range(NCB):
                hopper.tma_load_4d(smem, at + c * bm * sw, maps, 0, g, c * CB, h, row0, b, bars, 0)

        @inline_device
        def _put(smem, bars, idx, off, m, g, t0, h, b, maps):
            hopper.mbarrier_arrive_expect_tx(bars, idx, t_bytes)
            at = base_bytes(smem) + off
            for c in range(NCB):
                hopper.tma_load_4d(smem, at + c * bn * sw, maps, m, g, c * CB, h, t0, b, bars, idx)

        @inline_device
        def put_k(smem, bars, stage, pstage, t0, nk, src, ptid):
            maps, k, v, h, b = src
            _put(smem, bars, FULL_K + stage, off_b + 2 * stage * t_bytes, 1, k, t0, h, b, maps)

        @inline_device
        def put_v(smem, bars, stage, t0, nk, src, ptid):
            maps, k, v, h, b = src
            _put(smem, bars, FULL_V + stage, off_b + (2 * stage + 1) * t_bytes, 2, v, t0, h, b, maps)

        @inline_device
        def put_last(smem, bars, pstage, ptid):
            return
    else:
        copy_q, copy_t = (make_swizzled_copy(rows, dp, headdim, aligned, P, fixed_passes=True) for rows in (bm, bn))
        load_k, load_v = make_tile_streams(copy_t, off_b, t_bytes, ptx.cp_async_commit)   # a commit group each

        q_src, kv_src = pointer_q_src, pointer_kv_src

        @inline_device
        def put_q(smem, bars, src, row0, nq, ptid):
            g, base, stride = src
            copy_q(smem, 0, g, base, row0, nq - row0, stride, ptid)
            ptx.cp_async_commit()                          # Q's barrier: at put_k of tile 0 (or put_last)

        @inline_device
        def put_k(smem, bars, stage, pstage, t0, nk, src, ptid):
            load_k(smem, stage, t0, nk, src, ptid)
            ptx.cp_async_wait_group(1)                     # V_j-1 (or Q) landed
            hopper.fence_proxy_async_shared()
            hopper.mbarrier_arrive(bars, 0 if pstage < 0 else FULL_V + pstage)

        @inline_device
        def put_v(smem, bars, stage, t0, nk, src, ptid):
            load_v(smem, stage, t0, nk, src, ptid)
            ptx.cp_async_wait_group(1)                     # K_j landed
            hopper.fence_proxy_async_shared()
            hopper.mbarrier_arrive(bars, FULL_K + stage)

        @inline_device
        def put_last(smem, bars, pstage, ptid):
            ptx.cp_async_wait_group(0)                     # the last V (or Q: no tiles)
            hopper.fence_proxy_async_shared()
            hopper.mbarrier_arrive(bars, 0 if pstage < 0 else FULL_V + pstage)

    my_turn, your_turn = make_turns(pingpong, consumers)

    return WsOps(stages=ring, producers=P, fillers=FILLERS, regs=regs, nbars=NB, init=init, arrive=arrive,
                 wait=wait, q_src=q_src, kv_src=kv_src, put_q=put_q, put_k=put_k, put_v=put_v,
                 put_last=put_last, reg_producer=reg_producer, reg_consumer=reg_consumer, pingpong=bool(pingpong),
                 my_turn=my_turn, your_turn=your_turn)


def fused_dq_split(tiles, headdim):
    """How the dK/dV kernel's warpgroups share its own dQ_i += dS K_j (make_wgmma_dq_ops), or None where
    these tiles cannot (the backward then keeps its dQ kernel): (QB, NC), the BN query rows of the tile
    as QB blocks of 64 (one wgmma M each) and a warpgroup's NC output columns. With as many 64-query
    blocks as warpgroups each warpgroup takes one block and every column (NC = padded head dim); with
    fewer, the warpgroups of a block split its columns, NC a multiple of 8 that lies inside one
    column block of K's swizzled image or is made of whole ones (the MN-major descriptor of B starts
    there)."""
    bn, bm, wg = tiles.br, tiles.bc, tiles.warps // 4
    dp = tiles.padded_headdim(headdim)
    if bn % 64 or bm % 64 or tiles.warps % 4 or tiles.ring:
        return None
    qb = bn // 64
    if qb == wg:
        nc = dp
    elif qb < wg and wg % qb == 0 and dp % (wg // qb) == 0:
        nc = dp // (wg // qb)
    else:
        return None
    half = swizzle_width(dp) // 2           # elements per row of one column block
    if nc % 8 or nc > 256 or not (nc % half == 0 or half % nc == 0):
        return None
    return qb, nc


def bulk_pitch(nc):
    """Floats per row of the bulk dQ accumulator and of a warp's staging rows: nc plus 8 (the 8-float
    shift per row makes a warp's 64-bit fragment stores conflict-free, and the row 16-byte aligned)."""
    return nc + 8


def bulk_stage_bytes(warps, nc):
    """Shared bytes of the bulk dQ's staging: 16 rows of bulk_pitch(nc) floats per warp."""
    return warps * 16 * bulk_pitch(nc) * 4


def make_wgmma_dq_ops(BM, BN, DP, off_ds, k_off, l_k, q_off, t_bytes, sw, swmode, qb, nc, wg_ss, cvt,
                      vector_red, off_stage=None):
    """The warpgroup dK/dV kernel's own dQ_i += dS K_j (fragments.DqOps; backward.py, deterministic=False).

    dS^T is the score fragment (rows: the warpgroup's 64 keys, columns: the BN queries). stage() stores it
    as 16-bit pairs into a [key][query] image at shared byte off_ds, swizzled like the other tiles (128B:
    64 queries per column block, chunk c of key row r at c ^ (r % 8)); a warp's 32 stores of one n8 tile
    hit 32 banks. Read through an MN-major descriptor that image is dS (queries x keys) as the wgmma A
    operand, and the resident K image (keys x head dim, MN-major as V is in P V) is B: warpgroup w issues
    BM/16 SS wgmmas m64n(nc)k16 for query block w % qb and output columns (w // qb) * nc .. (issue: after
    the block barrier that follows every thread's stage), finish() takes the completed accumulators and
    add() adds them into the float32 accumulator in global memory with unordered reductions.

    The same image read K-major is dS^T, the A operand of dK += dS^T Q (dk: the warpgroup's own 64 key
    rows, BN/16 SS wgmmas m64n(DP)k16 with the streamed Q tile at q_off + 2 stage t_bytes read MN-major),
    so dK's product needs no packed registers (with P^T's still in flight for dV they spilled).

    off_stage None: add() issues one `red.global.add` per element pair (the "atomic" mode, accumulator
    (B, Nq, H, DP)). Otherwise ("bulk"): each warp stores its 16 x nc partial into its own staging rows at
    shared byte off_stage (pitch bulk_pitch(nc), the pad columns stored as zeros) and lane 0 adds the whole
    slab with one asynchronous bulk reduction (hopper.bulk_reduce_add_f32) into an accumulator laid out
    (B, H, DP / nc, Nq rounded up to BN, bulk_pitch(nc)), where the slab is contiguous; its `base` is the
    (batch, head) start and `stride` the column-block stride. Lane 0 waits for its previous slab to have
    been read before the warp rewrites the rows, and drain() for every slab before the block exits."""
    half = sw // 2
    ds_block = BM * 128                    # bytes of one 64-query column block of the dS image
    kk_steps = BM // 16
    ks_steps = BN // 16
    to_d, from_d = _acc_io(nc // 2)
    to_o, _ = _acc_io(DP // 2)
    n_d = nc                               # a literal of wgmma_acc_zeros (a bound name)

    @inline_device
    def unit(tid):
        """(first query row, first output column) of this thread's warpgroup."""
        w = tid // 128
        return (w % qb) * 64, (w // qb) * nc

    @inline_device
    def row(tid, i):
        r0, _ = unit(tid)
        return r0 + ((tid % 128) // 32) * 16 + (i % 2) * 8 + (tid % 32) // 4

    @inline_device
    def col(tid, j):
        _, c0 = unit(tid)
        return c0 + (j // 2) * 8 + 2 * (tid % 4) + j % 2

    def make_stage(frag):
        # p[i, j] is key row 16 w + 8 i + g, query column 8 (j // 2) + 2 t + j % 2 of the tile (the m16n8
        # layout with one m16 tile per warp, fragments.mma_fragment(1, ...)): in n8 tile nt = j // 2 its
        # pair (2t, 2t+1) is word t of 16-byte chunk nt % 8 of column block nt // 8, stored at chunk
        # (nt % 8) ^ g. Written as offsets from the thread's first word (LLVM hoisted the 32 full
        # addresses out of the loop and spilled).
        R, C = frag.rows, frag.cols
        assert R == 2

        @inline_device
        def stage(smem, p, tid):
            lane = tid % 32
            g = lane // 4
            w0 = (base_bytes(smem) + off_ds + ((tid // 32) * 16 + g) * 128 + 4 * (lane % 4)) // 4
            for nt in range(C // 2):
                w = w0 + (nt // 8) * (ds_block // 4) + (((nt % 8) ^ g) << 2)
                ptx.st_shared_b32(smem, w, cvt(p[0, 2 * nt], p[0, 2 * nt + 1]))
                ptx.st_shared_b32(smem, w + 8 * 128 // 4, cvt(p[1, 2 * nt], p[1, 2 * nt + 1]))
            hopper.fence_proxy_async_shared()      # generic stores -> the wgmma's (async proxy) reads
            return
        return stage

    @inline_device
    def issue(smem, tid):
        r0, c0 = unit(tid)
        base = base_bytes(smem)
        a0 = base + off_ds + (r0 // 64) * ds_block
        b0 = base + k_off + (c0 // half) * l_k + (c0 % half) * 2
        acc = hopper.wgmma_acc_zeros(n_d)
        da0, db0 = desc_pair(smem, a0, ds_block, 8 * 128, hopper.SWIZZLE_128B, b0, l_k, 8 * sw, swmode)
        hopper.wgmma_fence()
        for kk in range(kk_steps):
            da = hopper.smem_desc_add(da0, kk * 16 * 128)
            db = hopper.smem_desc_add(db0, kk * 16 * sw)
            acc = wg_ss(da, db, acc, 0 if kk == 0 else 1, 1, 1)
        hopper.wgmma_commit_group()
        return acc

    @inline_device
    def finish(c, acc):
        from_d(c, hopper.wgmma_fence_operand(acc))

    @inline_device
    def dk(smem, stage, o, tid):
        base = base_bytes(smem)
        a0 = base + off_ds + (tid // 128) * 64 * 128
        b0 = base + q_off + 2 * stage * t_bytes
        acc = hopper.wgmma_fence_operand(to_o(o))
        da0, db0 = desc_pair(smem, a0, 16, 8 * 128, hopper.SWIZZLE_128B, b0, BN * sw, 8 * sw, swmode)
        hopper.wgmma_fence()
        for ks in range(ks_steps):
            da = hopper.smem_desc_add(da0, (ks * 32 // 128) * ds_block + (ks * 32) % 128)
            db = hopper.smem_desc_add(db0, ks * 16 * sw)
            acc = wg_ss(da, db, acc, 1, 0, 1)
        hopper.wgmma_commit_group()
        return acc

    drain = None
    if off_stage is None:
        red = make_red_rows(row, col, 2, nc // 4, vector_red)

        @inline_device
        def add(smem, dq, g, base, row0, nrows, stride, tid):
            red(dq, g, base, row0, nrows, stride, tid)
            return
    else:
        P = bulk_pitch(nc)
        SLAB = 16 * P                      # floats of one warp's staging rows
        SLAB_BYTES = 4 * SLAB

        @inline_device
        def add(smem, dq, g, base, row0, nrows, stride, tid):
            lane = tid % 32
            w0 = (base_bytes(smem) + off_stage) // 4 + (tid // 32) * SLAB     # the warp's rows (words)
            if lane == 0:
                hopper.bulk_wait_group_read(0)      # its previous slab has been read out
            ptx.syncwarp()
            at = w0 + (lane // 4) * P + 2 * (lane % 4)
            for i in range(2):
                for j in range(0, nc // 4, 2):
                    ptx.st2(smem, at + i * 8 * P + (j // 2) * 8, (dq[i, j], dq[i, j + 1]))
                ptx.st2(smem, at + i * 8 * P + nc, (float32(0.0), float32(0.0)))     # pad columns
            hopper.fence_proxy_async_shared()       # generic stores -> the bulk copy's (async proxy) reads
            ptx.syncwarp()
            wrow = row(tid, 0) - (lane // 4)        # the warp's first query row in the tile
            if lane == 0 and wrow < nrows:
                _, c0 = unit(tid)
                hopper.bulk_reduce_add_f32(g, base + (c0 // nc) * stride + (row0 + wrow) * P, smem, 4 * w0,
                                           SLAB_BYTES)
                hopper.bulk_commit_group()
            return

        @inline_device
        def drain(tid):
            if tid % 32 == 0:
                hopper.bulk_wait_group(0)
            return

    return make_stage, DqOps(frag=Fragment(2, 0, nc // 4, 4, row, col, col), stage=None, mm=issue, add=add,
                             finish=finish, dk=dk, drain=drain)


@lru_cache(maxsize=None)
def make_wgmma_bwd_ops(role, tiles, headdim, dtype_name, aligned, fused_dq=False):
    """TileOps of the warpgroup path for the backward kernels (role "dkdv" or "dq"), for backward.py's
    bodies; the products are asynchronous (`pipe`: AsyncBwdOps), so a body overlaps the elementwise
    work of one product with the next product (backward.py).

    The block's resident tile is its BM rows (keys for dK/dV, queries for dQ), warpgroup g owning rows
    64g..64g+63; both resident operands (K and V; Q and dO) and both streamed ones (Q and dO; K and V),
    double-buffered, are swizzled K-major images as in the forward. A product of two tiles (S^T = K Q^T,
    dP^T = V dO^T; S = Q K^T, dP = dO V^T: `nt_issue`) is one m64nBNk16 SS wgmma per k16 step of the head
    dim; the products into an accumulator (dV += P^T dO, dK += dS^T Q; dQ += dS K: `pv_issue`) pack the
    score fragment into A registers and read the streamed tile through an MN-major descriptor, one
    m64nDk16 RS wgmma per k16 step of BN: nothing is transposed or staged. The dK/dV kernel's lse and D
    vectors stream by 4-byte cp.async beside the tiles.

    The streamed tiles are copied by the block's threads with cp.async, or with MmaTiles.tma by TMA: thread
    0 announces a buffer's two tiles' bytes on the buffer's mbarrier (count 1) and issues one box per
    column block of each (the forward producer's boxes, tma.py), and every thread waits for the buffer's
    phase (TileOps.landed, pipeline.py) before the block barrier that already ends each tile's copies. The
    kernel's `maps` then holds the two streamed tensors' maps (backward.launches; Q, dO for dK/dV, K, V
    for dQ); the resident tiles and the lse and D vectors stay on cp.async."""
    assert role in ("dkdv", "dq"), role
    assert dtype_name in ("float16", "bfloat16")
    assert tiles.ring == 0, ("a producer warpgroup is the forward's only", role, tiles)
    BM, BN = (tiles.bc, tiles.br) if role == "dkdv" else (tiles.br, tiles.bc)
    W = tiles.warps
    assert W % 4 == 0 and BM == 16 * W, ("a warp owns 16 rows, a warpgroup 64", role, tiles)
    assert BN % 16 == 0 and BN <= 256, tiles
    NTHREADS = 32 * W
    DP = tiles.padded_headdim(headdim)
    assert DP <= 256, headdim
    SW = swizzle_width(DP)
    KK = BN // 16                          # k16 steps of pv_issue over the streamed rows
    NT, DT = BN // 8, DP // 8
    A_BYTES = BM * DP * 2                  # one resident tile
    T_BYTES = BN * DP * 2                  # one streamed tile
    OFF_B = 2 * A_BYTES                    # streamed: [stage][slot] tiles, bytes from the aligned start
    OFF_VEC = OFF_B + 4 * T_BYTES          # dK/dV: [stage][lse, D] vectors of BN float32
    END = OFF_VEC + (2 * 2 * BN * 4 if role == "dkdv" else 0)
    split = fused_dq_split(tiles, headdim) if fused_dq else None
    assert not fused_dq or (role == "dkdv" and split), ("no fused dQ with these tiles", role, tiles, headdim)
    OFF_DS = -(-END // ALIGN) * ALIGN      # fused dQ: the [key][query] dS image, 1024-byte aligned
    OFF_STAGE = OFF_DS + BM * BN * 2       # bulk dQ: the warps' staging rows (make_wgmma_dq_ops)
    if fused_dq == "bulk":
        SMEM = ALIGN + OFF_STAGE + bulk_stage_bytes(W, split[1])
    else:
        SMEM = ALIGN + (OFF_STAGE if fused_dq else END)
    ss, _, pack_pinned, rs, s_finish, o_finish = make_products(dtype_name, DP, BM, BN)
    copy_a, copy_b = (make_swizzled_copy(rows, DP, headdim, aligned, NTHREADS, fixed_passes=True) for rows in (BM, BN))

    @inline_device
    def load_resident(smem, afrag, slot, g, base, row0, nrows, stride, tid):
        copy_a(smem, slot * A_BYTES, g, base, row0, nrows, stride, tid)
        ptx.cp_async_commit()

    @inline_device
    def resident_ready(smem, afrag, tid):
        ptx.cp_async_wait_group(1)      # the resident copies; the first streamed tile may still fly
        hopper.fence_proxy_async_shared()
        cuda.syncthreads()
        return

    @inline_device
    def vec_word(smem):
        return (base_bytes(smem) + OFF_VEC) // 4

    stream, vec = make_stream(role, copy_b, OFF_B, T_BYTES, BN, NTHREADS, vec_word)
    stream_init = landed = None
    if tiles.tma and aligned:
        CB = SW // 2                       # columns per box (16-bit elements): one swizzle span
        NCB = DP // CB                     # boxes per tile
        stream_vecs = make_vec_stream(BN, NTHREADS, vec_word) if role == "dkdv" else None

        @inline_device
        def stream_init(operands, tid):
            if tid == 0:
                bars = operands[-3]
                hopper.mbarrier_init(bars, 0, 1)
                hopper.mbarrier_init(bars, 1, 1)
                hopper.fence_mbarrier_init()
            # before thread 0 arms buffer 0: ptxas makes the initialisation a warp-uniform instruction,
            # which racecheck charges to another lane of the warp (a hazard report without this barrier)
            cuda.syncthreads()
            return

        @inline_device
        def stream(smem, stage, t0, n_other, operands, tid):
            g0, g1 = operands[0], operands[3]
            maps, bars, h, b = operands[-4:]
            if tid == 0:
                hopper.mbarrier_arrive_expect_tx(bars, stage, 2 * T_BYTES)
                at = base_bytes(smem) + OFF_B + 2 * stage * T_BYTES
                for c in range(NCB):
                    hopper.tma_load_4d(smem, at + c * BN * SW, maps, 0, g0, c * CB, h, t0, b, bars, stage)
                    hopper.tma_load_4d(smem, at + T_BYTES + c * BN * SW, maps, 1, g1, c * CB, h, t0, b, bars,
                                       stage)
            if role == "dkdv":
                stream_vecs(smem, stage, t0, n_other, operands, tid)
            return

        @inline_device
        def landed(operands, stage, phase):
            hopper.mbarrier_wait_parity(operands[-3], stage, phase)

    @inline_device
    def nt_issue(smem, a_slot, stage, b_slot, tid):
        """Pending A[a_slot] B^T for this warpgroup's 64 rows (B = streamed tile b_slot), from zero."""
        base = base_bytes(smem)
        return ss(smem, base + a_slot * A_BYTES + (tid // 128) * 64 * SW,
                  base + OFF_B + (2 * stage + b_slot) * T_BYTES)

    @inline_device
    def pv_issue(smem, p, stage, b_slot, o, tid):
        """Pending o + P B with P = p (this thread's score fragment, packed to 16 bits here: pinned, since
        the product follows at once) and B = streamed tile b_slot (BN rows x DP) read MN-major."""
        pk = cuda.local.array((KK, 4), uint32)
        pack_pinned(p, pk)
        return rs(smem, pk, base_bytes(smem) + OFF_B + (2 * stage + b_slot) * T_BYTES, o, True)

    frag = mma_fragment(1, NT, DT)
    dq = None
    if fused_dq:
        if dtype_name == "float16":
            wg_ss, cvt = hopper.wgmma_f16, ptx.pack_f16x2
        else:
            wg_ss, cvt = hopper.wgmma_bf16, ptx.pack_bf16x2
        make_stage, dq = make_wgmma_dq_ops(BM, BN, DP, OFF_DS, 0, BM * SW, OFF_B, T_BYTES, SW, SWIZZLE_MODES[SW],
                                           *split, wg_ss, cvt, True, OFF_STAGE if fused_dq == "bulk" else None)
        dq = dq._replace(stage=make_stage(frag))

    # Registers: the output accumulators (two in dK/dV) of DP/2 floats, two score fragments of BN/2,
    # BN/4 words of packed P; the rest is addresses and the walk.
    nout = 2 if role == "dkdv" else 1
    min_regs = min(255, max(128, nout * DP // 2 + BN + BN // 4 + 48))
    return TileOps(
        path="wgmma", stages=2, threads=NTHREADS, smem_bytes=SMEM, min_blocks=tiles.min_blocks,
        min_regs=min_regs, frag=frag, a_shape=(1,), a_dtype=uint32, exp2=ptx.ex2,
        load_resident=load_resident, resident_ready=resident_ready, stream=stream,
        commit=ptx.cp_async_commit, wait_all=copies_visible, vec=vec, mm_nt=None, mm_pv=None, dq=dq,
        pipe=AsyncBwdOps(nt_issue=nt_issue, pv_issue=pv_issue, wait1=wait1, wait0=wait0, s_finish=s_finish,
                         o_finish=o_finish),
        stream_init=stream_init, landed=landed)
