"""Fragment layouts: which rows and columns of a tile each thread owns, one per path.

A thread holds its part of a score tile (S, P, dP, dS) as a local array `s[rows, cols]` and its part of an
output tile (O, dQ, dK, dV accumulators) as `acc[rows, out_cols]`, with the SAME rows. `row(tid, i)` and
`col(tid, j)` map those indices to tile coordinates, so masking, the online softmax, the P stores and the
epilogues are written once (here and in softmax.py) for both paths. The `group` lanes that share a row are
consecutive lanes of one warp, starting at a multiple of `group`: row reductions are XOR shuffles inside it.

SIMT micro-tile (simt_tiles.py): threads form a TY x TX grid, tid = ty * TX + tx. Score element (i, j) is
(ty + i*TY, tx + j*TX); output element (i, j) is (ty + i*TY, tx*DPT + j), so a thread's output columns
are contiguous. group = TX.

m16n8 accumulator fragment (mma.sync m16n8k16, PTX ISA "Matrix Fragments for mma.m16n8k16", the f32
accumulator table): warp w owns rows 16*MT*w ... of the tile, MT m16 tiles; lane = 4*g + t holds, of each
16 x 8 tile, rows g and g+8, columns 2t and 2t+1. Row index i = 2*mt + h is row 16*mt + 8*h + g of the
warp's rows; column index j = 2*nt + e is column 8*nt + 2t + e. Scores and outputs share this layout
(both are mma accumulators), and (j, j+1) for even j are adjacent columns. group = 4 (the quad of lanes
with the same g).
"""
from collections import namedtuple
from dataclasses import dataclass

from . import ptx
from .launch import inline_device


@dataclass(frozen=True)
class Fragment:
    rows: int          # tile rows a thread owns
    cols: int          # score-tile columns a thread owns
    out_cols: int      # output-tile columns a thread owns
    group: int         # lanes sharing a row
    row: object        # device fn (tid, i) -> tile row
    col: object        # device fn (tid, j) -> score-tile column
    out_col: object    # device fn (tid, j) -> output-tile column


def simt_fragment(tm, tn, ty_count, tx_count, dpt):
    @inline_device
    def row(tid, i):
        return tid // tx_count + i * ty_count

    @inline_device
    def col(tid, j):
        return tid % tx_count + j * tx_count

    @inline_device
    def out_col(tid, j):
        return (tid % tx_count) * dpt + j

    return Fragment(tm, tn, dpt, tx_count, row, col, out_col)


