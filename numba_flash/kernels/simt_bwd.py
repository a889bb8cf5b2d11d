"""FlashAttention backward, FlashAttention-2 style, deterministic: three kernels, no atomics.

1. `D = rowsum(dO * O)` per query row (the softmax backward's correction term).
2. dK/dV: one thread block per key tile K_j, V_j, walking the query tiles listed for it. For each Q_i it
   recomputes S^T = K_j Q_i^T and P^T = exp(S^T - lse_i) from the saved log-sum-exp, then
       dV_j += P^T dO_i,   dP^T = V_j dO_i^T,   dS^T = P^T * (dP^T - D_i),   dK_j += scale * dS^T Q_i
   with dK_j, dV_j held in registers until the end.
3. dQ: one thread block per query tile, walking its key tiles: S, P and dP again, dQ_i += scale * dS K_j.

Splitting dQ from dK/dV costs two extra tile products per pair (S and dP are recomputed) but every output
element is written by exactly one thread, in a fixed order: same inputs, bitwise same gradients.
All tiles are row-major in shared memory (see simt_tiles), so nothing is transposed: S^T is computed as
K Q^T directly, and P^T / dS^T are written to shared memory in the (key, query) layout the next product reads.
"""
import math
from functools import lru_cache

from numba import cuda

from . import intrinsics as I
from .launch import Launchable
from .simt_fwd import LOG2E
from .simt_tiles import make_mm_nn, make_mm_nt, make_row_loader, make_vector_loader, row_stride


@lru_cache(maxsize=None)
def make_dot_do_o_kernel(headdim, dtype_name, threads=128):
    """D[b, h, r] = sum_c dO[b, r, h, c] * O[b, r, h, c]; one thread per query row."""
    ACC = I.acc_type(dtype_name)
    load_elem = I.loader(dtype_name)

    @cuda.jit
    def bwd_dot_do_o(o, do, dvec, nrows_total, nq, nheads, o_sb, o_sn, o_sh, do_sb, do_sn, do_sh,
                     d_sb, d_sh):
        idx = cuda.grid(1)
        if idx >= nrows_total:
            return
        r = idx % nq
        bh = idx // nq
        h = bh % nheads
        b = bh // nheads
        ob = b * o_sb + r * o_sn + h * o_sh
        db = b * do_sb + r * do_sn + h * do_sh
        acc = ACC(0)
        for c in range(headdim):
            acc += load_elem(o[ob + c]) * load_elem(do[db + c])
        dvec[b * d_sb + h * d_sh + r] = acc

    return Launchable(bwd_dot_do_o, threads, 0)


def _common(cfg, headdim, dtype_name):
    BR, BC, TY, TX = cfg.br, cfg.bc, cfg.ty, cfg.tx
    DP = cfg.padded_headdim(headdim)
    return BR, BC, TY, TX, TY * TX, DP, DP // TX, I.acc_type(dtype_name), row_stride(DP)


