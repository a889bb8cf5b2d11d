"""float32 attention on Hopper's tensor cores at float32 accuracy: split TF32 on warpgroup MMA (the "tf32" path).

The forward bodies of forward.py (the synchronous loop, and the warp-specialised one below; walk, masking,
online softmax and epilogue shared with every path) with these products. A tf32 tensor-core input keeps
10 of float32's 23 mantissa bits, so each operand x is split into x_hi = tf32(x) and x_lo = tf32(x - x_hi)
(ptx.tf32_round: nearest, ties away), and a product a.b is taken as three: a_lo.b_hi + a_hi.b_lo +
a_hi.b_hi, accumulated in float32. What is left out, a_lo.b_lo and the rounding of the low parts, is
~2^-22 of |a||b| per term: float32-class accuracy (the SIMT path computes in float32 FMA) at three
tensor-core products per product, tf32 wgmma running at half the 16-bit rate.

Layout (bytes from the 1024-byte-aligned start of dynamic shared memory; the swizzled K-major images of
wgmma_tiles.py, now with 4-byte elements: rows of DP words in column blocks of SW bytes, 16-byte chunk c
of row r at c ^ (r % 8) for the 128-byte swizzle):
  Q_hi, Q_lo     BM x DP each: Q is copied (cp.async) into Q_hi's image, then every thread splits its own
                 words in place and writes the low parts at the same offset of Q_lo's image;
  K_hi[2]        BN x DP, two buffers: K tile j lands in buffer j % 2 and is split the same way, into
  K_lo           a BN x DP image;
  Vt_hi, Vt_lo   DP x BN: V transposed, K-major for P V (tf32 wgmma reads only K-major B operands). The
                 transposing split reads V from
  V[2]           BN rows of DP words, two buffers (16-byte chunk c of row r at c ^ (r % 8) where DP is a
                 multiple of 32, else rows padded to DP + 4 words: either way the split's reads down a
                 column hit different banks).
One split pass per key tile (K in place, V transposed), a proxy fence and a block barrier; then
S = Q K^T: 3 DP/8 SS wgmmas m64nBNk8 per warpgroup (Q_hi/Q_lo, K_hi/K_lo from shared memory);
O += P V: P from the score registers, split there, as the A operand of 3 BN/8 RS wgmmas m64nDPk8.

With MmaTiles.split_ahead, K_lo and the Vt images are double-buffered (tile j's in buffer j % 2) and the
split of tile j + 1 runs while tile j's P V product is on the tensor cores: O += P V is issued, every
thread waits for its copies of tile j + 1 (streamed since the start of tile j) and meets the others at a
barrier, splits, fences, and only then waits for the product. S_j + 1 then needs no barrier of its own.
Without it the split runs between tile j + 1's arrival and its S product, with nothing to overlap.

Pre-split (MmaTiles.presplit; the default, on the synchronous body). Every query tile's block splits every
key tile it visits, so each K, V element is split N / BM times. With presplit a kernel of its own splits K and V once,
into images in global scratch (presplit_layout: K_hi, K_lo rows; V transposed, keys permuted, into Vt_hi,
Vt_lo rows; 4x K's size, freed after the call), and the forward's threads copy a key tile's four images
by cp.async into one of two stages while the previous tile is computed: the block does no splitting and
meets at one barrier per tile (pipeline.acquire). The images hold what the in-block split writes, so the
products and results are the same.

Warp-specialised (MmaTiles.ring, a tuning option; forward.py's _make_specialized with WsOps.lag).
A producer warpgroup does the copying and the splitting, the consumer warpgroups only the products and the
softmax, as the 16-bit wgmma path's pipelined body does: S_j issued with P_j-1 V_j-1, the softmax of S_j
while P_j-1 V_j-1 runs. The producer, for tile j: once its warpgroup is done splitting tile j - 2 from
staging buffer j % 2 (a named barrier), it copies tile j there (cp.async; K in the K images' layout, V in
plain rows), waits until tile j - 1 has landed (a second named barrier), waits until ring stage (j - 1)
% RING is empty, splits tile j - 1 into that stage's K_hi, K_lo, Vt_hi, Vt_lo, fences and marks it full.
Q lands in Q_hi and is split in place before the first tile. So one tile's copy is in flight while the
producer splits the one before, and the consumers never wait for a split unless the producer falls behind.
P's high and low parts travel as their bits (uint32) in the packed-P registers between the softmax of
tile j and the P V product issued with S_j+1. Two accumulators per product (below) leave no registers
for 64-key tiles: 32 keys per tile.

Accumulation. The tensor cores add into their float32 accumulators with truncation (measured on an H100:
with every tile's P V added into O on the tensor cores, O's error grew with the sequence length, ~2e-8
relative per accumulation, to 7e-6 at N = 1000, 10x the SIMT path's). So no long sum stays there: each
product keeps the high parts' term a_hi.b_hi and the two correction terms in two accumulators, started
from zero for every tile (a key tile for S; a key tile and at most 64 output columns for P V), and they are
added in float32 with rounding to nearest on the CUDA cores, into S and into O (which the online softmax
rescales there anyway). The longest chain in the tensor cores is then DP/8 (S) or BN/8 (P V) steps.
(The simulator's wgmma twin truncates likewise: there the scheme before it fails test_tf32's bar as it
did on the H100, and this one passes; on the H100 it passes too, 2026-12-07.)

The A registers of a k8 step hold columns t and t + 4 of the step (hopper.py), but a thread's score
fragment holds columns 2t and 2t + 1 (the accumulator layout). P V sums over keys, so the keys of each
group of eight are permuted instead: Vt's k-index i holds key 2 (i % 4) + i // 4 of its group, and P's
registers are then a thread's own columns, unshuffled.

Non-finite inputs give non-finite outputs where the SIMT path's are, but an infinite V element can give NaN
where SIMT gives inf: its low part is 0, and a probability's low part times inf is NaN when that low part is
0 (SIMT multiplies the whole probability). NaN inputs propagate as on every path.

Backward: float32 gradients stay on the SIMT kernels (configs.backward_path); this path is forward only.
"""
from dataclasses import replace
from functools import lru_cache

from numba import cuda, float32, uint32

from . import hopper, ptx
from .fragments import AsyncOps, TileOps, WsOps, mma_fragment
from .launch import Launchable, inline_device, kernel, strides3
from .tc_tiles import make_tile_copy
from .wgmma_tiles import (ALIGN, SWIZZLE_MODES, base_bytes, copies_visible, desc_at, make_swizzled_copy,
                          make_turns, make_ws_barriers, pointer_kv_src, pointer_q_src, swizzle_width, wait0,
                          wait0_flag, wait0_late, wait1)


