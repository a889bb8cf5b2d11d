"""The tile walk: which tiles of the other side a block visits, and which elements of a tile are visible.

Every kernel owns one tile of one side (a query tile in the forward and dQ kernels, a key tile in the
dK/dV kernel) and walks a list of tiles of the other side. The lists are a block mask's (docs/CONTRACTS.md):
for mask row `row`, `count[row]` blocks with ascending indices `index[row, :count]`, each block covering
`per_blk` tiles. Dense attention is the one-block mask `[[1]]` whose block covers every tile.

A (query tile, key tile) pair is empty, and skipped without loading anything, when either tile starts
past its sequence or, with `causal`, every key of the key tile lies right of the diagonal for the query
tile's last row. Inside a visited pair, query r sees key c iff r < seqlen_q, c < seqlen_k and, with
`causal`, c <= r + offset (offset = seqlen_k - seqlen_q for bottom-right alignment, 0 for top-left).

`next_tile` is written as "the first visible step after this one" so that a kernel can start loading
the next tile before it computes on the current one (the tensor-core path's cp.async pipeline).
"""
from collections import namedtuple
from functools import lru_cache

from .launch import inline_device

Walk = namedtuple("Walk", "start next_tile needs_mask visible")


@lru_cache(maxsize=None)
def make_walk(br, bc, causal, over_keys):
    """Walk helpers for Br x Bc (query x key) tiles. over_keys: the block owns a query tile and walks key
    tiles (forward, dQ); otherwise it owns a key tile and walks query tiles (dK/dV)."""
    other = bc if over_keys else br

    @inline_device
    def pair_empty(row0, col0, nq, nk, offset):
        if row0 >= nq or col0 >= nk:
            return True
        if causal:
            return col0 > min(row0 + br, nq) - 1 + offset
        return False

    @inline_device
    def start(count, head, tile, mask_sh, this_per_blk, other_per_blk):
        """(mask row, number of steps) of this block's list: one step per tile of the listed blocks."""
        row = head * mask_sh + tile // this_per_blk
        return row, count[row] * other_per_blk

    @inline_device
    def origin(index, row, maxn, other_per_blk, step):
        """First row (query or key index) of the step-th tile of the list."""
        t = step // other_per_blk
        return (index[row * maxn + t] * other_per_blk + step - t * other_per_blk) * other

    @inline_device
    def next_tile(index, row, maxn, other_per_blk, nsteps, step, this0, nq, nk, offset):
        """(step, origin) of the first non-empty pair after `step` (start with step = -1); (nsteps, 0)
        when there is none."""
        step += 1
        while step < nsteps:
            o = origin(index, row, maxn, other_per_blk, step)
            if over_keys:
                if not pair_empty(this0, o, nq, nk, offset):
                    return step, o
                if causal and o > min(this0 + br, nq) - 1 + offset:
                    return nsteps, 0   # lists ascend: every later key tile is right of the diagonal too
            elif not pair_empty(o, this0, nq, nk, offset):
                return step, o
            step += 1
        return nsteps, 0

    @inline_device
    def needs_mask(row0, col0, nq, nk, offset):
        """Whether any element of the pair is invisible (else the element tests can be skipped)."""
        m = col0 + bc > nk or row0 + br > nq
        if causal:
            m = m or col0 + bc - 1 > row0 + offset
        return m

    @inline_device
    def visible(r, c, nq, nk, offset):
        v = r < nq and c < nk
        if causal:
            v = v and c <= r + offset
        return v

    return Walk(start, next_tile, needs_mask, visible)
