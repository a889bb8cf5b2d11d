"""Warpgroup tensor-core path (Hopper `wgmma.mma_async`, sm_90a): the forward kernel's TileOps.

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

The backward stays on mma.sync (tc_tiles.py) for now: a "wgmma" plan's backward kernels are "mma" plans.
"""
from functools import lru_cache

from numba import uint32

from . import hopper, ptx
from .fragments import AsyncOps, TileOps, mma_fragment
from .launch import inline_device
from .tc_tiles import make_tile_copy

ALIGN = 1024               # bytes: a 128B-swizzle atom (8 rows x 128 bytes)


def swizzle_width(padded_headdim):
    """Bytes per row of one column block: the widest swizzle (128, 64, 32) dividing a row of the head dim."""
    row = 2 * padded_headdim
    return next(s for s in (128, 64, 32) if row % s == 0)


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


@lru_cache(maxsize=None)
def make_wgmma_ops(role, tiles, headdim, dtype_name, aligned):
    """TileOps of the warpgroup path for the forward kernel (role "fwd"): its products are asynchronous
    (`pipe`, forward.py's pipelined body); the synchronous fields (mm_nt, mm_pv, stream, ...) are None."""
    assert role == "fwd", role
    assert dtype_name in ("float16", "bfloat16")
    BM, BN, W = tiles.br, tiles.bc, tiles.warps
    assert W % 4 == 0 and BM == 16 * W, ("a warp owns 16 rows, a warpgroup 64", tiles)
    assert BN % 16 == 0 and BN <= 256, tiles
    NTHREADS = 32 * W
    DP = tiles.padded_headdim(headdim)
    assert DP <= 256, headdim
    SW = swizzle_width(DP)
    SWMODE = {128: hopper.SWIZZLE_128B, 64: hopper.SWIZZLE_64B, 32: hopper.SWIZZLE_32B}[SW]
    XMASK = {128: 7, 64: 3, 32: 1}[SW]
    SBO = 8 * SW                           # next 8 rows (one atom)
    KS = DP // 16
    KK = BN // 16                          # k16 steps of P V over the keys
    NT, DT = BN // 8, DP // 8
    NACC_S, NACC_O = BN // 2, DP // 2
    CPB = SW // 16                         # chunks per row of one column block
    Q_BYTES = BM * DP * 2
    T_BYTES = BN * DP * 2                  # one streamed tile (K or V)
    OFF_B = Q_BYTES                        # streamed: [buffer][K, V] tiles, bytes from the aligned start
    SMEM = ALIGN + Q_BYTES + 4 * T_BYTES
    if dtype_name == "float16":
        wg_ss, wg_rs, pack = hopper.wgmma_f16, hopper.wgmma_f16_rs, ptx.pack_f16x2
    else:
        wg_ss, wg_rs, pack = hopper.wgmma_bf16, hopper.wgmma_bf16_rs, ptx.pack_bf16x2
    _, from_s = _acc_io(NACC_S)
    to_o, from_o = _acc_io(NACC_O)
    N_S = BN                               # a literal of wgmma_acc_zeros (a bound name, see hopper.py)
    L_Q = BM * SW                          # bytes of one column block of Q
    L_T = BN * SW                          # ... of a streamed tile: V's LBO (the next SW/2 output columns)
    LBO_K = 16                             # K-major swizzled: LBO unused ("assumed 1")

    @inline_device
    def base_bytes(smem):
        """Bytes from smem[0] to the first 1024-byte-aligned shared address."""
        return (ALIGN - hopper.shared_address(smem) % ALIGN) % ALIGN

    def make_copy(rows):
        """The rows x DP tile at aligned byte `off` in the swizzled image (module docstring)."""
        @inline_device
        def swizzled_chunk(smem, off, r, ch):
            return (base_bytes(smem) + off + (ch // CPB) * rows * SW + r * SW
                    + (((ch % CPB) ^ ((r * SW >> 7) & XMASK)) << 4)) // 4
        return make_tile_copy(rows, DP, headdim, aligned, NTHREADS, swizzled_chunk)

    copy_a, copy_b = make_copy(BM), make_copy(BN)

    @inline_device
    def load_resident(smem, afrag, slot, g, base, row0, nrows, stride, tid):
        copy_a(smem, 0, g, base, row0, nrows, stride, tid)
        ptx.cp_async_commit()

    @inline_device
    def copies_visible():
        """After this thread's copies landed: make them visible to wgmma (async proxy); then a barrier."""
        ptx.cp_async_wait_all()
        hopper.fence_proxy_async_shared()

    # K and V of one buffer index hold different tiles (K_j+1 is copied while V_j-1 is still read)

    @inline_device
    def stream_k(smem, buf, t0, n_other, operands, tid):
        g0, b0, s0, g1, b1, s1 = operands
        copy_b(smem, OFF_B + 2 * buf * T_BYTES, g0, b0, t0, n_other - t0, s0, tid)
        return

    @inline_device
    def stream_v(smem, buf, t0, n_other, operands, tid):
        g0, b0, s0, g1, b1, s1 = operands
        copy_b(smem, OFF_B + (2 * buf + 1) * T_BYTES, g1, b1, t0, n_other - t0, s1, tid)
        return

    @inline_device
    def s_issue(smem, buf, tid):
        base = base_bytes(smem)
        qoff = base + (tid // 128) * 64 * SW
        koff = base + OFF_B + 2 * buf * T_BYTES
        acc = hopper.wgmma_acc_zeros(N_S)
        hopper.wgmma_fence()
        for ks in range(KS):
            da = hopper.make_smem_desc(smem, qoff + (ks * 32 // SW) * L_Q + (ks * 32) % SW, LBO_K, SBO, SWMODE)
            db = hopper.make_smem_desc(smem, koff + (ks * 32 // SW) * L_T + (ks * 32) % SW, LBO_K, SBO, SWMODE)
            acc = wg_ss(da, db, acc, 0 if ks == 0 else 1, 0, 0)     # scale_d = 0: S starts from zero
        hopper.wgmma_commit_group()
        return acc

    @inline_device
    def pack_p(p, pk):
        for kk in range(KK):
            j = 4 * kk
            pk[kk, 0] = pack(p[0, j], p[0, j + 1])
            pk[kk, 1] = pack(p[1, j], p[1, j + 1])
            pk[kk, 2] = pack(p[0, j + 2], p[0, j + 3])
            pk[kk, 3] = pack(p[1, j + 2], p[1, j + 3])
        return

    @inline_device
    def pv_issue(smem, pk, buf, o, fence):
        voff = base_bytes(smem) + OFF_B + (2 * buf + 1) * T_BYTES
        acc = hopper.wgmma_fence_operand(to_o(o))
        if fence:
            hopper.wgmma_fence()
        for kk in range(KK):
            db = hopper.make_smem_desc(smem, voff + kk * 16 * SW, L_T, SBO, SWMODE)
            acc = wg_rs(pk[kk, 0], pk[kk, 1], pk[kk, 2], pk[kk, 3], db, acc, 1, 1)
        hopper.wgmma_commit_group()
        return acc

    @inline_device
    def wait1():
        hopper.wgmma_wait_group(1)

    @inline_device
    def wait0():
        hopper.wgmma_wait_group(0)

    @inline_device
    def s_finish(c, acc):
        from_s(c, hopper.wgmma_fence_operand(acc))

    @inline_device
    def o_finish(c, acc):
        from_o(c, hopper.wgmma_fence_operand(acc))

    pipe = AsyncOps(steps=KK, stream_k=stream_k, stream_v=stream_v, visible=copies_visible, s_issue=s_issue,
                    pv_issue=pv_issue, wait1=wait1, wait0=wait0, s_finish=s_finish, o_finish=o_finish,
                    pack=pack_p)

    # Registers: BN/2 score and DP/2 output floats, BN/4 words of packed P; the rest is the softmax state
    # and addresses.
    min_regs = min(255, max(128, NACC_S + NACC_O + BN // 4 + 64))
    return TileOps(
        path="wgmma", stages=2, threads=NTHREADS, smem_bytes=SMEM, min_blocks=tiles.min_blocks,
        min_regs=min_regs, frag=mma_fragment(1, NT, DT), a_shape=(1,), a_dtype=uint32, exp2=ptx.ex2,
        load_resident=load_resident, resident_ready=None, stream=None, commit=ptx.cp_async_commit,
        wait_all=copies_visible, vec=None, mm_nt=None, mm_pv=None, dq=None, pipe=pipe)
