"""The online softmax on a thread's fragment (Algorithm 1's m, l update), its finalisation, and row reductions.

Scores are kept in the log2 domain (softmax_scale * log2(e) folded in) so each probability is one exp2.
The row max and the row sum are reduced across the `group` lanes that share a row with XOR shuffles;
the running sum `l` stays a per-thread partial until `finalize`, since the rescale factor of a row is the
same in all its lanes.

Where a thread holds many accumulator columns per row (LAZY_RESCALE_COLS or more: head dim 128 on tensor
cores), the reference max `m` a row's probabilities are taken against moves only when the row's true max
has grown by more than TAU_LOG2 (the rescale FlashAttention-4 skips): until then P = exp2(c s - c m) may
reach 2^8 = 256, which float16, bfloat16 and float32 hold exactly as well as values below 1, and the
output is unchanged (O = acc / l and lse = c m + log2 l use the same m). Once the first tiles have set
a row's level that is rare, and a warp in which no row moved skips the rescale of its accumulators
altogether: one vote per tile decides. H200, fp16, N=4096 forward (2026-12-01): d=128 +5% (causal 269
against 257 TFLOP/s); d=64, where a thread rescales only 16 columns per row, -5% (289 against 303), so
the plain update stays there.

The row max skips NaN, so a NaN score reaches the output through P (exp2(NaN - m) is NaN) instead of
turning the row's max into NaN. On the GPU Numba lowers max() of floats to LLVM maxnum, i.e. one max.f32
(FMNMX), which returns the non-NaN operand; Python's max() does not, so the simulator spells the same
semantics out (the running max `a` is never NaN).
"""
import math
from collections import namedtuple
from functools import lru_cache

from numba import cuda

from . import ptx
from .convert import acc_constant, acc_type
from .launch import SIMULATOR, inline_device
from .walk import make_fill_invisible

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
TAU_LOG2 = 8.0      # how far (log2 units) a row's max may outgrow its reference before the rescale
LAZY_RESCALE_COLS = 32

if SIMULATOR:
    @inline_device
    def fmax_nan_ignoring(a, b):
        return b if b > a else a
else:
    @inline_device
    def fmax_nan_ignoring(a, b):
        return max(a, b)


@inline_device
def add(a, b):
    return a + b


def group_reducer(group, op):
    """v reduced with `op` over the `group` consecutive lanes that share a row (XOR butterfly)."""
    @inline_device
    def reduce(v):
        off = group // 2
        while off > 0:
            v = op(v, ptx.shfl_xor(v, off))
            off //= 2
        return v
    return reduce


Softmax = namedtuple("Softmax", "scale_and_mask online_update finalize row_sum update rescale start")


