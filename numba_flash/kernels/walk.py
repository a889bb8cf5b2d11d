"""The tile walk: which tiles of the other side a block visits, and which elements of a tile are visible.

Every kernel owns one tile of one side (a query tile in the forward and dQ kernels, a key tile in the
dK/dV kernel) and walks a list of tiles of the other side. The lists are a block mask's (docs/CONTRACTS.md):
for mask row `row`, `count[row]` blocks with ascending indices `index[row, :count]`, each block covering
`per_blk` tiles. Dense attention is the one-block mask `[[1]]` whose block covers every tile.

A (query tile, key tile) pair is empty, and skipped without loading anything, when either tile starts
past its sequence or, with `causal`, every key of the key tile lies right of the diagonal for the query
tile's last row. Inside a visited pair, query r sees key c iff r < seqlen_q, c < seqlen_k and, with
`causal`, c <= r + offset (offset = seqlen_k - seqlen_q for bottom-right alignment, 0 for top-left);
`visible_cols` gives each fragment row its visible columns as one interval.

`next_tile` is written as "the first visible step after this one" so that a kernel can start loading
the next tile before it computes on the current one (the tensor-core path's cp.async pipeline).

`tile_grid` is a kernel's grid and `block_coords` the (tile, head, batch) a block of it owns. Without
`causal` every tile has the same work and the grid is (tiles, nheads, batch). With `causal` the work
differs (query tile i of a forward or dQ block sees i + 1 key tiles, key tile j of a dK/dV block sees
Tr - j query tiles), and the blocks launched last decide how long the end of the grid leaves SMs idle.
So causal blocks run longest first (a greedy longest-processing-time order, as FlashAttention-3's
scheduler does), but within sections of (batch, head) pairs, so that the blocks running at once share
the tiles they stream through the L2: with the longest tile of *every* pair first, an H100's 132 blocks
at N = 2k (B = 8, H = 32) walk 132 different heads' K, V (66 MB, beyond the 50 MB L2), and every key tile
comes from DRAM (H100, fp16, N = 2k causal: forward d=64 246 -> 303 TFLOP/s, d=128 315 -> 445, backward
d=64 210 -> 269 with sections). The causal grid is (nheads, tiles, batch), which the GPU hands out heads
fastest and batches slowest: one section per batch element, its tiles longest first, no division in
block_coords. A persistent kernel (persistent_grid, make_work_order) launches only as many blocks as run
at once and has each take work tiles x, x + G, x + 2G, ... of one order (sections of `section` pairs,
sized by the host so that a section's streamed tiles fit in the L2 budget, section_pairs; longest first
inside each), or draws them from a counter (the forward's MmaTiles.dynamic).
"""
import os
from collections import namedtuple
from functools import lru_cache

from numba import cuda, int32

from .launch import inline_device

MAX_GRID_Z = 65535      # CUDA's limit on gridDim.y and gridDim.z
LIM = 1 << 20           # beyond any column offset inside a tile (make_fill_invisible)

Walk = namedtuple("Walk", "first_tile next_tile needs_mask visible_cols block_coords")
WorkOrder = namedtuple("WorkOrder", "first more step coords")


# What one section's streamed tiles may take of the L2 (an H100 / H200 has 50 MB, an A100 40 MB). H100,
# fp16, d=64 causal persistent forward (tools/tune.py, 2026-12-07, TFLOP/s at N = 1k / 2k / 4k / 16k):
# previous order 204.5 / 246.2 / 284.5 / 380.9, 32 MiB sections 220.3 / 292.9 / 341.8 / 393.6, 16 MiB
# 237.1 / 302.6 / 353.7 / 406.1 (benchmarks/results/h100-2026-12-07-causal-l2-sections-tests-tuning.md).
# NUMBA_FLASH_L2_SECTION overrides it (tuning; 0: one section, the plain longest-first order, in the
# persistent order and in tile_grid's causal grids alike). Read once, when the module loads.
L2_SECTION_ENV = "NUMBA_FLASH_L2_SECTION"
_L2_SECTION_BYTES = int(os.environ.get(L2_SECTION_ENV, "").strip() or 16 << 20)