@inline_device
def split(x):
    """(hi, lo): x = hi + lo + O(2^-22 |x|), hi and lo tf32 values (lo 0 where hi is not finite, so that
    an infinite input stays infinite instead of becoming inf - inf; the test hi - hi == 0 keeps libdevice
    calls out of the kernel, which would make ptxas serialize its wgmmas)."""
    hi = ptx.tf32_round(x)
    lo = ptx.tf32_round(x - hi) if hi - hi == float32(0) else float32(0)
    return hi, lo


@lru_cache(maxsize=None)
def _acc_sums(nacc, col0):
    """sum_into(c, a, b): c[h, col0 + k] = a[j] + b[j]; add_into(c, a, b): c[h, col0 + k] += a[j] + b[j]
    (float32, rounded to nearest: on CUDA cores, not in the tensor cores' accumulator), for the wgmma
    accumulators j of an m64n(2 nacc) product and their places (h, k) in an m16n8 fragment array
    (wgmma_tiles._acc_io's order)."""
    order = [(h, col0 + 2 * (j // 4) + j % 2) for j in range(nacc) for h in [(j >> 1) & 1]]
    src = "def sum_into(c, a, b):\n" + "".join(f"    c[{h}, {k}] = a[{j}] + b[{j}]\n" for j, (h, k) in enumerate(order))
    src += "    return\ndef add_into(c, a, b):\n"
    src += "".join(f"    c[{h}, {k}] += a[{j}] + b[{j}]\n" for j, (h, k) in enumerate(order)) + "    return\n"
    ns = {}
    exec(compile(src, f"<tf32 acc sums {nacc} {col0}>", "exec"), ns)
    return inline_device(ns["sum_into"]), inline_device(ns["add_into"])


@inline_device
def split_finite(x):
    """split for a finite x (probabilities)."""
    hi = ptx.tf32_round(x)
    return hi, ptx.tf32_round(x - hi)


@inline_device
def split_p_step(p, kk):
    """The A registers of P V's k8 step kk from the score fragment p (probabilities, split_finite):
    ((hi0, hi1, hi2, hi3), (lo0, lo1, lo2, lo3)). A register i holds row g + 8 (i % 2), k-index t + 4 (i // 2),
    i.e. key 8 kk + 2t + i // 2 of the thread's own columns (keys permuted as in the Vt images)."""
    h0, l0 = split_finite(p[0, 2 * kk])
    h1, l1 = split_finite(p[1, 2 * kk])
    h2, l2 = split_finite(p[0, 2 * kk + 1])
    h3, l3 = split_finite(p[1, 2 * kk + 1])
    return (h0, h1, h2, h3), (l0, l1, l2, l3)


@lru_cache(maxsize=None)
def _v_geometry(bn, dp):
    """(SWV, VSW, VP) of the V images: the Vt images' swizzle width (rows of bn words), whether the plain V
    rows are XOR-swizzled (dp a multiple of 32) or else padded, and the words per plain V row."""
    vsw = dp % 32 == 0
    return swizzle_width(bn, 4), vsw, dp if vsw else dp + 4


@lru_cache(maxsize=None)
def _make_splits(bn, dp, nthreads):
    """Splitting by `nthreads` threads (tid < nthreads; word offsets from smem's start, base included, each
    a multiple of 4):
    split_words(smem, src, hi, lo, nwords, tid): words src.. -> their high parts at hi.., low parts at lo..
        (src may be hi: in place), four consecutive words per thread and step (16-byte loads and stores,
        consecutive threads on consecutive chunks); an image's split has the image's layout;
    split_v(smem, v0, vt0, tid): the plain V rows at v0 (bn keys x dp words) transposed and split into the
        K-major images Vt_hi at vt0 and Vt_lo right after it, each group of 8 keys permuted (module
        docstring). A warp step takes 32 k-indices (lane = k-index within the group of 32) and one 16-byte
        chunk (4 head-dim rows n) of their V rows: one 16-byte load per lane (each quarter warp's 8 keys in
        8 different bank groups: the rows' chunks are XOR-swizzled or the rows padded, _v_geometry), then 8
        scalar stores, which land in 32 different banks (the k-index's chunk XOR n % 8 in the Vt rows)."""
    W = nthreads // 32
    SWV, VSW, VP = _v_geometry(bn, dp)
    assert bn % 32 == 0, ("split_v takes the keys 32 at a time", bn)
    CPBV = SWV // 16                       # 16-byte chunks per row of one column block of the Vt images
    XMV = CPBV - 1                         # ... and the chunk-index mask of their XOR
    VT_WORDS = dp * bn
    CH = dp // 4                           # 16-byte chunks per V row
    NSTEP = CH * (bn // 32)                # warp steps: (group of 32 keys, chunk)

    @inline_device
    def split_words(smem, src, hi_w, lo_w, nwords, tid):
        nv = nwords // 4
        for s in range(-(-nv // nthreads)):
            e = tid + s * nthreads
            if nv % nthreads == 0 or e < nv:
                x0, x1, x2, x3 = ptx.ld4(smem, src + 4 * e)
                h0, l0 = split(x0)
                h1, l1 = split(x1)
                h2, l2 = split(x2)
                h3, l3 = split(x3)
                ptx.st4(smem, hi_w + 4 * e, (h0, h1, h2, h3))
                ptx.st4(smem, lo_w + 4 * e, (l0, l1, l2, l3))
        return

    @inline_device
    def split_v(smem, v0, vt0, tid):
        il = tid % 32                                           # k-index within the group of 32
        key_l = 8 * (il // 8) + 2 * (il % 4) + (il % 8) // 4    # its key (module docstring)
        k7 = key_l & 7
        cc = (il // 4) % CPBV                                   # its 16-byte chunk in an image row's block
        for s in range(-(-NSTEP // W)):
            st = tid // 32 + s * W
            if NSTEP % W == 0 or st < NSTEP:
                kb = st // CH
                ch = st - kb * CH
                key = 32 * kb + key_l
                if VSW:
                    x = ptx.ld4(smem, v0 + key * VP + 4 * ((ch & ~7) | ((ch & 7) ^ k7)))
                else:
                    x = ptx.ld4(smem, v0 + key * VP + 4 * ch)
                ci = 8 * kb + il // 4                           # the k-index's chunk in the image row
                w0 = vt0 + (ci // CPBV) * (dp * SWV // 4) + il % 4
                for e in range(4):
                    n = 4 * ch + e
                    word = w0 + n * (SWV // 4) + ((cc ^ ((n * SWV >> 7) & XMV)) << 2)
                    hi, lo = split(x[e])
                    ptx.st1(smem, word, hi)
                    ptx.st1(smem, word + VT_WORDS, lo)
        return

    return split_words, split_v


@lru_cache(maxsize=None)
def _make_v_copy(bn, dp, headdim, aligned, nthreads):
    """copy(smem, off, g, base, row0, nrows, stride, tid) of a V tile into plain rows (_v_geometry) at byte
    `off` past the aligned start: 16-byte chunk ch of row r at ch ^ (r % 8) (swizzled rows) or at ch
    (padded rows), so split_v's reads down a column hit different banks."""
    _, VSW, VP = _v_geometry(bn, dp)
    cpr = dp // 4
    rstep = nthreads // cpr if nthreads % cpr == 0 else 0
    # a thread's passes down the tile: padded rows are VP words apart; swizzled ones repeat every 8 rows
    pass_words = rstep * VP if VSW and rstep and rstep % 8 == 0 else None

    @inline_device
    def v_chunk(smem, off, r, ch):
        if VSW:
            return (base_bytes(smem) + off) // 4 + r * VP + 4 * ((ch & ~7) | ((ch & 7) ^ (r & 7)))
        return (base_bytes(smem) + off) // 4 + r * VP + 4 * ch

    return make_tile_copy(bn, dp, headdim, aligned, nthreads, v_chunk, row_words=None if VSW else VP,
                          pass_words=pass_words, elem_bytes=4)


@lru_cache(maxsize=None)
def _make_products(bm, bn, dp, nc):
    """The split products of both bodies, issued and committed (the caller waits), each as two accumulator
    sets from zero, (main, corr) (module docstring, "Accumulation"); addresses in bytes, base included:
    s_product(smem, q_hi, q_lo, k_hi, k_lo) -> S = Q K^T of the warpgroup's 64 rows of the Q images at q_hi,
        q_lo (bm rows each) and the bn x dp K images: Q_hi K_hi, and Q_lo K_hi + Q_hi K_lo;
    pv_product(smem, hi, h0, lo, l0, vt, ci) -> output columns ci nc .. of P V, P's A registers of k8 step
        kk at hi[h0 + kk, 0:4] (high parts) and lo[l0 + kk, 0:4] (float32 values or their bits), Vt_hi at vt
        and Vt_lo right after it: P_hi V_hi, and P_lo V_hi + P_hi V_lo."""
    SW = swizzle_width(dp, 4)
    SWV = _v_geometry(bn, dp)[0]
    swmode, swmode_v = SWIZZLE_MODES[SW], SWIZZLE_MODES[SWV]
    KS, KK = dp // 8, bn // 8              # k8 steps of S = Q K^T and of P V
    l_q, l_k, l_vt = bm * SW, bn * SW, dp * SWV          # bytes of one column block of each image
    SBO, SBO_V = 8 * SW, 8 * SWV
    VT_BYTES = dp * bn * 4
    n_s, n_c = bn, nc                      # literals of wgmma_acc_zeros (bound names)

    @inline_device
    def s_product(smem, q_hi, q_lo, k_hi, k_lo):
        qh = desc_at(smem, q_hi, 16, SBO, swmode)
        ql = desc_at(smem, q_lo, 16, SBO, swmode)
        kh = desc_at(smem, k_hi, 16, SBO, swmode)
        kl = desc_at(smem, k_lo, 16, SBO, swmode)
        main = hopper.wgmma_acc_zeros(n_s)
        corr = hopper.wgmma_acc_zeros(n_s)
        hopper.wgmma_fence()
        for ks in range(KS):
            da = (ks * 32 // SW) * l_q + (ks * 32) % SW
            db = (ks * 32 // SW) * l_k + (ks * 32) % SW
            first = 0 if ks == 0 else 1
            corr = hopper.wgmma_tf32(hopper.smem_desc_add(ql, da), hopper.smem_desc_add(kh, db), corr, first)
            corr = hopper.wgmma_tf32(hopper.smem_desc_add(qh, da), hopper.smem_desc_add(kl, db), corr, 1)
            main = hopper.wgmma_tf32(hopper.smem_desc_add(qh, da), hopper.smem_desc_add(kh, db), main, first)
        hopper.wgmma_commit_group()
        return main, corr

    @inline_device
    def pv_product(smem, hi, h0, lo, l0, vt, ci):
        vh = desc_at(smem, vt, 16, SBO_V, swmode_v)
        vl = desc_at(smem, vt + VT_BYTES, 16, SBO_V, swmode_v)
        main = hopper.wgmma_acc_zeros(n_c)
        corr = hopper.wgmma_acc_zeros(n_c)
        hopper.wgmma_fence()               # (always: the accumulators are new registers)
        for kk in range(KK):
            db = (kk * 32 // SWV) * l_vt + (kk * 32) % SWV + ci * nc * SWV
            first = 0 if kk == 0 else 1
            corr = hopper.wgmma_tf32_rs(lo[l0 + kk, 0], lo[l0 + kk, 1], lo[l0 + kk, 2], lo[l0 + kk, 3],
                                        hopper.smem_desc_add(vh, db), corr, first)
            corr = hopper.wgmma_tf32_rs(hi[h0 + kk, 0], hi[h0 + kk, 1], hi[h0 + kk, 2], hi[h0 + kk, 3],
                                        hopper.smem_desc_add(vl, db), corr, 1)
            main = hopper.wgmma_tf32_rs(hi[h0 + kk, 0], hi[h0 + kk, 1], hi[h0 + kk, 2], hi[h0 + kk, 3],
                                        hopper.smem_desc_add(vh, db), main, first)
        hopper.wgmma_commit_group()
        return main, corr

    return s_product, pv_product


@inline_device
def _no_split(smem, stage, tid):
    return


@lru_cache(maxsize=None)
def _make_sync_steps(bm, bn, dp, between=_no_split):
    """The synchronous bodies' products, issued, waited for and summed (each as _make_products' two
    accumulator sets, added on the CUDA cores); addresses in bytes, base included:
    s_step(smem, q_hi, q_lo, k_hi, k_lo, c): c = S = Q K^T of the warpgroup's rows (c zero on entry);
    pv_step(smem, p, vt, o, stage, tid): o += P V, P split from the score fragment p into A registers,
        Vt_hi at vt and Vt_lo after it; `between(smem, stage, tid)` runs while the first product is on
        the tensor cores (split_ahead: the next tile's split). At DP > 64, two products of DP / 2 output
        columns, one after the other (registers)."""
    NCH = -(-dp // 64)
    NC = dp // NCH
    assert NC % 8 == 0 and NCH <= 2, dp
    KK = bn // 8
    s_product, pv_product = _make_products(bm, bn, dp, NC)
    sum_s = _acc_sums(bn // 2, 0)[0]
    add_o0 = _acc_sums(NC // 2, 0)[1]
    add_o1 = _acc_sums(NC // 2, NC // 4)[1]

    @inline_device
    def s_step(smem, q_hi, q_lo, k_hi, k_lo, c):
        main, corr = s_product(smem, q_hi, q_lo, k_hi, k_lo)
        hopper.wgmma_wait_group(0)
        sum_s(c, hopper.wgmma_fence_operand(main), hopper.wgmma_fence_operand(corr))

    @inline_device
    def pv_step(smem, p, vt, o, stage, tid):
        ph = cuda.local.array((KK, 4), float32)
        pl = cuda.local.array((KK, 4), float32)
        for kk in range(KK):
            h, lo = split_p_step(p, kk)
            # pinned before the fence: else LLVM sinks each conversion to its wgmma and ptxas fences each
            # wgmma apart (hopper.py, "Ordering")
            ph[kk, 0], ph[kk, 1], ph[kk, 2], ph[kk, 3] = hopper.wgmma_fence_a(h[0], h[1], h[2], h[3])
            pl[kk, 0], pl[kk, 1], pl[kk, 2], pl[kk, 3] = hopper.wgmma_fence_a(lo[0], lo[1], lo[2], lo[3])
        main, corr = pv_product(smem, ph, 0, pl, 0, vt, 0)
        between(smem, stage, tid)
        hopper.wgmma_wait_group(0)
        add_o0(o, hopper.wgmma_fence_operand(main), hopper.wgmma_fence_operand(corr))
        if NCH > 1:
            main, corr = pv_product(smem, ph, 0, pl, 0, vt, 1)
            hopper.wgmma_wait_group(0)
            add_o1(o, hopper.wgmma_fence_operand(main), hopper.wgmma_fence_operand(corr))

    return s_step, pv_step


@lru_cache(maxsize=None)
def _q_loader(copy_q):
    """TileOps.load_resident of the synchronous bodies: Q into Q_hi's image (at 0) by `copy_q`, committed."""
    @inline_device
    def load_resident(smem, afrag, slot, g, base, row0, nrows, stride, tid):
        copy_q(smem, 0, g, base, row0, nrows, stride, tid)
        ptx.cp_async_commit()
    return load_resident


def _sync_tile_ops(tiles, headdim, threads, smem_bytes, **ops):
    """TileOps of a synchronous tf32 body (forward.py's loop: two stages, the block's barriers)."""
    bn, dp = tiles.bc, tiles.padded_headdim(headdim)
    return TileOps(
        path="tf32", stages=2, threads=threads, smem_bytes=smem_bytes, min_blocks=max(1, tiles.min_blocks),
        min_regs=min(255, max(128, bn // 2 + dp // 2 + 80)), frag=mma_fragment(1, bn // 8, dp // 8),
        a_shape=(1,), a_dtype=uint32, exp2=ptx.ex2, commit=ptx.cp_async_commit, vec=None, dq=None, pipe=None,
        ws=None, **ops)


@lru_cache(maxsize=None)
def make_tf32_fwd_ops(tiles, headdim, aligned):
    if tiles.ring:
        return _make_tf32_ws_ops(tiles, headdim, aligned)
    if tiles.presplit:
        return _make_tf32_presplit_ops(tiles, headdim, aligned)
    BM, BN, W = tiles.br, tiles.bc, tiles.warps
    assert W % 4 == 0 and BM == 16 * W, ("a warp owns 16 rows, a warpgroup 64", tiles)
    assert BN % 8 == 0 and BN <= 256, tiles
    NTHREADS = 32 * W
    DP = tiles.padded_headdim(headdim)
    assert DP <= 256 and DP % 8 == 0, headdim
    SW = swizzle_width(DP, 4)              # Q, K images: rows of DP words
    _, VSW, VP = _v_geometry(BN, DP)       # plain V rows
    AHEAD = bool(tiles.split_ahead)
    NB = 2 if AHEAD else 1                 # buffers of K_lo and of the Vt images
    Q_BYTES, T_BYTES, VT_BYTES = BM * DP * 4, BN * DP * 4, DP * BN * 4
    OFF_QLO = Q_BYTES
    OFF_K = 2 * Q_BYTES                    # K_hi[2]
    OFF_KLO = OFF_K + 2 * T_BYTES          # K_lo[NB]
    OFF_VT = OFF_KLO + NB * T_BYTES        # [NB] x (Vt_hi, Vt_lo)
    OFF_V = OFF_VT + NB * 2 * VT_BYTES     # V[2]
    V_BYTES = BN * VP * 4
    SMEM = ALIGN + OFF_V + 2 * V_BYTES
    for off in (OFF_QLO, OFF_K, OFF_KLO, OFF_VT, OFF_VT + VT_BYTES):
        assert off % ALIGN == 0, (off, tiles, headdim)
    QLO_W = OFF_QLO // 4

    copy_q, copy_k = (make_swizzled_copy(rows, DP, headdim, aligned, NTHREADS, elem_bytes=4)
                      for rows in (BM, BN))
    copy_v = _make_v_copy(BN, DP, headdim, aligned, NTHREADS)
    split_words, split_v = _make_splits(BN, DP, NTHREADS)

    load_resident = _q_loader(copy_q)

    @inline_device
    def split_tiles(smem, stage, tid):
        """K tile `stage` split in place (low parts into K_lo); V tile `stage` transposed and split into
        Vt_hi, Vt_lo (split_v)."""
        base = base_bytes(smem)
        nb = stage if AHEAD else 0
        k_w = (base + OFF_K + stage * T_BYTES) // 4
        split_words(smem, k_w, k_w, (base + OFF_KLO + nb * T_BYTES) // 4, BN * DP, tid)
        split_v(smem, (base + OFF_V + stage * V_BYTES) // 4, (base + OFF_VT + nb * 2 * VT_BYTES) // 4, tid)
        return

    @inline_device
    def resident_ready(smem, afrag, tid):
        if AHEAD:
            ptx.cp_async_wait_all()         # Q and the first K, V tiles
            cuda.syncthreads()
            q_w = base_bytes(smem) // 4
            split_words(smem, q_w, q_w, q_w + QLO_W, BM * DP, tid)
            split_tiles(smem, 0, tid)       # (a tile that was not streamed: stale words, never read)
            hopper.fence_proxy_async_shared()      # then the first tile's barrier
        else:
            ptx.cp_async_wait_group(1)      # Q; the first K, V tiles may still fly
            cuda.syncthreads()
            q_w = base_bytes(smem) // 4
            split_words(smem, q_w, q_w, q_w + QLO_W, BM * DP, tid)       # fenced at the first mm_nt

    @inline_device
    def stream(smem, stage, t0, n_other, operands, tid):
        g0, b0, s0, g1, b1, s1 = operands
        copy_k(smem, OFF_K + stage * T_BYTES, g0, b0, t0, n_other - t0, s0, tid)
        copy_v(smem, OFF_V + stage * V_BYTES, g1, b1, t0, n_other - t0, s1, tid)

    @inline_device
    def split_next(smem, stage, tid):
        """(split_ahead, while P V runs) the next tile, streamed since this tile began; its buffers were
        last read by the products of the tile before this one, complete before this tile's barrier."""
        ptx.cp_async_wait_all()
        cuda.syncthreads()
        split_tiles(smem, 1 - stage, tid)          # (after the last tile: stale words, never read)
        hopper.fence_proxy_async_shared()          # then the next tile's barrier

    s_step, pv_step = _make_sync_steps(BM, BN, DP, split_next if AHEAD else _no_split)

    @inline_device
    def mm_nt(smem, afrag, a_slot, stage, b_slot, c, tid):
        """c = Q K^T for K tile `stage` (c is zero on entry: the body clears it), after splitting K and V
        (split_ahead: split already, during the previous tile's mm_pv or in resident_ready)."""
        if not AHEAD:
            split_tiles(smem, stage, tid)
            hopper.fence_proxy_async_shared()
            cuda.syncthreads()              # every split visible to every warpgroup's wgmmas
        base = base_bytes(smem)
        q = base + (tid // 128) * 64 * SW
        s_step(smem, q, q + OFF_QLO, base + OFF_K + stage * T_BYTES,
               base + OFF_KLO + (stage if AHEAD else 0) * T_BYTES, c)
        return

    @inline_device
    def mm_pv(smem, p, stage, b_slot, o, tid, lead_sync):
        """o += P V (V tile split and transposed by this tile's mm_nt; split_ahead: split earlier, and
        the next tile is split here while the product runs)."""
        pv_step(smem, p, base_bytes(smem) + OFF_VT + (stage if AHEAD else 0) * 2 * VT_BYTES, o, stage, tid)
        return

    return _sync_tile_ops(tiles, headdim, NTHREADS, SMEM, load_resident=load_resident,
                          resident_ready=resident_ready, stream=stream, wait_all=ptx.cp_async_wait_all,
                          mm_nt=mm_nt, mm_pv=mm_pv)


# ---------------------------------------------------------------------------------------------------------
# Pre-split (MmaTiles.presplit): K and V split once, by a kernel of their own, into images in global memory
# ---------------------------------------------------------------------------------------------------------

def presplit_keys(nk, bn):
    """Keys per row of the Vt images: nk rounded up to whole key tiles (the columns past nk are zeros, so
    every Vt copy is whole and 16-byte aligned)."""
    return -(-nk // bn) * bn


def presplit_layout(batch, nheads, nk, dp, bn):
    """(K images, Vt images) of the pre-split forward, each as (elements, (batch, key, head) element
    strides as the forward kernel takes them): float32
      K images  [batch, head, 2, nk, dp]: K_hi rows then K_lo rows of each (batch, head), head dims past
                the input's zero. The forward's K operand: row stride dp; K_lo starts nk rows after K_hi.
      Vt images [batch, head, 2, dp, NKP] (NKP = presplit_keys): Vt_hi rows then Vt_lo rows, V
                transposed, each group of 8 keys permuted as in the shared-memory Vt images (module
                docstring), zeros past nk keys and past the head dim. The forward's V operand: its
                "key" stride is the Vt row stride NKP; Vt_lo starts dp rows after Vt_hi."""
    nkp = presplit_keys(nk, bn)
    k_st = (nheads * 2 * nk * dp, dp, 2 * nk * dp)
    v_st = (nheads * 2 * dp * nkp, nkp, 2 * dp * nkp)
    return (batch * nheads * 2 * nk * dp, k_st), (batch * nheads * 2 * dp * nkp, v_st)


@lru_cache(maxsize=None)
def _make_image_copies(bn, dp, nthreads, fixed_passes=False):
    """Copies of one key tile's pre-split images (presplit_layout) into shared memory by cp.async (whole,
    aligned rows), at byte offsets from the aligned start, in the layout the products read:
    copy_k_images(smem, off, g, base, stride, t0, nk, tid): K_hi rows t0.. at off, K_lo rows at off + one
        image (zeros past nk); g, base, stride: the kernel's K operand (the K images);
    copy_vt_images(smem, off, g, base, stride, t0, tid): keys t0.. of the Vt_hi rows at off, of the Vt_lo
        rows one image later; g, base, stride: the kernel's V operand (the Vt images, stride NKP)."""
    T_BYTES = bn * dp * 4
    copy_k = make_swizzled_copy(bn, dp, dp, True, nthreads, fixed_passes=fixed_passes, elem_bytes=4)
    copy_vt = make_swizzled_copy(dp, bn, bn, True, nthreads, fixed_passes=fixed_passes, elem_bytes=4)

    @inline_device
    def copy_k_images(smem, off, g, base, stride, t0, nk, tid):
        copy_k(smem, off, g, base, t0, nk - t0, stride, tid)
        copy_k(smem, off + T_BYTES, g, base + nk * stride, t0, nk - t0, stride, tid)

    @inline_device
    def copy_vt_images(smem, off, g, base, stride, t0, tid):
        copy_vt(smem, off, g, base + t0, 0, dp, stride, tid)
        copy_vt(smem, off + T_BYTES, g, base + dp * stride + t0, 0, dp, stride, tid)

    return copy_k_images, copy_vt_images


_PRESPLIT_KEYS = 32           # keys per block of the splitting kernel
_PRESPLIT_THREADS = 256


@lru_cache(maxsize=None)
def make_presplit_kernel(dp, headdim):
    """Launchable presplit(k, v, k_st, v_st, nk, nkp, k_img, v_img) on a grid (nkp / 32, nheads, batch):
    block (x, h, b) splits keys 32 x .. 32 x + 31 of head h of batch b into the images of presplit_layout
    (k, v: the inputs' flat arrays and (batch, key, head) strides; k_img, v_img: the scratch). K rows are
    read and written along the head dim; V goes through a shared-memory tile so that the transposed Vt
    rows are written along the keys too."""
    K = _PRESPLIT_KEYS
    T = _PRESPLIT_THREADS
    TP = dp + 1                            # the tile's row pitch: the transposed reads hit different banks
    zero = float32(0)

    @kernel(T, 0, 0, 32)
    def presplit(k, v, k_st, v_st, nk, nkp, k_img, v_img):
        tile = cuda.shared.array((K, TP), float32)
        key0 = cuda.blockIdx.x * K
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        nh = cuda.gridDim.y
        tid = cuda.threadIdx.x
        kb = b * k_st[0] + h * k_st[2]
        vb = b * v_st[0] + h * v_st[2]
        ko = (b * nh + h) * 2 * nk * dp
        vo = (b * nh + h) * 2 * dp * nkp
        for e in range(tid, K * dp, T):
            r = e // dp
            c = e - r * dp
            key = key0 + r
            if key < nk:
                hi, lo = split(k[kb + key * k_st[1] + c] if c < headdim else zero)
                k_img[ko + key * dp + c] = hi
                k_img[ko + (nk + key) * dp + c] = lo
            tile[r, c] = v[vb + key * v_st[1] + c] if key < nk and c < headdim else zero
        cuda.syncthreads()
        for e in range(tid, K * dp, T):
            n = e // K
            i = e - n * K                  # k-index: key 8 (i // 8) + 2 (i % 4) + (i % 8) // 4 of the group
            hi, lo = split(tile[8 * (i // 8) + 2 * (i % 4) + (i % 8) // 4, n])
            v_img[vo + n * nkp + key0 + i] = hi
            v_img[vo + (dp + n) * nkp + key0 + i] = lo

    return Launchable(presplit, T, 0, 0, 32)


def presplit_launch(tiles, headdim, stream, k, v):
    """(launch, k_img, v_img): the splitting kernel's (kernel, grid, stream, args) (None where there are no
    keys) and the scratch images it fills (interop.View, in k's framework), viewed as the forward kernel's
    K and V operands (presplit_layout)."""
    from .. import interop
    B, NK, H = k.shape[0], k.shape[1], k.shape[2]
    DP, BN = tiles.padded_headdim(headdim), tiles.bc
    (nk_el, k_st), (nv_el, v_st) = presplit_layout(B, H, NK, DP, BN)
    views = []
    for n, st, name in ((nk_el, k_st, "tf32 K images"), (nv_el, v_st, "tf32 Vt images")):
        buf = interop.empty_like_framework(k.framework, k.device, (max(n, 1),), "float32")
        flat = interop.flat_view(buf, name)          # (its DeviceBuffer keeps buf alive)
        views.append(replace(flat, shape=(B, NK, H, DP), strides=(*st, 1)))
    if B * H * NK == 0:
        return None, views[0], views[1]
    nkp = presplit_keys(NK, BN)
    grid = (nkp // _PRESPLIT_KEYS, H, B)
    args = (k.flat, v.flat, strides3(k), strides3(v), NK, nkp, views[0].flat, views[1].flat)
    kern = make_presplit_kernel(DP, headdim)
    return (kern, grid, stream, args), views[0], views[1]


@lru_cache(maxsize=None)
def _make_tf32_presplit_ops(tiles, headdim, aligned):
    """TileOps of the synchronous body on pre-split K and V (MmaTiles.presplit): the kernel's K and V
    operands are presplit_layout's images, which every thread copies by cp.async (whole, aligned rows:
    `aligned` concerns Q only) into a stage of two; nothing is split per key tile. Q is split in place as
    in the other bodies. The products are _make_products'.

    Layout (bytes from the aligned start): Q_hi, Q_lo (BM x DP each); stage s: K_hi, K_lo (BN x DP), Vt_hi,
    Vt_lo (DP x BN)."""
    BM, BN, W = tiles.br, tiles.bc, tiles.warps
    assert W % 4 == 0 and BM == 16 * W, ("a warp owns 16 rows, a warpgroup 64", tiles)
    assert BN % 32 == 0 and BN <= 256, ("the images' keys come in groups of 32", tiles)
    assert not tiles.split_ahead and not tiles.persistent and not tiles.tma, tiles
    NTHREADS = 32 * W
    DP = tiles.padded_headdim(headdim)
    assert DP <= 256 and DP % 8 == 0, headdim
    SW = swizzle_width(DP, 4)
    Q_BYTES, T_BYTES = BM * DP * 4, BN * DP * 4          # (a Vt image has T_BYTES too)
    OFF_QLO = Q_BYTES
    OFF_T = 2 * Q_BYTES                    # stage s at OFF_T + s STAGE: K_hi, K_lo, Vt_hi, Vt_lo
    STAGE = 4 * T_BYTES
    SMEM = ALIGN + OFF_T + 2 * STAGE
    for off in (OFF_QLO, OFF_T, T_BYTES):
        assert off % ALIGN == 0, (off, tiles, headdim)
    QLO_W = OFF_QLO // 4
    s_step, pv_step = _make_sync_steps(BM, BN, DP)

    copy_q = make_swizzled_copy(BM, DP, headdim, aligned, NTHREADS, elem_bytes=4)
    copy_k_images, copy_vt_images = _make_image_copies(BN, DP, NTHREADS)
    split_words = _make_splits(BN, DP, NTHREADS)[0]

    load_resident = _q_loader(copy_q)

    @inline_device
    def resident_ready(smem, afrag, tid):
        ptx.cp_async_wait_group(1)          # Q; the first key tile's images may still fly
        cuda.syncthreads()
        q_w = base_bytes(smem) // 4
        split_words(smem, q_w, q_w, q_w + QLO_W, BM * DP, tid)
        hopper.fence_proxy_async_shared()   # then the first tile's barrier (pipeline.acquire)

    @inline_device
    def stream(smem, stage, t0, n_other, operands, tid):
        """Key tile t0's four images into stage `stage` (operands: the kernel's (k images, base, DP,
        vt images, base, NKP))."""
        g0, b0, s0, g1, b1, s1 = operands
        off = OFF_T + stage * STAGE
        copy_k_images(smem, off, g0, b0, s0, t0, n_other, tid)
        copy_vt_images(smem, off + 2 * T_BYTES, g1, b1, s1, t0, tid)

    @inline_device
    def mm_nt(smem, afrag, a_slot, stage, b_slot, c, tid):
        """c = Q K^T for the K images of stage `stage`."""
        base = base_bytes(smem)
        q = base + (tid // 128) * 64 * SW
        st = base + OFF_T + stage * STAGE
        s_step(smem, q, q + OFF_QLO, st, st + T_BYTES, c)
        return

    @inline_device
    def mm_pv(smem, p, stage, b_slot, o, tid, lead_sync):
        """o += P V with the Vt images of stage `stage`."""
        pv_step(smem, p, base_bytes(smem) + OFF_T + stage * STAGE + 2 * T_BYTES, o, stage, tid)
        return

    return _sync_tile_ops(tiles, headdim, NTHREADS, SMEM, load_resident=load_resident,
                          resident_ready=resident_ready, stream=stream, wait_all=copies_visible, mm_nt=mm_nt,
                          mm_pv=mm_pv)


# the producer warpgroup's own named barrier (ping-pong turns take 1 and 2; a literal, so ptxas reserves 0-3)
_PRODUCERS_BAR = 3


@lru_cache(maxsize=None)
def _make_tf32_ws_ops(tiles, headdim, aligned):
    """TileOps of the warp-specialised split-TF32 forward (MmaTiles.ring; forward.py's _make_specialized with
    WsOps.lag): a producer warpgroup copies Q, and every K, V tile into one of two staging buffers, and
    splits them into the tf32 images the consumers' products read, one tile behind its copies (module
    docstring, "Warp-specialised").

    Layout (bytes from the aligned start): Q_hi, Q_lo (BM x DP each; Q lands in Q_hi and is split in place);
    ring stage s: K_hi, K_lo (BN x DP), Vt_hi, Vt_lo (DP x BN); staging buffer b: K (the K images' layout)
    and V (plain rows, _v_geometry), raw float32 as copied.

    With MmaTiles.presplit the kernel's K and V are presplit_layout's images, and the producer copies them
    straight into the ring stage (the 16-bit producer's protocol: K images of tile j, then mark tile j - 1's
    V images full; Vt images of tile j, then mark its K images full; no staging buffers, no lag), splitting
    only Q, in place, once all its copies have landed (a producer barrier). Any ring of >= 2 stages."""
    BM, BN, W = tiles.br, tiles.bc, tiles.warps
    RING = tiles.ring
    assert W % 4 == 0 and BM == 16 * W, ("a warp owns 16 rows, a warpgroup 64", tiles)
    assert BN % 8 == 0 and BN <= 256, tiles
    assert RING >= 2 and (RING % 2 == 0 or tiles.presplit), ("tile j is staged in buffer j % 2 = its ring "
                                                            "stage % 2", tiles)
    assert not tiles.persistent and not tiles.tma and not tiles.split_ahead, tiles
    P = hopper.WARPGROUP
    NTHREADS = 32 * W                      # consumers
    CONSUMERS = W // 4
    DP = tiles.padded_headdim(headdim)
    assert DP <= 64 and DP % 8 == 0, ("one P V product of at most 64 output columns", headdim)
    SW = swizzle_width(DP, 4)
    VP = _v_geometry(BN, DP)[2]
    KK = BN // 8
    NT, DT = BN // 8, DP // 8
    Q_BYTES, T_BYTES, V_BYTES = BM * DP * 4, BN * DP * 4, BN * VP * 4
    OFF_QLO = Q_BYTES
    OFF_R = 2 * Q_BYTES                    # ring stage s at OFF_R + s STAGE: K_hi, K_lo, Vt_hi, Vt_lo
    STAGE = 4 * T_BYTES
    OFF_ST = OFF_R + RING * STAGE          # staging buffer b at OFF_ST + b ST: K, V
    ST = T_BYTES + V_BYTES
    PRE = bool(tiles.presplit)             # the producer copies pre-split images: no staging, no splits
    assert BN % 32 == 0 or not PRE, ("the pre-split images' keys come in groups of 32", tiles)
    SMEM = ALIGN + OFF_ST + (0 if PRE else 2 * ST)
    for off in (OFF_QLO, OFF_R, STAGE, T_BYTES):
        assert off % ALIGN == 0, (off, tiles, headdim)          # wgmma's images
    assert ST % 16 == 0, (ST, tiles, headdim)                  # (staging: cp.async's 16-byte chunks)
    s_product, pv_product = _make_products(BM, BN, DP, DP)
    sum_s, _ = _acc_sums(BN // 2, 0)
    add_o = _acc_sums(DP // 2, 0)[1]

    # ---------------- consumers: the pipelined body's asynchronous products (fragments.AsyncOps) ----------
    @inline_device
    def s_issue(smem, buf, tid):
        """pending (main, corr) of S = Q K[buf]^T."""
        base = base_bytes(smem)
        q = base + (tid // 128) * 64 * SW
        st = base + OFF_R + buf * STAGE
        return s_product(smem, q, q + OFF_QLO, st, st + T_BYTES)

    @inline_device
    def pv_issue(smem, pk, buf, o, fence):
        """pending (main, corr) of P V[buf], P's high parts' bits in pk[0:KK], low parts' in pk[KK:2KK]; o
        is added to on the CUDA cores (o_finish)."""
        return pv_product(smem, pk, 0, pk, KK, base_bytes(smem) + OFF_R + buf * STAGE + 2 * T_BYTES, 0)

    @inline_device
    def s_finish(c, pend):
        main, corr = pend
        sum_s(c, hopper.wgmma_fence_operand(main), hopper.wgmma_fence_operand(corr))

    @inline_device
    def o_finish(c, pend):
        main, corr = pend
        add_o(c, hopper.wgmma_fence_operand(main), hopper.wgmma_fence_operand(corr))

    @inline_device
    def pack(p, pk):
        """probabilities p (score fragment) -> the bits of their high parts (pk[kk]) and low parts
        (pk[KK + kk]), in the A registers of P V's k8 steps (keys permuted as in the Vt images)."""
        for kk in range(KK):
            h, lo = split_p_step(p, kk)
            pk[kk, 0], pk[kk, 1] = ptx.f32_bits(h[0]), ptx.f32_bits(h[1])
            pk[kk, 2], pk[kk, 3] = ptx.f32_bits(h[2]), ptx.f32_bits(h[3])
            pk[KK + kk, 0], pk[KK + kk, 1] = ptx.f32_bits(lo[0]), ptx.f32_bits(lo[1])
            pk[KK + kk, 2], pk[KK + kk, 3] = ptx.f32_bits(lo[2]), ptx.f32_bits(lo[3])
        return

    pipe = AsyncOps(steps=2 * KK, stream_k=None, stream_v=None, visible=None, s_issue=s_issue,
                    pv_issue=pv_issue, wait1=wait1, wait0=wait0, s_finish=s_finish, o_finish=o_finish,
                    pack=pack, wait_pv=wait0_late if tiles.late_pv_wait else wait0_flag)

    # ---------------- producer (fragments.WsOps with lag: splits tile j - 1 after copying tile j) ----------
    FULL_K, FULL_V = 1, 1 + RING           # make_ws_barriers' order
    NB = 2 + 3 * RING
    copy_q, copy_k = (make_swizzled_copy(rows, DP, headdim, aligned, P, fixed_passes=True, elem_bytes=4)
                      for rows in (BM, BN))
    copy_v = _make_v_copy(BN, DP, headdim, aligned, P)
    split_words, split_v = _make_splits(BN, DP, P)
    init, arrive, wait, reg_producer, reg_consumer, regs = make_ws_barriers(RING, P, CONSUMERS)
    q_src, kv_src = pointer_q_src, pointer_kv_src

    @inline_device
    def put_q(smem, bars, src, row0, nq, ptid):
        g, base, stride = src
        copy_q(smem, 0, g, base, row0, nq - row0, stride, ptid)
        ptx.cp_async_commit()

    if not PRE:
        @inline_device
        def put_k(smem, bars, stage, pstage, t0, nk, src, ptid):
            """Copy tile j (keys t0..) into staging buffer stage % 2, once every producer thread is done
            splitting tile j - 2 from it; then wait until tile j - 1 (Q, pstage < 0) has landed."""
            g0, b0, s0, g1, b1, s1 = src
            hopper.named_barrier_sync(_PRODUCERS_BAR, P)
            sb = OFF_ST + (stage % 2) * ST
            copy_k(smem, sb, g0, b0, t0, nk - t0, s0, ptid)
            copy_v(smem, sb + T_BYTES, g1, b1, t0, nk - t0, s1, ptid)
            ptx.cp_async_commit()
            ptx.cp_async_wait_group(1)
            hopper.named_barrier_sync(_PRODUCERS_BAR, P)

        @inline_device
        def put_split(smem, bars, pstage, ptid):
            """Split tile j - 1 from its staging buffer into ring stage pstage's images (Q in place where
            pstage < 0), then mark them full (after the body's wait for that stage to be empty)."""
            base = base_bytes(smem)
            if pstage < 0:
                q_w = base // 4
                split_words(smem, q_w, q_w, q_w + OFF_QLO // 4, BM * DP, ptid)
                hopper.fence_proxy_async_shared()
                hopper.mbarrier_arrive(bars, 0)
            else:
                st = base + OFF_R + pstage * STAGE
                sb = base + OFF_ST + (pstage % 2) * ST
                split_words(smem, sb // 4, st // 4, (st + T_BYTES) // 4, BN * DP, ptid)
                split_v(smem, (sb + T_BYTES) // 4, (st + 2 * T_BYTES) // 4, ptid)
                hopper.fence_proxy_async_shared()
                hopper.mbarrier_arrive(bars, FULL_K + pstage)
                hopper.mbarrier_arrive(bars, FULL_V + pstage)

        @inline_device
        def put_v(smem, bars, stage, t0, nk, src, ptid):
            return

        @inline_device
        def put_last(smem, bars, pstage, ptid):
            """The last tile (Q where there are none): landed, split, marked full."""
            ptx.cp_async_wait_group(0)
            hopper.named_barrier_sync(_PRODUCERS_BAR, P)
            put_split(smem, bars, pstage, ptid)

    else:
        # ---------------- or: a producer of pre-split images (the 16-bit producer's protocol, no lag) -----
        copy_k_images, copy_vt_images = _make_image_copies(BN, DP, P, fixed_passes=True)

        @inline_device
        def mark(smem, bars, pstage, ptid):
            """Once this thread's older copies landed: Q split in place and marked (pstage < 0; after
            every producer thread's Q copies landed), or tile j - 1's V images marked full."""
            if pstage < 0:
                hopper.named_barrier_sync(_PRODUCERS_BAR, P)
                q_w = base_bytes(smem) // 4
                split_words(smem, q_w, q_w, q_w + OFF_QLO // 4, BM * DP, ptid)
                hopper.fence_proxy_async_shared()
                hopper.mbarrier_arrive(bars, 0)
            else:
                hopper.fence_proxy_async_shared()
                hopper.mbarrier_arrive(bars, FULL_V + pstage)

        @inline_device
        def put_k(smem, bars, stage, pstage, t0, nk, src, ptid):
            """K_hi, K_lo of tile j into ring stage `stage`; then mark tile j - 1's V (or Q)."""
            g0, b0, s0, g1, b1, s1 = src
            copy_k_images(smem, OFF_R + stage * STAGE, g0, b0, s0, t0, nk, ptid)
            ptx.cp_async_commit()
            ptx.cp_async_wait_group(1)
            mark(smem, bars, pstage, ptid)

        @inline_device
        def put_v(smem, bars, stage, t0, nk, src, ptid):
            """Vt_hi, Vt_lo of tile j into ring stage `stage`; then mark its K images full."""
            g0, b0, s0, g1, b1, s1 = src
            copy_vt_images(smem, OFF_R + stage * STAGE + 2 * T_BYTES, g1, b1, s1, t0, ptid)
            ptx.cp_async_commit()
            ptx.cp_async_wait_group(1)
            hopper.fence_proxy_async_shared()
            hopper.mbarrier_arrive(bars, FULL_K + stage)

        @inline_device
        def put_last(smem, bars, pstage, ptid):
            ptx.cp_async_wait_group(0)
            mark(smem, bars, pstage, ptid)

    my_turn, your_turn = make_turns(bool(tiles.pingpong), CONSUMERS)
    ws = WsOps(stages=RING, producers=P, fillers=P, regs=regs, nbars=NB, init=init, arrive=arrive, wait=wait,
               q_src=q_src, kv_src=kv_src, put_q=put_q, put_k=put_k, put_v=put_v, put_last=put_last,
               reg_producer=reg_producer, reg_consumer=reg_consumer, pingpong=bool(tiles.pingpong),
               my_turn=my_turn, your_turn=your_turn, lag=not PRE, put_split=None if PRE else put_split)
    min_regs = min(255, max(128, BN // 2 + DP // 2 + 80))
    return TileOps(
        path="tf32", stages=2, threads=NTHREADS + P, smem_bytes=SMEM, min_blocks=1, min_regs=min_regs,
        frag=mma_fragment(1, NT, DT), a_shape=(1,), a_dtype=uint32, exp2=ptx.ex2, load_resident=None,
        resident_ready=None, stream=None, commit=ptx.cp_async_commit, wait_all=ptx.cp_async_wait_all, vec=None,
        mm_nt=None, mm_pv=None, dq=None, pipe=pipe, ws=ws)