@lru_cache(maxsize=None)
def make_softmax(frag, dtype_name, exp2, visible_cols, positive_scale=True, lazy=None, narrow_mask=False):
    """Device pieces of the online softmax for fragments `frag` (fragments.Fragment) in the arithmetic type
    of `dtype_name`; `exp2` is the device function the path computes 2**x with, `visible_cols` the walk's
    visible column interval of a row (walk.py).

    positive_scale: the row max is taken on the raw scores and each probability is exp2(s * c - m * c)
    with one fused multiply-add (c = scale * log2 e > 0), as FlashAttention-2 does. Otherwise (a zero or
    negative softmax_scale, where max(c * s) is not c * max(s)) the scores are scaled first.
    lazy: the lazy rescale (module docstring); None: where a thread holds LAZY_RESCALE_COLS output columns
    per row or more. narrow_mask: walk.make_fill_invisible's 32-bit comparisons.
    """
    R, C, CO = frag.rows, frag.cols, frag.out_cols
    fill_invisible = make_fill_invisible(frag, visible_cols, narrow_mask)
    NEG_INF = acc_constant(dtype_name, -math.inf)
    ZERO = acc_constant(dtype_name, 0.0)
    ONE = acc_constant(dtype_name, 1.0)
    LN2_ACC = acc_constant(dtype_name, LN2)
    TAU = acc_constant(dtype_name, TAU_LOG2)
    ACC = acc_type(dtype_name)
    row_max = group_reducer(frag.group, fmax_nan_ignoring)
    row_sum = group_reducer(frag.group, add)

    @inline_device
    def scale_and_mask(s, scale_log2, masked, tid, this0, other0, nq, nk, offset):
        """Scores scaled (unless positive_scale), then -inf where the element is invisible (tested only if
        `masked`: a separate branch, so the tests are not speculated into every tile)."""
        if not positive_scale:
            for i in range(R):
                for j in range(C):
                    s[i, j] *= scale_log2
        if masked:
            fill_invisible(s, NEG_INF, tid, this0, other0, nq, nk, offset)
        return

    def make_updates(fused):
        """The eager and lazy updates. fused: rescale acc inside (online_update); else leave the factors
        in alpha for `rescale` (update: the products overlapped with the softmax are still running)."""
        @inline_device
        def eager(s, m, l, alpha, acc, scale_log2):
            """Scores s -> probabilities P = exp2(c s - c m_new) in place; m, l and acc rescaled (or the
            factors in alpha). m is kept in the units of s (raw scores if positive_scale, else log2-domain
            scores). Returns True: every row may have moved."""
            sc = scale_log2 if positive_scale else ONE
            for i in range(R):
                mx = NEG_INF
                for j in range(C):
                    mx = fmax_nan_ignoring(mx, s[i, j])
                m_new = fmax_nan_ignoring(m[i], row_max(mx))
                # A row that has seen only -inf keeps m = -inf; subtracting 0 instead of -inf keeps its
                # probabilities exp2(-inf) = 0 rather than exp2(-inf + inf) = NaN.
                m_use = m_new * sc if m_new != NEG_INF else ZERO
                a = exp2(m[i] * sc - m_use)
                m[i] = m_new
                rs = ZERO
                for j in range(C):
                    p = exp2(s[i, j] * sc - m_use)
                    s[i, j] = p
                    rs += p
                l[i] = l[i] * a + rs
                if fused:
                    for d in range(CO):
                        acc[i, d] *= a
                else:
                    alpha[i] = a
            return True

        @inline_device
        def lazy(s, m, l, alpha, acc, scale_log2):
            """As eager, but m (with l and acc) moves only when the row's max outgrew it by more than
            TAU_LOG2, and a warp where no row moved skips the rescale (module docstring); returns whether
            any row of the warp moved."""
            sc = scale_log2 if positive_scale else ONE
            m_new = cuda.local.array(R, ACC)
            moves = False
            for i in range(R):
                mx = NEG_INF
                for j in range(C):
                    mx = fmax_nan_ignoring(mx, s[i, j])
                m_new[i] = fmax_nan_ignoring(m[i], row_max(mx))
                # the first finite max moves m from -inf (inf > TAU); a row of only -inf never moves
                moves = moves or (m_new[i] > m[i] and (m_new[i] - m[i]) * sc > TAU)
            any_moved = ptx.vote_any(moves)
            if any_moved:
                for i in range(R):
                    a = ONE
                    if m_new[i] > m[i] and (m_new[i] - m[i]) * sc > TAU:
                        a = exp2((m[i] - m_new[i]) * sc)
                        m[i] = m_new[i]
                    l[i] *= a
                    if fused:
                        for d in range(CO):
                            acc[i, d] *= a
                    else:
                        alpha[i] = a
            for i in range(R):
                m_use = m[i] * sc if m[i] != NEG_INF else ZERO      # as in eager
                rs = ZERO
                for j in range(C):
                    p = exp2(s[i, j] * sc - m_use)
                    s[i, j] = p
                    rs += p
                l[i] += rs
            return any_moved

        return lazy if (CO >= LAZY_RESCALE_COLS if lazy_default is None else lazy_default) else eager

    lazy_default = lazy
    fused_update, split_update = make_updates(True), make_updates(False)

    @inline_device
    def online_update(s, m, l, acc, scale_log2):
        """s -> P in place; m, l and acc rescaled."""
        fused_update(s, m, l, acc, acc, scale_log2)
        return

    @inline_device
    def update(s, m, l, alpha, scale_log2):
        """s -> P in place; m, l updated, the accumulators' factors in alpha; returns whether any row of the
        warp moved (`rescale` applies them)."""
        return split_update(s, m, l, alpha, alpha, scale_log2)

    @inline_device
    def rescale(acc, alpha, moved):
        """acc[i, :] *= alpha[i] after `update`, skipped when no row of the warp moved."""
        if moved:
            for i in range(R):
                for d in range(CO):
                    acc[i, d] *= alpha[i]
        return

    @inline_device
    def finalize(m, l, inv, lse, scale_log2):
        """inv[i] = 1 / (row sum), lse[i] = natural-log log-sum-exp; rows that saw no key: 0 and -inf."""
        sc = scale_log2 if positive_scale else ONE
        for i in range(R):
            li = row_sum(l[i])
            if li != ZERO:
                inv[i] = ONE / li
                # one fused product-add, never left to the compiler: kernels that share this code
                # (the warp-specialised forward and the two-warpgroup one) then give the same lse bits
                lse[i] = ptx.fma(m[i], sc, math.log2(li)) * LN2_ACC
            else:
                inv[i] = ZERO
                lse[i] = NEG_INF
        return

    @inline_device
    def start(m, l, acc):
        """A query tile's state before its first key tile: m = -inf, l = 0, acc = 0."""
        for i in range(R):
            m[i] = NEG_INF
            l[i] = ZERO
            for d in range(CO):
                acc[i, d] = ZERO
        return

    return Softmax(scale_and_mask, online_update, finalize, row_sum, update, rescale, start)