def tile_grid(causal, seqlen, rows, nheads, batch, name):
    """The grid of a kernel whose blocks own `rows`-row tiles of a length-`seqlen` side (`name` in the
    error): (tiles, nheads, batch), or with `causal` (nheads, tiles, batch) for block_coords' order
    ((nheads, batch, tiles), one section, where NUMBA_FLASH_L2_SECTION=0)."""
    tiles = -(-seqlen // rows)
    if not causal:
        return tiles, nheads, batch
    if tiles > MAX_GRID_Z:
        raise ValueError(f"{name} = {seqlen} is too long for causal attention: {tiles} tiles of {rows} rows, "
                         f"and the kernel grid holds at most {MAX_GRID_Z} (seqlen <= {MAX_GRID_Z * rows})")
    return (nheads, tiles, batch) if _L2_SECTION_BYTES > 0 else (nheads, batch, tiles)


def section_pairs(pair_bytes, pairs):
    """How many (batch, head) pairs a persistent causal order puts in one section: as many as keep the
    tiles one pair streams (`pair_bytes`: its K and V in the forward) within the L2 budget together, at
    least 1, at most all `pairs`."""
    if _L2_SECTION_BYTES <= 0:
        return max(pairs, 1)
    return max(1, min(pairs, _L2_SECTION_BYTES // max(pair_bytes, 1)))


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
    def next_tile(index, row, maxn, per_blk, nblocks, t, sub, base, this0, nq, nk, offset):
        """The first non-empty pair after tile `sub` of listed block `t`, whose first tile index is `base`
        (first_tile starts it): (t, sub, base, origin of its other-side tile), or
        t = nblocks when there is none. The position is carried as (block, tile in block, block's first
        tile), so a step needs neither an integer division nor a load of the list."""
        sub += 1
        while t < nblocks:
            if sub == per_blk:
                sub = 0
                t += 1
                if t == nblocks:
                    break
                base = index[row * maxn + t] * per_blk
            o = (base + sub) * other
            if over_keys:
                if not pair_empty(this0, o, nq, nk, offset):
                    return t, sub, base, o
                if causal and o > min(this0 + br, nq) - 1 + offset:
                    break          # lists ascend: every later key tile is right of the diagonal too
            elif not pair_empty(o, this0, nq, nk, offset):
                return t, sub, base, o
            sub += 1
        return nblocks, 0, base, 0

    @inline_device
    def first_tile(count, index, head, tile, mask_sh, maxn, this_per_blk, per_blk, this0, nq, nk, offset):
        """(mask row, number of listed blocks, and next_tile's state and origin for the first non-empty
        pair) of the block that owns tile `tile` of head `head`."""
        row = head * mask_sh + tile // this_per_blk
        base = index[row * maxn] * per_blk          # maxn >= 1: index[row, 0] always exists
        t, sub, base, o = next_tile(index, row, maxn, per_blk, count[row], 0, -1, base, this0, nq, nk, offset)
        return row, count[row], t, sub, base, o

    @inline_device
    def needs_mask(row0, col0, nq, nk, offset):
        """Whether any element of the pair is invisible (else the element tests can be skipped)."""
        m = col0 + bc > nk or row0 + br > nq
        if causal:
            m = m or col0 + bc - 1 > row0 + offset
        return m

    @inline_device
    def visible_cols(r, other0, nq, nk, offset):
        """[lo, hi): the columns of fragment row r (an absolute query or key index) that are visible, as
        offsets from the tile's first column other0. One interval per row, so masking costs two compares
        per element instead of re-deriving the rule."""
        if over_keys:      # rows are queries r, columns keys other0 + c: visible iff c < nk - other0 and
            hi = nk - other0 if r < nq else 0              # (causal) other0 + c <= r + offset
            if causal:
                hi = min(hi, r + offset + 1 - other0)
            return 0, hi
        hi = nq - other0 if r < nk else 0     # rows are keys r, columns queries other0 + c
        lo = 0
        if causal:                            # key r is visible to queries q >= r - offset
            lo = max(0, r - offset - other0)
        return lo, hi

    if causal and _L2_SECTION_BYTES > 0:
        @inline_device
        def block_coords():
            """(tile, head, batch) of this block in tile_grid's causal grid (heads, tiles, batch): longest
            tile first within each batch element. Only special-register reads, which the compiler re-reads
            instead of keeping them live (the first version divided a linear block index: +6 registers,
            dQ spills 36 -> 104 B)."""
            y = cuda.blockIdx.y
            tile = cuda.gridDim.y - 1 - y if over_keys else y
            return tile, cuda.blockIdx.x, cuda.blockIdx.z
    elif causal:
        @inline_device
        def block_coords():
            """(tile, head, batch) in the one-section causal grid (heads, batch, tiles)."""
            z = cuda.blockIdx.z
            tile = cuda.gridDim.z - 1 - z if over_keys else z
            return tile, cuda.blockIdx.x, cuda.blockIdx.y
    else:
        @inline_device
        def block_coords():
            """(tile, head, batch) of this block in tile_grid's grid (tiles, heads, batch)."""
            return cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z

    return Walk(first_tile, next_tile, needs_mask, visible_cols, block_coords)


def persistent_grid(seqlen, rows, nheads, batch, blocks, section=0):
    """(grid, work) of a persistent kernel whose blocks own `rows`-row tiles of a length-`seqlen` side:
    at most `blocks` blocks (as many as the GPU holds at once), and the work argument make_work_order's
    pieces read: (tiles, nheads, batch, section), section: the (batch, head) pairs of one causal section
    (section_pairs; 0 or more than there are: one section)."""
    tiles = -(-seqlen // rows)
    if tiles * nheads * batch >= 1 << 31:     # the kernel counts work tiles in 32 bits
        raise ValueError(f"seqlen = {seqlen} with {nheads} heads and batch {batch} is {tiles * nheads * batch} "
                         f"tiles of {rows} rows; the persistent forward counts at most 2**31 - 1")
    pairs = nheads * batch
    section = pairs if section <= 0 else min(section, pairs)
    return (max(1, min(tiles * pairs, blocks)), 1, 1), (tiles, nheads, batch, max(section, 1))


@lru_cache(maxsize=None)
def make_work_order(walk, causal, persistent):
    """The work tiles a block owns, as a loop: w = first(); while more(w, work): (tile, head, batch) =
    coords(w, work) ... w = step(w). Not persistent: one pass, the block's walk.block_coords (work unused).
    Persistent (grid and work from persistent_grid): block x takes work tiles x, x + G, x + 2G, ... (G
    blocks) of one order: tiles fastest, or with `causal` sections of work[3] (batch, head) pairs (heads
    fastest), each section's tiles longest first (the last section may hold fewer pairs). A few integer
    divisions per work tile, never per key tile."""
    if not persistent:
        block_coords = walk.block_coords

        @inline_device
        def first():
            return 0

        @inline_device
        def more(w, work):
            return w < 1

        @inline_device
        def step(w):
            return 1

        @inline_device
        def coords(w, work):
            return block_coords()

        return WorkOrder(first, more, step, coords)

    @inline_device
    def first():
        return int32(cuda.blockIdx.x)

    @inline_device
    def more(w, work):
        return w < int32(work[0]) * int32(work[1]) * int32(work[2])

    @inline_device
    def step(w):
        return w + int32(cuda.gridDim.x)

    if causal:
        @inline_device
        def coords(w, work):
            tiles, heads, batch, sec = int32(work[0]), int32(work[1]), int32(work[2]), int32(work[3])
            span = sec * tiles                       # work tiles per full section
            first = (w // span) * sec                # the section's first (batch, head) pair
            n = min(sec, heads * batch - first)      # its pairs
            r = w - first * tiles                    # position in the section
            z = r // n                               # tile rank, longest first
            hb = first + r - z * n
            hh = hb // heads
            return tiles - 1 - z, hb - hh * heads, hh
    else:
        @inline_device
        def coords(w, work):
            tiles, heads = int32(work[0]), int32(work[1])
            hb = w // tiles
            hh = hb // heads
            return w - hb * tiles, hb - hh * heads, hh

    return WorkOrder(first, more, step, coords)


@lru_cache(maxsize=None)
def make_fill_invisible(frag, visible_cols, narrow=False):
    """fill(s, value, tid, this0, other0, nq, nk, offset): s[i, j] = value for the thread's invisible
    elements of the tile pair whose fragment rows start at this0 and columns at other0 (frag: the path's
    fragments.Fragment; visible_cols: a walk's). narrow: compare in 32 bits (below)."""
    R, C = frag.rows, frag.cols
    row_of, col_of = frag.row, frag.col

    # Columns relative to the thread's first one, col_of(tid, j) - col_of(tid, 0), are constants in
    # both layouts: comparing those against the row's interval keeps nothing per column live (LLVM had
    # hoisted 16 64-bit column values out of the loop, which spilled).
    # narrow: the interval's ends clamped to [-1, 2^20] (a relative column is in [0, tile width)) keep
    # every comparison's outcome, and the comparisons become 32-bit (a 64-bit one is two instructions).
    # wgmma, sm_90a: the dQ kernel's registers 236 -> 216 (d=64), its spills 36 -> 0 B (d=128); on the
    # mma.sync forward at d=128 it cost 28 B of spills instead, so the mma and SIMT paths compare in 64.
    if narrow:
        @inline_device
        def rel(x, c0):
            return int32(min(max(x - c0, -1), LIM))
    else:
        @inline_device
        def rel(x, c0):
            return x - c0

    @inline_device
    def fill(s, value, tid, this0, other0, nq, nk, offset):
        c0 = col_of(tid, 0)
        for i in range(R):
            lo, hi = visible_cols(this0 + row_of(tid, i), other0, nq, nk, offset)
            lo_r, hi_r = rel(lo, c0), rel(hi, c0)
            for j in range(C):
                c = rel(col_of(tid, j), c0)
                if c < lo_r or c >= hi_r:
                    s[i, j] = value
        return

    return fill
