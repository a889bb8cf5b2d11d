"""FlashAttention forward (Algorithm 1 of the paper, FlashAttention-2 loop order), SIMT fp32 arithmetic.

One thread block owns a query tile Q_i (Br rows of one head of one batch) and keeps it in shared memory.
It walks the list of key tiles the mask gives that tile; for each K_j, V_j it computes the scores
S = scale * Q_i K_j^T in registers, updates the running row max m and row sum l (the online softmax),
rescales the output accumulator by exp(m_old - m_new), and adds P V_j with P = exp(S - m). The N x N
score matrix exists only tile by tile. At the end O = acc / l and lse = m + log(l) (natural log), kept for
the backward pass.

Scores are kept in the log2 domain (scale folded with log2(e)) so each probability is one exp2.
Rows that see no key keep m = -inf and l = 0: they output 0 and lse = -inf.
"""
import math
from functools import lru_cache

from numba import cuda

from . import intrinsics as I
from .launch import Launchable
from .simt_tiles import make_mm_nn, make_mm_nt, make_row_loader, row_stride

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@lru_cache(maxsize=None)
def make_forward_kernel(cfg, headdim, dtype_name, causal, vec_global=False):
    """Compile-time choices are closure constants; lengths, strides, scale and lists are arguments."""
    BR, BC, TY, TX = cfg.br, cfg.bc, cfg.ty, cfg.tx
    NT = TY * TX
    TM, TN = BR // TY, BC // TX
    DP = cfg.padded_headdim(headdim)
    DPT = DP // TX
    ACC = I.acc_type(dtype_name)
    load_elem, store_elem = I.loader(dtype_name), I.storer(dtype_name)
    NEG_INF = I.acc_constant(dtype_name, -math.inf)
    LN2_ACC = I.acc_constant(dtype_name, LN2)

    LD = row_stride(DP)           # Q, K, V tiles: rows x LD
    LDP = row_stride(BC)          # P tile: BR x LDP
    OFF_Q = 0
    OFF_K = OFF_Q + BR * LD
    OFF_V = OFF_K + BC * LD
    # When P fits where K was (large head dims), it goes there: K is dead once S is computed, and the
    # smaller footprint lets two blocks share an SM (d=128: 101 KiB instead of 118).
    P_IN_K = BR * LDP <= BC * LD
    OFF_P = OFF_K if P_IN_K else OFF_V + BC * LD
    OFF_RED = OFF_V + BC * LD if P_IN_K else OFF_P + BR * LDP
    row_max, row_sum, needs_red = I.make_row_reducers(TM, TX, use_shuffles=not I.SIMULATOR)
    SMEM_WORDS = OFF_RED + (TX * BR if needs_red else 0)

    load_q = make_row_loader(BR, DP, headdim, LD, NT, load_elem, ACC, vec_global)
    load_kv = make_row_loader(BC, DP, headdim, LD, NT, load_elem, ACC, vec_global)
    mm_qk = make_mm_nt(TM, TN, TY, TX, DP, LD, LD, ACC)     # S = Q K^T
    mm_pv = make_mm_nn(TM, DPT, TY, BC, LDP, LD, ACC)       # acc += P V
    exp2 = math.exp2

    @I.kernel(NT, SMEM_WORDS * (8 if dtype_name == "float64" else 4), cfg.min_blocks)
    def flash_fwd(q, k, v, o, lse,
                  nq, nk, q_sb, q_sn, q_sh, k_sb, k_sn, k_sh, v_sb, v_sn, v_sh, o_sb, o_sn, o_sh,
                  lse_sb, lse_sh, scale_log2, causal_offset,
                  kv_count, kv_index, mask_sh, mask_maxk, q_per_blk, k_per_blk):
        smem = cuda.shared.array(0, ACC)
        i_tile = cuda.blockIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        tid = cuda.threadIdx.x
        ty = tid // TX
        tx = tid - ty * TX
        row0 = i_tile * BR
        q_base = b * q_sb + h * q_sh
        k_base = b * k_sb + h * k_sh
        v_base = b * v_sb + h * v_sh
        sl2 = ACC(scale_log2)

        load_q(smem, OFF_Q, q, q_base, row0, nq - row0, q_sn, tid)

        m = cuda.local.array(TM, ACC)
        l = cuda.local.array(TM, ACC)
        acc = cuda.local.array((TM, DPT), ACC)
        s = cuda.local.array((TM, TN), ACC)
        red = cuda.local.array(TM, ACC)
        for i in range(TM):
            m[i] = NEG_INF
            l[i] = ACC(0)
            for d in range(DPT):
                acc[i, d] = ACC(0)

        # Last row of this tile that exists; a key column c is visible to row r iff c <= r + causal_offset.
        row_last = min(row0 + BR, nq) - 1
        mrow = h * mask_sh + i_tile // q_per_blk
        nblocks = kv_count[mrow]
        for t in range(nblocks):
            jb = kv_index[mrow * mask_maxk + t]
            for sub in range(k_per_blk):
                col0 = (jb * k_per_blk + sub) * BC
                skip = col0 >= nk
                if causal:
                    skip = skip or col0 > row_last + causal_offset
                if skip:
                    continue
                # The previous tile's P and V are still being read.
                cuda.syncthreads()
                load_kv(smem, OFF_K, k, k_base, col0, nk - col0, k_sn, tid)
                load_kv(smem, OFF_V, v, v_base, col0, nk - col0, v_sn, tid)
                cuda.syncthreads()

                for i in range(TM):
                    for j in range(TN):
                        s[i, j] = ACC(0)
                mm_qk(smem, OFF_Q, OFF_K, s, ty, tx)

                needs_mask = col0 + BC > nk
                if causal:
                    needs_mask = needs_mask or col0 + BC - 1 > row0 + causal_offset
                for i in range(TM):
                    red[i] = NEG_INF
                    for j in range(TN):
                        x = s[i, j] * sl2
                        if needs_mask:
                            c = col0 + tx + j * TX
                            if c >= nk:
                                x = NEG_INF
                            if causal:
                                if c > row0 + ty + i * TY + causal_offset:
                                    x = NEG_INF
                        s[i, j] = x
                        red[i] = I.fmax_nan_ignoring(red[i], x)
                row_max(red, smem, OFF_RED, ty, tx, TY, BR)
                if P_IN_K:
                    cuda.syncthreads()  # every thread is done reading K before P overwrites it

                for i in range(TM):
                    m_new = I.fmax_nan_ignoring(m[i], red[i])
                    # A row that has seen only -inf keeps m = -inf; subtracting 0 instead of -inf keeps its
                    # probabilities exp2(-inf) = 0 rather than exp2(-inf + inf) = NaN.
                    m_use = m_new if m_new != NEG_INF else ACC(0)
                    alpha = exp2(m[i] - m_use)
                    m[i] = m_new
                    l[i] *= alpha
                    for d in range(DPT):
                        acc[i, d] *= alpha
                    prow = OFF_P + (ty + i * TY) * LDP + tx
                    for j in range(TN):
                        p = exp2(s[i, j] - m_use)
                        l[i] += p
                        I.st1(smem, prow + j * TX, p)
                cuda.syncthreads()
                mm_pv(smem, OFF_P, OFF_V, acc, ty, tx)

        # l so far is this thread's share of its rows' sums; the row's threads add theirs up.
        for i in range(TM):
            red[i] = l[i]
        row_sum(red, smem, OFF_RED, ty, tx, TY, BR)

        o_base = b * o_sb + h * o_sh
        for i in range(TM):
            r = row0 + ty + i * TY
            if r < nq:
                li = red[i]
                # l == 0 only when the row saw no key (all -inf): output 0, lse = -inf.
                inv = ACC(1) / li if li != ACC(0) else ACC(0)
                orow = o_base + r * o_sn + tx * DPT
                for d in range(DPT):
                    if tx * DPT + d < headdim:
                        o[orow + d] = store_elem(acc[i, d] * inv)
                if tx == 0:
                    if li != ACC(0):
                        lse[b * lse_sb + h * lse_sh + r] = (m[i] + math.log2(li)) * LN2_ACC
                    else:
                        lse[b * lse_sb + h * lse_sh + r] = NEG_INF

    return Launchable(flash_fwd, NT, SMEM_WORDS * (8 if dtype_name == "float64" else 4))