@lru_cache(maxsize=None)
def make_dkdv_kernel(cfg, headdim, dtype_name, causal, vec_global=False):
    BR, BC, TY, TX, NT, DP, DPT, ACC, LD = _common(cfg, headdim, dtype_name)
    TM, TN = BC // TY, BR // TX          # a thread's key rows x query columns of S^T
    load_elem, store_elem = I.loader(dtype_name), I.storer(dtype_name)
    LDT = row_stride(BR)                 # P^T / dS^T tile: BC x LDT
    OFF_K = 0
    OFF_V = OFF_K + BC * LD
    OFF_Q = OFF_V + BC * LD
    OFF_DO = OFF_Q + BR * LD
    OFF_T = OFF_DO + BR * LD
    OFF_LSE = OFF_T + BC * LDT
    OFF_D = OFF_LSE + BR
    SMEM_WORDS = OFF_D + BR
    INF = I.acc_constant(dtype_name, math.inf)
    NEG_INF = I.acc_constant(dtype_name, -math.inf)
    LOG2E_ACC = I.acc_constant(dtype_name, LOG2E)

    load_kv = make_row_loader(BC, DP, headdim, LD, NT, load_elem, ACC, vec_global)
    load_q = make_row_loader(BR, DP, headdim, LD, NT, load_elem, ACC, vec_global)
    load_vec = make_vector_loader(BR, NT, ACC)
    mm_kq = make_mm_nt(TM, TN, TY, TX, DP, LD, LD, ACC)      # S^T = K Q^T,  dP^T = V dO^T
    mm_t = make_mm_nn(TM, DPT, TY, BR, LDT, LD, ACC)          # dV += P^T dO, dK += dS^T Q
    exp2 = math.exp2

    @I.kernel(NT, SMEM_WORDS * (8 if dtype_name == "float64" else 4), cfg.min_blocks)
    def flash_bwd_dkdv(q, k, v, do, lse, dvec, dk, dv,
                       nq, nk, q_sb, q_sn, q_sh, k_sb, k_sn, k_sh, v_sb, v_sn, v_sh,
                       do_sb, do_sn, do_sh, dk_sb, dk_sn, dk_sh, dv_sb, dv_sn, dv_sh,
                       lse_sb, lse_sh, scale, scale_log2, causal_offset,
                       q_count, q_index, mask_sh, mask_maxq, q_per_blk, k_per_blk):
        smem = cuda.shared.array(0, ACC)
        j_tile = cuda.blockIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        tid = cuda.threadIdx.x
        ty = tid // TX
        tx = tid - ty * TX
        col0 = j_tile * BC
        sl2 = ACC(scale_log2)
        q_base = b * q_sb + h * q_sh
        do_base = b * do_sb + h * do_sh
        lse_base = b * lse_sb + h * lse_sh

        load_kv(smem, OFF_K, k, b * k_sb + h * k_sh, col0, nk - col0, k_sn, tid)
        load_kv(smem, OFF_V, v, b * v_sb + h * v_sh, col0, nk - col0, v_sn, tid)

        dk_acc = cuda.local.array((TM, DPT), ACC)
        dv_acc = cuda.local.array((TM, DPT), ACC)
        st = cuda.local.array((TM, TN), ACC)
        dpt = cuda.local.array((TM, TN), ACC)
        for i in range(TM):
            for d in range(DPT):
                dk_acc[i, d] = ACC(0)
                dv_acc[i, d] = ACC(0)

        mcol = h * mask_sh + j_tile // k_per_blk
        nblocks = q_count[mcol]
        for t in range(nblocks):
            ib = q_index[mcol * mask_maxq + t]
            for sub in range(q_per_blk):
                row0 = (ib * q_per_blk + sub) * BR
                skip = row0 >= nq
                if causal:
                    # Every key of this tile lies right of the diagonal for the tile's last row.
                    skip = skip or col0 > min(row0 + BR, nq) - 1 + causal_offset
                if skip:
                    continue
                cuda.syncthreads()
                load_q(smem, OFF_Q, q, q_base, row0, nq - row0, q_sn, tid)
                load_q(smem, OFF_DO, do, do_base, row0, nq - row0, do_sn, tid)
                # lse in the log2 domain; +inf for rows past nq and rows that saw no key, so their P is 0.
                load_vec(smem, OFF_LSE, lse, lse_base, row0, nq - row0, INF, tid)
                load_vec(smem, OFF_D, dvec, lse_base, row0, nq - row0, 0.0, tid)
                cuda.syncthreads()

                for i in range(TM):
                    for j in range(TN):
                        st[i, j] = ACC(0)
                        dpt[i, j] = ACC(0)
                mm_kq(smem, OFF_K, OFF_Q, st, ty, tx)

                needs_mask = col0 + BC > nk
                if causal:
                    needs_mask = needs_mask or col0 + BC - 1 > row0 + causal_offset
                for i in range(TM):
                    c = col0 + ty + i * TY
                    trow = OFF_T + (ty + i * TY) * LDT + tx
                    for j in range(TN):
                        lse_r = I.ld1(smem, OFF_LSE + tx + j * TX)
                        lse2 = lse_r * LOG2E_ACC if lse_r != NEG_INF else INF
                        p = exp2(st[i, j] * sl2 - lse2)
                        if needs_mask:
                            if c >= nk:
                                p = ACC(0)
                            if causal:
                                if c > row0 + tx + j * TX + causal_offset:
                                    p = ACC(0)
                        st[i, j] = p
                        I.st1(smem, trow + j * TX, p)
                cuda.syncthreads()
                mm_t(smem, OFF_T, OFF_DO, dv_acc, ty, tx)
                mm_kq(smem, OFF_V, OFF_DO, dpt, ty, tx)
                for i in range(TM):
                    for j in range(TN):
                        dpt[i, j] = st[i, j] * (dpt[i, j] - I.ld1(smem, OFF_D + tx + j * TX))
                # Every thread is done reading P^T before dS^T overwrites it.
                cuda.syncthreads()
                for i in range(TM):
                    trow = OFF_T + (ty + i * TY) * LDT + tx
                    for j in range(TN):
                        I.st1(smem, trow + j * TX, dpt[i, j])
                cuda.syncthreads()
                mm_t(smem, OFF_T, OFF_Q, dk_acc, ty, tx)

        sc = ACC(scale)
        dk_base = b * dk_sb + h * dk_sh
        dv_base = b * dv_sb + h * dv_sh
        for i in range(TM):
            c = col0 + ty + i * TY
            if c < nk:
                for d in range(DPT):
                    col = tx * DPT + d
                    if col < headdim:
                        dk[dk_base + c * dk_sn + col] = store_elem(dk_acc[i, d] * sc)
                        dv[dv_base + c * dv_sn + col] = store_elem(dv_acc[i, d])

    return Launchable(flash_bwd_dkdv, NT, SMEM_WORDS * (8 if dtype_name == "float64" else 4))