def mma_fragment(mt, n_tiles, out_n_tiles):
    """mt m16 tiles per warp; n_tiles n8 tiles of scores and out_n_tiles of outputs per row."""
    @inline_device
    def row(tid, i):
        return (tid // 32) * (16 * mt) + (i // 2) * 16 + (i % 2) * 8 + (tid % 32) // 4

    @inline_device
    def col(tid, j):
        return (j // 2) * 8 + 2 * (tid % 4) + j % 2

    return Fragment(2 * mt, 2 * n_tiles, 2 * out_n_tiles, 4, row, col, col)


def make_store_rows(frag, headdim, store_elem, pack=None):
    """store(acc, row_scale, g, base, row0, nrows, stride, tid): g[base + (row0 + r) * stride + c] =
    acc[i, j] * row_scale[i] for the thread's output elements (r, c) inside the nrows x headdim tile.
    Used by every epilogue (O, dQ, dK, dV) of both paths.

    pack: for 16-bit outputs whose rows start 4-byte aligned (and an even head dim), the pair packer
    (ptx.pack_f16x2 / pack_bf16x2): both layouts give a thread adjacent output columns j, j+1 for even j,
    so each pair is rounded by one cvt and written by one 32-bit store."""
    R, CO = frag.rows, frag.out_cols
    row_of, col_of = frag.row, frag.out_col
    assert pack is None or (CO % 2 == 0 and headdim % 2 == 0)

    @inline_device
    def store(acc, row_scale, g, base, row0, nrows, stride, tid):
        for i in range(R):
            r = row_of(tid, i)
            if r < nrows:
                grow = base + (row0 + r) * stride
                if pack is None:
                    for j in range(CO):
                        c = col_of(tid, j)
                        if c < headdim:
                            g[grow + c] = store_elem(acc[i, j] * row_scale[i])
                else:
                    for j in range(0, CO, 2):
                        c = col_of(tid, j)
                        if c < headdim:
                            ptx.st_global_b32(g, grow + c, pack(acc[i, j] * row_scale[i],
                                                                acc[i, j + 1] * row_scale[i]))
        return

    return store


def make_red_rows(row, col, rows, cols, vector_red):
    """red(dq, g, base, row0, nrows, stride, tid): g[base + (row0 + r) * stride + c] += dq[i, j] with
    unordered float32 reductions for the thread's elements (r, c) = (row(tid, i), col(tid, j)), i < rows,
    j < cols, r < nrows; (j, j + 1) for even j are adjacent columns, added as one red.global.add.v2.f32
    (sm_90) with vector_red. The fused dQ's "atomic" additions on both tensor-core paths."""
    @inline_device
    def red(dq, g, base, row0, nrows, stride, tid):
        for i in range(rows):
            r = row(tid, i)
            if r < nrows:
                grow = base + (row0 + r) * stride
                for j in range(0, cols, 2):
                    if vector_red:
                        ptx.red_add_f32x2(g, grow + col(tid, j), dq[i, j], dq[i, j + 1])
                    else:
                        ptx.red_add_f32(g, grow + col(tid, j), dq[i, j])
                        ptx.red_add_f32(g, grow + col(tid, j) + 1, dq[i, j + 1])
        return
    return red


def pair_packer(plan, frag):
    """The `pack` make_store_rows may use for `plan`'s outputs, or None."""
    if not plan.aligned or plan.dtype not in ("float16", "bfloat16") or frag.out_cols % 2 or plan.headdim % 2:
        return None
    return ptx.pack_f16x2 if plan.dtype == "float16" else ptx.pack_bf16x2


TileOps = namedtuple("TileOps", [
    "path", "stages", "threads", "smem_bytes", "min_blocks", "min_regs",
    "frag",            # Fragment of score and output tiles
    "a_shape", "a_dtype",   # local array holding the resident operands in registers (tensor cores)
    "exp2",            # 2**x as the path computes it
    "load_resident",   # (smem, afrag, slot, g, base, row0, nrows, stride, tid): the block's own tile(s)
    "resident_ready",  # (smem, afrag, tid): after load_resident and the first `stream`
    "stream",          # (smem, stage, t0, n_other, operands, tid): the streamed tile starting at row t0
    "commit", "wait_all",   # asynchronous-copy groups (no-ops on the synchronous SIMT path)
    "vec",             # (smem, stage, which, idx): streamed per-row vector value (dK/dV: lse, D)
    "mm_nt",           # (smem, afrag, a_slot, stage, b_slot, c, tid): c += A[a_slot] B[b_slot]^T
    "mm_pv",           # (smem, p, stage, b_slot, acc, tid, lead_sync): acc += P B[b_slot]
    "dq",              # DqOps of a dK/dV kernel that computes dQ itself (tensor cores), else None
    "pipe",            # asynchronous products, else None: AsyncOps (forward), AsyncBwdOps (backward)
    "ws",              # WsOps of a warp-specialised forward (a producer warpgroup streams), else None
    # streamed tiles copied by TMA (the wgmma backward with MmaTiles.tma), else None: before the first
    # `stream`, stream_init(operands, tid) readies the buffers' mbarriers; landed(operands, stage, phase)
    # waits until buffer `stage`'s copy of that phase parity has landed (pipeline.py)
    "stream_init", "landed",
], defaults=(None,) * 4)
AsyncOps = namedtuple("AsyncOps", [
    "steps",           # k16 steps of P V (rows of the packed-P array)
    "stream_k", "stream_v",   # (smem, buf, t0, n_other, operands, tid): K or V tile t0.. into buffer buf
    "visible",         # (): this thread's copies landed and visible to the products (then a barrier)
    "s_issue",         # (smem, buf) -> pending S = Q K[buf]^T (fences first, commits)
    "pv_issue",        # (smem, pk, buf, acc, fence) -> pending acc + P V[buf] (commits)
    "wait1", "wait0",  # all but the newest / all issued products complete
    "s_finish", "o_finish",   # (c, pending): the completed product into the fragment array c
    "pack",            # (p, pk): probabilities p (score fragment) -> 16-bit A registers pk[steps, 4]
    "wait_pv",         # (flag): wait0 where it is written, after the softmax (flag: any block-uniform
                       # run-time bool; both ways wait)
])
AsyncOps.__doc__ = """Products issued asynchronously (wgmma), so that the forward can compute the softmax of one
tile while the tensor cores multiply the next (forward.py's pipelined body, wgmma_tiles.py)."""
AsyncBwdOps = namedtuple("AsyncBwdOps", [
    "nt_issue",        # (smem, a_slot, stage, b_slot, tid) -> pending A[a_slot] B[b_slot]^T (from zero)
    "pv_issue",        # (smem, p, stage, b_slot, acc, tid) -> pending acc + P B[b_slot] (fences, commits)
    "wait1", "wait0",  # all but the newest / all issued products complete
    "s_finish", "o_finish",   # (c, pending): the completed product into the fragment array c
])
AsyncBwdOps.__doc__ = """The backward's asynchronous products (wgmma): backward.py's bodies issue a product, do the
elementwise work of the previous one, then wait (wgmma_tiles.make_wgmma_bwd_ops)."""
WsOps = namedtuple("WsOps", [
    "stages",          # depth of the K, V ring
    "producers",       # threads of the producer warpgroup: threads 0 .. producers-1; the rest compute
    "fillers",         # producer threads 0 .. fillers-1 copy and arrive (128 by cp.async, 1 by TMA)
    "regs",            # (producer, consumer) registers per thread for setmaxnreg, or None (left as compiled)
    "nbars",           # mbarriers (a uint64 shared array of this many): [Q, full K x stages, full V x
                       # stages, empty x stages, Q empty (a persistent kernel's consumers are done with Q)]
    "init",            # (bars): one thread initialises them (then a block barrier)
    "arrive", "wait",  # (bars, idx), (bars, idx, parity): mbarrier arrival, wait for a phase of that parity
    "q_src",           # (q, q_st, maps, b, h) -> the Q source put_q takes
    "kv_src",          # (k, k_st, v, v_st, maps, b, h) -> the K, V source put_k and put_v take
    "put_q",           # (smem, bars, src, row0, nq, ptid): copy Q; its "full" mbarrier (0) completes once
                       # it has landed (by cp.async: after put_k of the first tile, or put_last)
    "put_k",           # (smem, bars, stage, pstage, t0, nk, src, ptid): K of keys t0.. into ring stage
                       # `stage`; by cp.async also marks V of stage pstage (Q where pstage < 0) full
    "put_v",           # (smem, bars, stage, t0, nk, src, ptid): V likewise; by cp.async marks K full
    "put_last",        # (smem, bars, pstage, ptid): by cp.async, marks the last V (Q where pstage < 0) full
    "reg_producer", "reg_consumer",   # (): setmaxnreg of the role (no-ops where regs is None)
    "pingpong",        # the two computing warpgroups take turns to issue their products
    "my_turn", "your_turn",   # (ctid): wait for this warpgroup's turn / hand the turn to the other one
    # the producer prepares each tile one behind its copies (the tf32 path splits it into its images):
    # put_k copies tile j (not into the ring) and waits until tile j - 1 (Q) has landed; then, once ring
    # stage pstage is empty, put_split(smem, bars, pstage, ptid) fills it from tile j - 1 (Q where pstage
    # < 0) and marks it full; put_v is unused, and put_last finishes the last tile (or Q) likewise
    "lag", "put_split",
], defaults=(False, None))
WsOps.__doc__ = """A warp-specialised forward (forward.py, wgmma_tiles.make_wgmma_ops with tiles.ring): the producer
warpgroup streams K and V into a ring of `stages` buffers, each buffer's "full" mbarriers completing when its
tiles have landed and its "empty" one when every consumer thread is done reading it; consumers run the
pipelined body's products (TileOps.pipe, buffer = ring stage) and never meet at a block barrier."""
DqOps = namedtuple("DqOps", [
    "frag",            # Fragment of the thread's dQ partial (rows: query rows of the tile; out_cols)
    "stage",           # (smem, ds, tid): the thread's dS^T score fragment -> shared memory
    "mm",              # (smem, dq, tid): dq += this thread's part of dS K (after a barrier on stage)
    "add",             # (smem, dq, g, base, row0, nrows, stride, tid): global float32 g += dq
                       # (reductions; the bulk mode's through the warp's staging rows in smem)
    "finish",          # asynchronous products (wgmma), else None: mm(smem, tid) -> pending dS K (from
                       # zero), finish(dq, pending) its completed accumulators into dq
    "dk",              # asynchronous products, else None: (smem, stage, acc, tid) -> pending acc + dS^T Q
                       # (Q the streamed tile of buffer `stage`), dS^T read from the staged image
    "drain",           # asynchronous additions (bulk), else None: (tid) waits for them all (before exit)
], defaults=(None, None, None))
DqOps.__doc__ = """A dK/dV kernel's own dQ_i += dS K_j (backward.py; tc_tiles.make_dq_ops, wgmma_tiles.make_wgmma_dq_ops):
the staged dS^T, the product, and its addition into a float32 accumulator in global memory."""

TileOps.__doc__ = """What a path provides to the kernel bodies of forward.py and backward.py.

A block owns a tile of BM rows (the resident operands: Q, or Q and dO, or K and V) and streams tiles of
BN rows of the other side (K and V, or Q and dO with lse and D). Streamed tiles go through `stages`
shared-memory buffers: with one stage (SIMT) a tile is loaded synchronously between two barriers; with
two (tensor cores), tile j+1 is copied asynchronously while tile j is computed (pipeline.py).
`lead_sync` asks mm_pv to wait until every thread is done with the P staging buffer before writing it
(SIMT stages P through shared memory; tensor cores keep P in registers and ignore it)."""
