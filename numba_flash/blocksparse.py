"""Block-sparse attention masks: the lists the kernels walk.

A :class:`BlockMask` cuts the ``seqlen_q x seqlen_k`` score matrix ``S = QK^T`` into blocks of
``bq x bk`` elements and records, per mask head, which blocks are computed at all. It is modelled on
PyTorch FlexAttention's ``BlockMask`` (``torch/nn/attention/flex_attention.py``).

Data structure (see ``docs/CONTRACTS.md``, "BlockMask -> kernels")::

    layout    bool  (Hm, Tq, Tk)        block (i, j) of head h is computed iff layout[h, i, j]
    kv_count  int32 (Hm, Tq)            number of key blocks listed for query block i
    kv_index  int32 (Hm, Tq, maxK)      their indices, ascending, padded with 0
    q_count   int32 (Hm, Tk)            number of query blocks listed for key block j
    q_index   int32 (Hm, Tk, maxQ)      their indices, ascending, padded with 0

with ``Tq = ceil(seqlen_q / bq)``, ``Tk = ceil(seqlen_k / bk)`` and ``Hm`` mask heads (``Hm == 1``
means one mask shared by all attention heads). ``maxK`` and ``maxQ`` are at least 1 so that no array
is zero-width (a zero-width device array cannot be indexed, even by a loop that never runs).

Why the kernels walk lists and not the layout: a kernel that tested ``layout[h, i, j]`` for every
key block would still run ``Tk`` loop trips per query block, so a 10%-dense mask would cost far more
than 10% of dense attention. Walking ``kv_index[h, i, :kv_count[h, i]]`` makes the trip count equal
to the number of kept blocks, so work scales with ``nnz``. The forward pass and dQ walk the
per-query-block lists (``kv_*``); dK/dV, which own a key block and accumulate over query blocks,
walk the transpose (``q_*``). Dense and causal attention use the very same loop over a one-block
list covering everything, so there is one iteration structure for every case.

Everything here is host-side numpy, built once at construction; the arrays are read-only so that a
device copy cached in ``_device_cache`` (filled by the interop layer) can never go stale.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = ["BlockMask"]

_ALIGNS = ("bottom_right", "top_left")


# ---------------------------------------------------------------------------------------------
# argument normalisation (every error names the argument the caller passed)
# ---------------------------------------------------------------------------------------------

def _is_int(x) -> bool:
    # bool is an int subclass, but block_size=True is a bug, not a size.
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _positive_int(value, name: str) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _block_size_pair(block_size, name: str = "block_size", parts=("bq", "bk")) -> tuple[int, int]:
    """``int`` (square) or a pair of positive ints -> ``(bq, bk)``; errors name ``name``."""
    if _is_int(block_size):
        b = _positive_int(block_size, name)
        return b, b
    try:
        items = tuple(block_size)
    except TypeError:
        raise TypeError(
            f"{name} must be a positive int or a pair ({parts[0]}, {parts[1]}) of positive ints, "
            f"got {block_size!r}") from None
    if len(items) != 2:
        raise ValueError(
            f"{name} must be a positive int or a pair ({parts[0]}, {parts[1]}) of positive ints, "
            f"got {block_size!r}")
    return (_positive_int(items[0], f"{name}[0] ({parts[0]})"),
            _positive_int(items[1], f"{name}[1] ({parts[1]})"))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _num_heads(nheads) -> int:
    """``None`` means a head-independent mask, i.e. one mask head."""
    return 1 if nheads is None else _positive_int(nheads, "nheads")


def _compress(layout: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bool ``(H, T, U)`` -> ``count (H, T)`` and ascending ``index (H, T, max(1, count.max()))``."""
    count = layout.sum(axis=-1, dtype=np.int32)
    width = max(1, int(count.max()))
    # A stable sort of "not kept" puts the kept columns first, still in ascending order.
    order = np.argsort(~layout, axis=-1, kind="stable")[..., :width]
    slot = np.arange(width)
    index = np.where(slot < count[..., None], order, 0).astype(np.int32)
    return np.ascontiguousarray(count), np.ascontiguousarray(index)


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _broadcast_heads(a: np.ndarray, b: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    ha, hb = a.shape[0], b.shape[0]
    if ha != hb and 1 not in (ha, hb):
        raise ValueError(f"cannot {what} block masks with {ha} and {hb} heads "
                         f"(head counts must be equal or one of them 1)")
    h = max(ha, hb)
    shape = (h,) + a.shape[1:]
    return np.broadcast_to(a, shape), np.broadcast_to(b, shape)


# ---------------------------------------------------------------------------------------------
# BlockMask
# ---------------------------------------------------------------------------------------------

class BlockMask:
    """Which ``bq x bk`` blocks of ``S = QK^T`` are computed, per mask head.

    Attributes (all read-only numpy arrays, built once; see the module docstring):
        layout:    bool ``(Hm, Tq, Tk)``.
        kv_count:  int32 ``(Hm, Tq)``;  kv_index: int32 ``(Hm, Tq, maxK)``, ascending, 0-padded.
        q_count:   int32 ``(Hm, Tk)``;  q_index:  int32 ``(Hm, Tk, maxQ)``, ascending, 0-padded.
        block_size: ``(bq, bk)``; seqlen_q, seqlen_k: the sequence lengths the mask was built for.

    ``Hm == 1`` means one mask shared by all attention heads. A block mask has block granularity:
    every element of a kept block is visible (``causal`` is applied by the kernel on top).

    Block sizes: each side must be a multiple of the kernels' tile on that side, which depends on the
    path, head dim and machine. Multiples of 128 (the default 128 x 128) work everywhere: on a GPU the
    tiles are at most 128 on a side (tensor cores: 128 x 64 forward, 64 x 64 backward, the Hopper forward
    128 x 128; SIMT: at most 128 x 64), under the simulator at most 64. A smaller block (64, say) works on some GPU paths and is
    refused on others, with the tile it needs in the error. Build one
    with :meth:`from_layout`, :meth:`from_predicate`, :meth:`from_flex` or a pattern constructor
    (:meth:`dense`, :meth:`causal`, :meth:`local`, :meth:`strided`, :meth:`butterfly`,
    :meth:`random`); combine with ``|`` and ``&``.
    """

    def __init__(self, layout, block_size=(128, 128), seqlen_q=None, seqlen_k=None):
        """Same as :meth:`from_layout`."""
        bq, bk = _block_size_pair(block_size)
        layout = _layout_array(layout)
        hm, tq, tk = layout.shape
        if seqlen_q is None:
            seqlen_q = tq * bq
        if seqlen_k is None:
            seqlen_k = tk * bk
        seqlen_q = _positive_int(seqlen_q, "seqlen_q")
        seqlen_k = _positive_int(seqlen_k, "seqlen_k")
        if _cdiv(seqlen_q, bq) != tq:
            raise ValueError(
                f"seqlen_q={seqlen_q} with block size bq={bq} needs ceil(seqlen_q / bq) = "
                f"{_cdiv(seqlen_q, bq)} query blocks, but layout has Tq={tq}")
        if _cdiv(seqlen_k, bk) != tk:
            raise ValueError(
                f"seqlen_k={seqlen_k} with block size bk={bk} needs ceil(seqlen_k / bk) = "
                f"{_cdiv(seqlen_k, bk)} key blocks, but layout has Tk={tk}")

        self.layout = _read_only(layout)
        self.block_size = (bq, bk)
        self.seqlen_q = seqlen_q
        self.seqlen_k = seqlen_k
        kv_count, kv_index = _compress(layout)
        q_count, q_index = _compress(layout.transpose(0, 2, 1))
        self.kv_count = _read_only(kv_count)
        self.kv_index = _read_only(kv_index)
        self.q_count = _read_only(q_count)
        self.q_index = _read_only(q_index)
        # Device copies of the lists, keyed by the interop layer (e.g. per device / tile size).
        self._device_cache = {}

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_layout(cls, layout, block_size=(128, 128), seqlen_q=None, seqlen_k=None) -> "BlockMask":
        """Block mask from a block layout.

        Args:
            layout: bool-like array (bool, integer or float; nonzero = kept) of shape ``(Tq, Tk)``
                (one mask for all heads) or ``(Hm, Tq, Tk)``. Copied.
            block_size: ``int`` (square blocks) or ``(bq, bk)``, positive ints.
            seqlen_q, seqlen_k: element lengths; default ``Tq * bq`` and ``Tk * bk``. Must satisfy
                ``ceil(seqlen_q / bq) == Tq`` and ``ceil(seqlen_k / bk) == Tk`` (the last block may
                be partial).

        Raises:
            TypeError / ValueError naming the offending argument.
        """
        return cls(layout, block_size, seqlen_q, seqlen_k)

    @classmethod
    def from_predicate(cls, fn, nheads, seqlen_q, seqlen_k, block_size=(128, 128)) -> "BlockMask":
        """Block mask with ``layout[h, i, j] = fn(h, i, j)`` (block indices, not element indices).

        ``fn(head, q_block, k_block) -> bool``. It is first called once with broadcasting index
        arrays ``h[:, None, None], qb[None, :, None], kb[None, None, :]``; if that raises, or does
        not return a 3-d array broadcastable to ``(Hm, Tq, Tk)``, ``fn`` is called once per block
        with Python ints instead. ``nheads`` of ``None`` or 1 gives a head-independent mask
        (``Hm = 1``; ``fn`` sees head 0).
        """
        hm = _num_heads(nheads)
        bq, bk = _block_size_pair(block_size)
        seqlen_q = _positive_int(seqlen_q, "seqlen_q")
        seqlen_k = _positive_int(seqlen_k, "seqlen_k")
        tq, tk = _cdiv(seqlen_q, bq), _cdiv(seqlen_k, bk)
        shape = (hm, tq, tk)

        layout = None
        try:
            h = np.arange(hm)[:, None, None]
            qb = np.arange(tq)[None, :, None]
            kb = np.arange(tk)[None, None, :]
            result = np.asarray(fn(h, qb, kb))
            # Only an element-wise expression of the three index arrays is trusted: it is 3-d. A
            # 0-d result may come from a reduction over the arrays (np.all(...)), so it is redone.
            if result.ndim == 3 and result.dtype.kind in "biuf":
                layout = np.broadcast_to(result, shape).astype(bool)
        except Exception:
            layout = None
        if layout is None:
            layout = np.zeros(shape, dtype=bool)
            for hh in range(hm):
                for i in range(tq):
                    for j in range(tk):
                        layout[hh, i, j] = bool(fn(hh, i, j))
        return cls(layout, (bq, bk), seqlen_q, seqlen_k)

    @classmethod
    def from_flex(cls, flex_block_mask, nheads=None) -> "BlockMask":
        """Block mask from a PyTorch FlexAttention ``BlockMask``.

        Reads ``kv_num_blocks`` / ``kv_indices`` and, when present, ``full_kv_num_blocks`` /
        ``full_kv_indices`` (FlexAttention splits nonzero blocks into partial and full ones; their
        union is the set of nonzero blocks), ``BLOCK_SIZE`` and ``seq_lengths``.

        Only the block structure is used: a partial block of the flex mask becomes a fully visible
        block here, i.e. the element-level ``mask_mod`` inside partial blocks is NOT applied.
        Express element-level structure that matters (causal) with the kernel's ``causal`` flag.

        The flex mask's batch dimension must be 1, or all batch entries identical (ValueError
        otherwise); heads come from its dim 1 (1 = shared). If ``nheads`` is given, the flex mask
        must have 1 or ``nheads`` heads; a 1-head mask stays shared (``Hm = 1``).
        """
        try:  # torch is optional; only this constructor needs it
            from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask
        except ImportError:  # pragma: no cover - exercised only without torch
            FlexBlockMask = None
        if FlexBlockMask is not None and not isinstance(flex_block_mask, FlexBlockMask):
            raise TypeError("flex_block_mask must be a torch.nn.attention.flex_attention.BlockMask, "
                            f"got {type(flex_block_mask).__name__}")

        def host(t):
            return np.asarray(t.detach().cpu().numpy())

        kv_num = host(flex_block_mask.kv_num_blocks)
        kv_idx = host(flex_block_mask.kv_indices)
        if kv_num.ndim != 3 or kv_idx.ndim != 4:
            raise ValueError("flex_block_mask.kv_num_blocks must be (B, H, Tq) and kv_indices "
                             f"(B, H, Tq, Tk), got {kv_num.shape} and {kv_idx.shape}")
        b, h, tq_f, tk_f = kv_idx.shape
        layout = _scatter_lists(kv_num, kv_idx, tk_f)
        full_num = getattr(flex_block_mask, "full_kv_num_blocks", None)
        full_idx = getattr(flex_block_mask, "full_kv_indices", None)
        if full_num is not None and full_idx is not None:
            layout |= _scatter_lists(host(full_num), host(full_idx), tk_f)

        bq, bk = _block_size_pair(tuple(int(x) for x in flex_block_mask.BLOCK_SIZE),
                                 "flex_block_mask.BLOCK_SIZE")
        seq_lengths = getattr(flex_block_mask, "seq_lengths", None)
        if seq_lengths is not None:
            seqlen_q, seqlen_k = (int(x) for x in seq_lengths)
        else:
            seqlen_q, seqlen_k = tq_f * bq, tk_f * bk
        tq, tk = _cdiv(seqlen_q, bq), _cdiv(seqlen_k, bk)
        if tq > tq_f or tk > tk_f:
            raise ValueError(
                f"flex_block_mask has {tq_f} x {tk_f} blocks, too few for seq_lengths "
                f"({seqlen_q}, {seqlen_k}) with BLOCK_SIZE ({bq}, {bk})")
        layout = layout[:, :, :tq, :tk]

        if b != 1 and not (layout == layout[:1]).all():
            raise ValueError(f"flex_block_mask has batch size {b} with differing masks per batch "
                             "entry; numba_flash block masks are shared across the batch")
        layout = layout[0]
        if nheads is not None:
            nheads = _positive_int(nheads, "nheads")
            if h not in (1, nheads):
                raise ValueError(f"flex_block_mask has {h} heads, nheads={nheads}")
        return cls(layout, (bq, bk), seqlen_q, seqlen_k)

    # -- patterns ------------------------------------------------------------------------------

    @classmethod
    def _pattern(cls, fn, nheads, seqlen_q, seqlen_k, block_size) -> "BlockMask":
        """``fn(rows_lo, rows_hi, cols_lo, cols_hi, i, j)`` on broadcast ``(Tq, 1)`` / ``(1, Tk)``
        arrays (first/last element row and column of each block, block indices) -> ``(Tq, Tk)``."""
        hm = _num_heads(nheads)
        bq, bk = _block_size_pair(block_size)
        seqlen_q = _positive_int(seqlen_q, "seqlen_q")
        seqlen_k = _positive_int(seqlen_k, "seqlen_k")
        i = np.arange(_cdiv(seqlen_q, bq))[:, None]
        j = np.arange(_cdiv(seqlen_k, bk))[None, :]
        r_lo, r_hi = i * bq, np.minimum((i + 1) * bq, seqlen_q) - 1
        c_lo, c_hi = j * bk, np.minimum((j + 1) * bk, seqlen_k) - 1
        layout = np.broadcast_to(fn(r_lo, r_hi, c_lo, c_hi, i, j), (i.size, j.size))
        return cls(np.broadcast_to(layout, (hm,) + layout.shape), (bq, bk), seqlen_q, seqlen_k)

    @classmethod
    def dense(cls, seqlen_q, seqlen_k, block_size=(128, 128), *, nheads=1) -> "BlockMask":
        """Every block kept."""
        return cls._pattern(lambda *_: np.ones((1, 1), bool), nheads, seqlen_q, seqlen_k, block_size)

    @classmethod
    def causal(cls, seqlen_q, seqlen_k, block_size=(128, 128), *, nheads=1,
               align="bottom_right") -> "BlockMask":
        """Blocks holding at least one element visible under causal attention.

        Query row ``r`` sees key column ``c`` iff ``c <= r + offset``, with
        ``offset = seqlen_k - seqlen_q`` for ``align="bottom_right"`` (flash-attn's convention) and
        ``offset = 0`` for ``align="top_left"`` (torch SDPA's ``is_causal``). Block ``(i, j)`` is kept
        iff its first column is ``<=`` its last row plus ``offset``. Query blocks whose rows see no
        key at all (bottom-right with ``seqlen_q > seqlen_k``) get an empty list. The diagonal
        blocks still need element-wise masking: pass ``causal=True`` to the kernel as well.
        """
        offset = _causal_offset(align, seqlen_q, seqlen_k)
        return cls._pattern(lambda r_lo, r_hi, c_lo, c_hi, i, j: c_lo <= r_hi + offset,
                            nheads, seqlen_q, seqlen_k, block_size)

    @classmethod
    def local(cls, window, seqlen_q, seqlen_k, block_size=(128, 128), *, nheads=1, causal=False,
              align="bottom_right") -> "BlockMask":
        """Sliding window: blocks intersecting the band ``|r + offset - c| <= window``.

        ``window`` is in elements (tokens), ``offset`` as in :meth:`causal` (``seqlen_k - seqlen_q``
        for the default bottom-right alignment). With ``causal=True`` the band is one-sided:
        ``0 <= r + offset - c <= window``. Block granularity: kept blocks are fully visible.
        """
        if not _is_int(window):
            raise TypeError(f"window must be a non-negative int (tokens), got {window!r}")
        if window < 0:
            raise ValueError(f"window must be a non-negative int (tokens), got {window!r}")
        offset = _causal_offset(align, seqlen_q, seqlen_k)
        lower = 0 if causal else -window

        def band(r_lo, r_hi, c_lo, c_hi, i, j):
            # d = r + offset - c takes every integer value in [d_min, d_max] over the block.
            d_min, d_max = r_lo + offset - c_hi, r_hi + offset - c_lo
            return (d_min <= window) & (d_max >= lower)

        return cls._pattern(band, nheads, seqlen_q, seqlen_k, block_size)

    @classmethod
    def strided(cls, stride, seqlen_q, seqlen_k, block_size=(128, 128), *, nheads=1, causal=False,
                align="bottom_right") -> "BlockMask":
        """The "fixed" pattern of the Sparse Transformer (Child et al. 2019), in block units.

        Block ``(i, j)`` is kept iff ``i // stride == j // stride`` (same local group of ``stride``
        blocks) or ``j % stride == stride - 1`` (``j`` is the summary column of its group).
        ``stride`` is in blocks. With ``causal=True`` the result is intersected with
        :meth:`causal` (same ``align``).
        """
        stride = _positive_int(stride, "stride")
        mask = cls._pattern(
            lambda r_lo, r_hi, c_lo, c_hi, i, j: (i // stride == j // stride) | (j % stride == stride - 1),
            nheads, seqlen_q, seqlen_k, block_size)
        if causal:
            mask = mask & cls.causal(seqlen_q, seqlen_k, block_size, nheads=nheads, align=align)
        return mask

    @classmethod
    def butterfly(cls, seqlen_q, seqlen_k, block_size=(128, 128), *, nheads=1) -> "BlockMask":
        """Support of the butterfly matrices, in block units (Dao et al., Pixelated Butterfly;
        the block-sparse pattern of the FlashAttention paper's experiments).

        With ``T = max(Tq, Tk)`` rounded up to a power of 2, the butterfly factor of size ``2^(s+1)``
        has nonzeros at ``(i, i)`` and ``(i, i XOR 2^s)``; the union over ``s = 0 .. log2(T) - 1``
        keeps block ``(i, j)`` iff ``j == i`` or ``i XOR j`` is a power of two. The ``T x T`` pattern
        is clipped to ``(Tq, Tk)``. Each query block keeps ``1 + log2(T)`` key blocks (before
        clipping).
        """
        def support(r_lo, r_hi, c_lo, c_hi, i, j):
            x = i ^ j
            return (x & (x - 1)) == 0  # x == 0 (diagonal) or a single set bit

        return cls._pattern(support, nheads, seqlen_q, seqlen_k, block_size)

    @classmethod
    def random(cls, density, seqlen_q, seqlen_k, block_size=(128, 128), *, nheads=1,
               seed=0) -> "BlockMask":
        """Each block kept independently with probability ``density``.

        Drawn with ``numpy.random.default_rng(seed)`` as one ``(Hm, Tq, Tk)`` array, so every head
        gets its own pattern when ``nheads > 1``. Unless ``density == 0``, block
        ``(i, min(i * Tk // Tq, Tk - 1))`` (the diagonal, stretched to a non-square layout) is also
        kept, so no query block is left without keys; ``density == 0`` gives an empty mask.
        """
        if isinstance(density, (bool, np.bool_)) or not isinstance(density, numbers.Real):
            raise TypeError(f"density must be a float in [0, 1], got {density!r}")
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"density must be a float in [0, 1], got {density!r}")
        hm = _num_heads(nheads)
        bq, bk = _block_size_pair(block_size)
        seqlen_q = _positive_int(seqlen_q, "seqlen_q")
        seqlen_k = _positive_int(seqlen_k, "seqlen_k")
        tq, tk = _cdiv(seqlen_q, bq), _cdiv(seqlen_k, bk)
        layout = np.random.default_rng(seed).random((hm, tq, tk)) < density
        if density > 0:
            i = np.arange(tq)
            layout[:, i, np.minimum(i * tk // tq, tk - 1)] = True
        return cls(layout, (bq, bk), seqlen_q, seqlen_k)

    # -- composition ---------------------------------------------------------------------------

    def _combine(self, other, op, what: str) -> "BlockMask":
        if not isinstance(other, BlockMask):
            raise TypeError(f"cannot {what} a BlockMask with {type(other).__name__}")
        if other.block_size != self.block_size:
            raise ValueError(f"cannot {what} block masks with block sizes {self.block_size} and "
                             f"{other.block_size}")
        if (other.seqlen_q, other.seqlen_k) != (self.seqlen_q, self.seqlen_k):
            raise ValueError(f"cannot {what} block masks built for (seqlen_q, seqlen_k) = "
                             f"{(self.seqlen_q, self.seqlen_k)} and {(other.seqlen_q, other.seqlen_k)}")
        a, b = _broadcast_heads(self.layout, other.layout, what)
        return BlockMask(op(a, b), self.block_size, self.seqlen_q, self.seqlen_k)

    def union(self, other: "BlockMask") -> "BlockMask":
        """Blocks kept by either mask. Equal block size and seqlens required; a 1-head mask
        broadcasts against an n-head one."""
        return self._combine(other, np.logical_or, "take the union of")

    def intersection(self, other: "BlockMask") -> "BlockMask":
        """Blocks kept by both masks. Same requirements as :meth:`union`."""
        return self._combine(other, np.logical_and, "intersect")

    def __or__(self, other):
        if not isinstance(other, BlockMask):
            return NotImplemented
        return self.union(other)

    def __and__(self, other):
        if not isinstance(other, BlockMask):
            return NotImplemented
        return self.intersection(other)

    # -- properties ----------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(Hm, Tq, Tk)``."""
        return tuple(int(n) for n in self.layout.shape)

    @property
    def nnz(self) -> int:
        """Number of kept ``(head, q-block, k-block)`` entries."""
        return int(self.kv_count.sum())

    @property
    def density(self) -> float:
        """Fraction of ``(head, q-block, k-block)`` entries kept (blocks, not elements)."""
        return self.nnz / self.layout.size

    # -- use -----------------------------------------------------------------------------------

    def check(self, nheads, seqlen_q, seqlen_k, tile) -> tuple[int, int]:
        """Validate the mask for an attention call with kernel tile ``tile = (Br, Bc)``.

        Raises ValueError if the mask has neither 1 nor ``nheads`` heads, was built for other
        sequence lengths, or if its block size is not a multiple of the tile. Returns
        ``(q_per_blk, k_per_blk) = (bq // Br, bk // Bc)``, the tiles per block the kernel expands.
        """
        nheads = _positive_int(nheads, "nheads")
        hm = self.layout.shape[0]
        if hm not in (1, nheads):
            raise ValueError(f"block_mask has {hm} heads, attention has {nheads}")
        if seqlen_q != self.seqlen_q:
            raise ValueError(f"block_mask was built for seqlen_q={self.seqlen_q}, got {seqlen_q}")
        if seqlen_k != self.seqlen_k:
            raise ValueError(f"block_mask was built for seqlen_k={self.seqlen_k}, got {seqlen_k}")
        br, bc = _block_size_pair(tile, "tile", ("Br", "Bc"))
        bq, bk = self.block_size
        if bq % br or bk % bc:
            raise ValueError(f"block_mask block size {self.block_size} is not a multiple of the "
                             f"kernel tile {(br, bc)} of this path and head dim: use multiples of "
                             f"{(br, bc)}, or of 128 (the default 128 x 128 fits every path)")
        return bq // br, bk // bc

    def to_dense(self, seqlen_q=None, seqlen_k=None) -> np.ndarray:
        """Element mask, bool ``(Hm, seqlen_q, seqlen_k)``, True = attend.

        Each block expanded to ``bq x bk`` elements, cropped to the given lengths (default: the
        mask's own). Lengths beyond ``Tq * bq`` / ``Tk * bk`` raise ValueError.
        """
        bq, bk = self.block_size
        hm, tq, tk = self.shape
        seqlen_q = self.seqlen_q if seqlen_q is None else _positive_int(seqlen_q, "seqlen_q")
        seqlen_k = self.seqlen_k if seqlen_k is None else _positive_int(seqlen_k, "seqlen_k")
        if seqlen_q > tq * bq:
            raise ValueError(f"seqlen_q={seqlen_q} exceeds the mask's {tq} blocks of {bq} rows")
        if seqlen_k > tk * bk:
            raise ValueError(f"seqlen_k={seqlen_k} exceeds the mask's {tk} blocks of {bk} columns")
        dense = np.repeat(np.repeat(self.layout, bq, axis=1), bk, axis=2)
        return np.ascontiguousarray(dense[:, :seqlen_q, :seqlen_k])

    # -- picture -------------------------------------------------------------------------------

    def to_string(self, max_rows=32, max_cols=64, max_heads=4) -> str:
        """A header line and, per head, one row of ``#`` (kept) / ``.`` (skipped) per query block.

        Rows beyond ``max_rows``, columns beyond ``max_cols`` and heads beyond ``max_heads`` are
        left out, with a note saying how many.
        """
        hm, tq, tk = self.shape
        lines = [f"BlockMask(heads={hm}, seqlen_q={self.seqlen_q}, seqlen_k={self.seqlen_k}, "
                 f"block={self.block_size}, density={self.density:.2f})"]
        for h in range(min(hm, max_heads)):
            lines.append("head 0 (shared by all heads):" if hm == 1 else f"head {h}:")
            for i in range(min(tq, max_rows)):
                row = "".join("#" if kept else "." for kept in self.layout[h, i, :max_cols])
                lines.append("  " + row + (f" ... (+{tk - max_cols} key blocks)" if tk > max_cols else ""))
            if tq > max_rows:
                lines.append(f"  ... (+{tq - max_rows} query blocks)")
        if hm > max_heads:
            lines.append(f"... (+{hm - max_heads} heads)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_string()

    __repr__ = __str__


# ---------------------------------------------------------------------------------------------
# helpers that need the layout conventions above
# ---------------------------------------------------------------------------------------------

def _layout_array(layout) -> np.ndarray:
    """Bool-like ``(Tq, Tk)`` or ``(Hm, Tq, Tk)`` -> fresh C-contiguous bool ``(Hm, Tq, Tk)``."""
    a = np.asarray(layout)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"layout must be bool-like (bool, integer or float), got dtype {a.dtype}")
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"layout must have shape (Tq, Tk) or (heads, Tq, Tk), got shape {a.shape}")
    if 0 in a.shape:
        raise ValueError(f"layout must have shape (heads, Tq, Tk) with no empty dimension, "
                         f"got shape {a.shape}")
    return np.array(a != 0, dtype=bool, order="C")


def _causal_offset(align, seqlen_q, seqlen_k) -> int:
    if align not in _ALIGNS:
        raise ValueError(f"align must be one of {_ALIGNS}, got {align!r}")
    if align == "top_left":
        return 0
    return _positive_int(seqlen_k, "seqlen_k") - _positive_int(seqlen_q, "seqlen_q")


def _scatter_lists(num: np.ndarray, idx: np.ndarray, width: int) -> np.ndarray:
    """``(..., T)`` counts and ``(..., T, W)`` index lists -> bool ``(..., T, width)`` layout.

    Slots past the count hold arbitrary values in flex masks, so they are sent to a spare column.
    """
    slot = np.arange(idx.shape[-1])
    cols = np.where(slot < num[..., None], idx, width).astype(np.int64)
    out = np.zeros(idx.shape[:-1] + (width + 1,), dtype=bool)
    np.put_along_axis(out, cols, True, axis=-1)
    return out[..., :width]