@lru_cache(maxsize=None)
def make_dq_kernel(cfg, headdim, dtype_name, causal, vec_global=False):
    BR, BC, TY, TX, NT, DP, DPT, ACC, LD = _common(cfg, headdim, dtype_name)
    TM, TN = BR // TY, BC // TX          # a thread's query rows x key columns of S
    load_elem, store_elem = I.loader(dtype_name), I.storer(dtype_name)
    LDS = row_stride(BC)                 # dS tile: BR x LDS
    OFF_Q = 0
    OFF_DO = OFF_Q + BR * LD
    OFF_K = OFF_DO + BR * LD
    OFF_V = OFF_K + BC * LD
    OFF_S = OFF_V + BC * LD
    SMEM_WORDS = OFF_S + BR * LDS
    INF = I.acc_constant(dtype_name, math.inf)
    NEG_INF = I.acc_constant(dtype_name, -math.inf)
    LOG2E_ACC = I.acc_constant(dtype_name, LOG2E)

    load_q = make_row_loader(BR, DP, headdim, LD, NT, load_elem, ACC, vec_global)
    load_kv = make_row_loader(BC, DP, headdim, LD, NT, load_elem, ACC, vec_global)
    mm_qk = make_mm_nt(TM, TN, TY, TX, DP, LD, LD, ACC)       # S = Q K^T,  dP = dO V^T
    mm_sk = make_mm_nn(TM, DPT, TY, BC, LDS, LD, ACC)         # dQ += dS K
    exp2 = math.exp2

    @I.kernel(NT, SMEM_WORDS * (8 if dtype_name == "float64" else 4), cfg.min_blocks)
    def flash_bwd_dq(q, k, v, do, lse, dvec, dq,
                     nq, nk, q_sb, q_sn, q_sh, k_sb, k_sn, k_sh, v_sb, v_sn, v_sh,
                     do_sb, do_sn, do_sh, dq_sb, dq_sn, dq_sh,
                     lse_sb, lse_sh, scale, scale_log2, causal_offset,
                     kv_count, kv_index, mask_sh, mask_maxk, q_per_blk, k_per_blk):
        smem = cuda.shared.array(0, ACC)
        i_tile = cuda.blockIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        tid = cuda.threadIdx.x
        ty = tid // TX
        tx = tid - ty * TX
        row0 = i_tile * BR
        sl2 = ACC(scale_log2)
        k_base = b * k_sb + h * k_sh
        v_base = b * v_sb + h * v_sh

        load_q(smem, OFF_Q, q, b * q_sb + h * q_sh, row0, nq - row0, q_sn, tid)
        load_q(smem, OFF_DO, do, b * do_sb + h * do_sh, row0, nq - row0, do_sn, tid)

        lse2 = cuda.local.array(TM, ACC)
        dd = cuda.local.array(TM, ACC)
        dq_acc = cuda.local.array((TM, DPT), ACC)
        s = cuda.local.array((TM, TN), ACC)
        dp = cuda.local.array((TM, TN), ACC)
        for i in range(TM):
            r = row0 + ty + i * TY
            lse2[i] = INF
            dd[i] = ACC(0)
            if r < nq:
                lr = lse[b * lse_sb + h * lse_sh + r]
                if lr != NEG_INF:
                    lse2[i] = lr * LOG2E_ACC
                dd[i] = dvec[b * lse_sb + h * lse_sh + r]
            for d in range(DPT):
                dq_acc[i, d] = ACC(0)

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
                cuda.syncthreads()
                load_kv(smem, OFF_K, k, k_base, col0, nk - col0, k_sn, tid)
                load_kv(smem, OFF_V, v, v_base, col0, nk - col0, v_sn, tid)
                cuda.syncthreads()

                for i in range(TM):
                    for j in range(TN):
                        s[i, j] = ACC(0)
                        dp[i, j] = ACC(0)
                mm_qk(smem, OFF_Q, OFF_K, s, ty, tx)
                mm_qk(smem, OFF_DO, OFF_V, dp, ty, tx)

                needs_mask = col0 + BC > nk
                if causal:
                    needs_mask = needs_mask or col0 + BC - 1 > row0 + causal_offset
                for i in range(TM):
                    srow = OFF_S + (ty + i * TY) * LDS + tx
                    for j in range(TN):
                        p = exp2(s[i, j] * sl2 - lse2[i])
                        if needs_mask:
                            c = col0 + tx + j * TX
                            if c >= nk:
                                p = ACC(0)
                            if causal:
                                if c > row0 + ty + i * TY + causal_offset:
                                    p = ACC(0)
                        I.st1(smem, srow + j * TX, p * (dp[i, j] - dd[i]))
                cuda.syncthreads()
                mm_sk(smem, OFF_S, OFF_K, dq_acc, ty, tx)

        sc = ACC(scale)
        dq_base = b * dq_sb + h * dq_sh
        for i in range(TM):
            r = row0 + ty + i * TY
            if r < nq:
                for d in range(DPT):
                    col = tx * DPT + d
                    if col < headdim:
                        dq[dq_base + r * dq_sn + col] = store_elem(dq_acc[i, d] * sc)

    return Launchable(flash_bwd_dq, NT, SMEM_WORDS * (8 if dtype_name == "float64" else 4))
