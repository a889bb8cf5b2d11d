"""Plans: the one place that decides which path runs and how the work is cut.

A `Plan` is frozen and small: path, head dim, dtype, causal, whether the inputs allow vector/asynchronous
loads, and the tiles of each kernel of its pass. It is the compile-cache key of the kernel factories and
what tools/ read.

Paths:
  "simt"  fp32 (float64 for float64) arithmetic on CUDA cores; every dtype, every GPU, the simulator.
  "mma"   tensor cores through mma.sync m16n8k16 (sm_80+), float16 and bfloat16 only.
  "wgmma" Hopper warpgroup MMA (sm_90a: compute capability 9.0), float16 and bfloat16 (wgmma_tiles.py),
          forward and backward; past head dim 128 its backward runs the "mma" kernels (`backward_path`).
  "tf32"  float32 inputs at float32 accuracy on warpgroup MMA (cc 9.0) by split TF32, three tf32 products
          per product (tf32_tiles.py); the forward only, head dims up to TF32_MAX_HEADDIM: its backward
          runs the "simt" kernels. Opt-in (backend="tf32"): "auto" keeps float32 on SIMT.
`backend="auto"` (the default, or NUMBA_FLASH_BACKEND) takes "mma" for float16/bfloat16 on compute
capability >= 8.0 (and under the simulator, so CI runs it), "wgmma" instead on a cc 9.0 GPU for the head
dims where it measured faster, chosen per pass (WGMMA_AUTO_HEADDIMS for the forward,
WGMMA_BWD_AUTO_HEADDIMS for the backward), and "simt" otherwise.

SIMT tiles: a kernel runs TY x TX threads; each owns a TM x TN micro-tile of a score tile (TM = rows/TY,
TN = cols/TX) and a TM x DPT micro-tile of an output tile (DPT = padded head dim / TX).
Tensor-core tiles: `warps` warps each own 16*mt rows of the block's resident tile (queries in the forward
and dQ kernels, keys in dK/dV), as m16 tiles of mma fragments; `a_regs` keeps the resident operands (Q,
dO or K, V) in registers as A fragments instead of re-reading them from shared memory at every tile.

How the backward computes dQ (`Plan.dq_mode`, backward.py):
  "kernel"   a separate dQ kernel recomputes S and dP (7 tile products per pair instead of 5); every
             dQ element has one writer, so gradients are bitwise reproducible. The default
             (`deterministic=True`), and the only mode of the SIMT path.
  "atomic"   tensor cores with `deterministic=False`: the dK/dV kernel adds its dS K_j into a float32
             dQ accumulator with unordered reductions (5 products, flash-attn's scheme). On wgmma only
             where the dK/dV tiles allow it (wgmma_tiles.fused_dq_split), else "kernel".
  "bulk"     as "atomic" on wgmma, each warp's slab of dQ added by one asynchronous bulk reduction from
             shared memory instead of a `red` per element pair (FlashAttention-3's scheme); "atomic" on
             the other tensor-core path. A tuning mode: H100, fp16, N=4096 backward TFLOP/s kernel /
             atomic / bulk: d=64 325.7 / 329.5 / 336.0, causal 274.5 / 211.1 / 198.5; d=128 389.2 /
             359.3 / 359.4, causal 356.1 / 289.8 / 272.3 (benchmarks/results/h100-2026-12-06f-*).
NUMBA_FLASH_DQ_MODE overrides the choice for tensor-core plans (tuning runs).
"""
import math
import os
from dataclasses import dataclass, fields
from functools import lru_cache

from .launch import SIMULATOR

BACKENDS = ("auto", "simt", "mma", "wgmma", "tf32")
BACKEND_ENV = "NUMBA_FLASH_BACKEND"
DQ_MODES = ("kernel", "atomic", "bulk")
DQ_MODE_ENV = "NUMBA_FLASH_DQ_MODE"
MMA_DTYPES = ("float16", "bfloat16")
MAX_HEADDIM = 256
TF32_MAX_HEADDIM = 128       # the tf32 forward's shared images (Q, K, V twice each) fit up to here
MIN_HEADDIM = 16


@dataclass(frozen=True)
class SimtTiles:
    br: int   # query rows per tile (Br)
    bc: int   # key rows per tile (Bc)
    ty: int   # thread rows
    tx: int   # thread columns (a power of two <= 32: a row's threads are consecutive lanes of one warp)
    min_blocks: int = 0   # blocks per SM to cap registers for (launch bounds); 0: as many as smem allows

    def padded_headdim(self, headdim):
        return -(-headdim // self.tx) * self.tx


@dataclass(frozen=True)
class MmaTiles:
    br: int
    bc: int
    warps: int
    a_regs: bool = True
    min_blocks: int = 0
    # wgmma and tf32 forwards only. 0: the block's warps copy the streamed K, V tiles themselves into two
    # buffers and meet at a block barrier per tile. n >= 2: warp-specialised: one more warpgroup (the
    # producer) copies Q once and K, V into an n-stage ring guarded by mbarriers (tf32: copies them into
    # staging buffers and splits them into the ring's images; n even); the `warps` compute (forward.py).
    ring: int = 0
    # with a ring and two computing warpgroups: they take turns to issue their products (named barriers),
    # so one's softmax runs while the other's products do (FlashAttention-3's ping-pong)
    pingpong: bool = False
    # wgmma forward (and tf32's warp-specialised one): the wait for P_j-1 V_j-1 in a basic block of its own
    # after the softmax of S_j (wgmma_tiles wait_pv), so the softmax runs while that product does. False: a
    # plain wait, which ptxas moves up to just after the wait for S_j, before the exponentials (SASS,
    # sm_90a, every wgmma forward variant; tf32's too).
    # False by default: measured slower, though the SASS overlaps as designed (H100, fp16, N=4096, one run,
    # tools/tune.py 2026-12-05, TFLOP/s late / plain: d=64 294 / 372, causal 224 / 263; d=128 500 / 554,
    # causal 419 / 439; benchmarks/results/h100-2026-12-05-*).
    late_pv_wait: bool = False
    # warp-specialised forward only: a persistent grid (one block per SM that can hold one) whose blocks
    # take query tiles (work tiles) in turn, so the producer copies the next work tile's Q and first K
    # while the consumers finish the last one (its final P V and the epilogue) (forward.py)
    persistent: bool = False
    # warp-specialised forward: the producer copies by TMA (one thread, boxes described by tensor maps,
    # tma.py) instead of its 128 threads' cp.async; wgmma backward kernels: one thread copies the streamed
    # tiles by TMA (wgmma_tiles.make_wgmma_bwd_ops). Used only where the inputs are aligned and the driver
    # encodes their maps (forward.launches, backward.launches fall back to cp.async otherwise)
    tma: bool = False
    # persistent warp-specialised forward with TMA: after its first work tile (blockIdx.x) a block takes
    # the next one from an atomic counter in global memory (longest first with causal), so the blocks that
    # drew short tiles take more, instead of the fixed round-robin x, x + G, ... (forward.py). Off: H100,
    # fp16, tools/tune.py 2026-12-06, d=64 causal fixed / dynamic 248.2 / 250.7 TFLOP/s at N=2048, 285.4 /
    # 287.3 at 4096 (within run-to-run noise); d=128 on block masks (--sparse, N=4096) no better than the
    # fixed order and 0.292 against 0.258 ms at 14% density (benchmarks/results/h100-2026-12-06f-*); with
    # the causal order in L2 sections (walk.section_pairs, 16 MiB; 2026-12-07) fixed / dynamic at d=64
    # causal N = 1k, 2k, 4k, 16k: 237.1 / 228.3, 302.6 / 300.3, 353.7 / 359.5, 406.1 / 401.4
    dynamic: bool = False
    # tf32 forward only (tf32_tiles.py): split key tile j+1 into its tf32 images while tile j's P V product
    # runs on the tensor cores (the split images double-buffered), instead of before tile j+1's S product
    split_ahead: bool = False
    # tf32 forward only, the synchronous body (tf32_tiles.py, "Pre-split"): a kernel before the forward
    # splits K and V once into their tf32 images in global scratch (4x K's size), and the forward's
    # blocks copy those instead of splitting every key tile again in each query tile's block
    presplit: bool = False

    def padded_headdim(self, headdim):
        return -(-headdim // 16) * 16

    def override(self):
        """These tiles as a NUMBA_FLASH_*_TILES value (tuning runs, tests), in the order _override reads."""
        return ",".join(str(int(getattr(self, f.name))) for f in fields(self))


@dataclass(frozen=True)
class Plan:
    path: str            # "simt" | "mma"
    headdim: int
    dtype: str
    causal: bool
    aligned: bool        # every input row starts vector-aligned (see vector_elems)
    fwd: object = None   # tiles of the forward kernel (a forward plan)
    dkdv: object = None  # tiles of the dK/dV and dQ kernels (a backward plan)
    dq: object = None
    positive_scale: bool = True   # forward: softmax_scale > 0 (the FlashAttention-2 exp2 form, softmax.py)
    dq_mode: str = "kernel"       # backward: how dQ is computed (module docstring)
    vector_red: bool = False      # backward: dQ additions as red.global.add.v2.f32 (sm_90)


def vector_elems(path):
    """Alignment (in elements) the plan's `aligned` promises: SIMT moves 4 elements per load, the tensor-core
    path copies 16 bytes (8 half-precision elements) per cp.async."""
    return 8 if path in ("mma", "wgmma") else 4


# The simulator runs every thread as a Python thread: small blocks keep the tests quick and still give
# several tiles per sequence at the lengths tests use. Two warps per tensor-core block exercise the
# warp-to-rows mapping and the cross-warp barriers.
_SIM = {"simt": dict(fwd=SimtTiles(16, 16, 4, 4), dkdv=SimtTiles(16, 16, 4, 4), dq=SimtTiles(16, 16, 4, 4)),
        "mma": dict(fwd=MmaTiles(32, 16, 2), dkdv=MmaTiles(16, 32, 2), dq=MmaTiles(32, 16, 2)),
        # a warpgroup (4 warps, 64 query rows) is the smallest wgmma block
        "wgmma": dict(fwd=MmaTiles(64, 32, 4, a_regs=False), dkdv=MmaTiles(32, 64, 4, a_regs=False),
                      dq=MmaTiles(64, 32, 4, a_regs=False),
                      # the fused dQ's product takes 64 query rows (one wgmma M)
                      dkdv_atomic=MmaTiles(64, 64, 4, a_regs=False)),
        "tf32": dict(fwd=MmaTiles(64, 32, 4, a_regs=False, presplit=True))}     # pre-split, as on a GPU


def _simt_tiles(role, headdim):
    # Measured on an H200 (tools/tune.py, fp32, N=4096, 2026-11-21). Forward, d=64: 128x64 tiles 33.9
    # TFLOP/s vs 27.5 for 64x64 (8x4 micro-tiles: fewer shared loads per FMA); d=96/128: 64x64 with 8x16
    # threads, P stored over K so two blocks fit per SM, 34.0 / 32.4; d=256 (N=2048): 20.1 vs 10.7 for
    # 32x32. Backward (both kernels), d=64: 64x64 / 16x16 threads 21.3 TFLOP/s; d=128: 32x64 / 8x16 19.4;
    # d > 128: 32x32 / 16x16 (7.0 at d=256, N=2048); 32x64 / 8x16 ran 7.6 but holds 256 accumulator
    # registers per thread for dK, dV and spills.
    if role == "fwd":
        return SimtTiles(128, 64, 16, 16) if headdim <= 64 else SimtTiles(64, 64, 8, 16)
    if headdim <= 64:
        return SimtTiles(64, 64, 16, 16)
    if headdim <= 128:
        return SimtTiles(32, 64, 8, 16)
    return SimtTiles(32, 32, 16, 16)


def _mma_tiles(role, headdim):
    # First choices from the register budget (a thread holds d/2 output floats per m16 tile, Bc/2 score
    # floats, d/4 registers of A fragments per resident operand); tuned on the GPU (docs/PERFORMANCE.md).
    if role == "fwd":
        # H200, fp16, N=4096 (tools/tune.py): d=64: 128 x 64 tiles, 4 warps of 32 rows, Q in registers,
        # 273 TFLOP/s (8 warps of 16 rows 205, 64 x 64 219, 128 x 128 229); d=128: 4 warps of 32 rows
        # reading Q from shared memory 266 (8 warps of 16 rows with Q in registers 258: each warp re-reads
        # all of K and V, so 16-row warps double the shared-memory traffic per FLOP).
        if headdim <= 64:
            return MmaTiles(128, 64, 4)
        if headdim <= 128:
            return MmaTiles(128, 64, 4, a_regs=False)
        return MmaTiles(64, 64, 4, a_regs=False)
    if role == "dq":
        return MmaTiles(64, 64, 4, a_regs=headdim <= 64)
    if role == "dkdv_atomic":
        # The fused dQ adds a BN x d float32 tile into global memory per tile pair: 128-key tiles halve
        # those additions per FLOP. H200, fp16, N=4096 backward (tools/tune.py, 2026-12-01): d=64
        # 64 x 128 keys, 8 warps 6.60 ms against 7.02 for 64 x 64, 4 warps; d=128 32 x 128, 8 warps
        # 6.95 against 7.14.
        if headdim <= 64:
            return MmaTiles(64, 128, 8, a_regs=True, min_blocks=1)
        if headdim <= 128:
            return MmaTiles(32, 128, 8, a_regs=False, min_blocks=1)
        role = "dkdv"
    # dK/dV hold two output accumulators (d/2 floats each per m16 tile): past d=64 the resident K, V stay
    # in shared memory and the query tiles shrink. H200, d=128, N=4096 backward: 32-query tiles 7.39 ms
    # (40 bytes of spills, ptxas sm_90) against 8.13 ms for 16-query tiles (none).
    return MmaTiles(64 if headdim <= 64 else 32, 64, 4, a_regs=headdim <= 64)


_ENV = {"fwd": ("NUMBA_FLASH_FWD_TILES",), "dkdv": ("NUMBA_FLASH_DKDV_TILES", "NUMBA_FLASH_BWD_TILES"),
        "dq": ("NUMBA_FLASH_DQ_TILES", "NUMBA_FLASH_BWD_TILES")}


def _wgmma_tiles(role, headdim, causal=False, sparse=False):
    # The warpgroup kernels (wgmma_tiles.py): one warpgroup per 64 rows of the resident tile (queries;
    # keys in dK/dV), every operand in shared memory. Forward: a thread holds Bc/2 score and d/2 output
    # floats. Backward: two score fragments of (streamed rows)/2 floats and d/2 (dQ) or d (dK and dV)
    # accumulator floats.
    if role == "fwd":
        # H200, fp16, N=4096 forward (tools/tune.py, 2026-12-02; benchmarks/results/
        # h200-2026-12-02-wgmma-ws-fp16.md), TFLOP/s non-causal / causal: d=128 two warpgroups with a block
        # barrier per tile 381 / 328, warp-specialised ring 2 472 / 399, ring 3 550 / 463, ring 2 with
        # the ping-pong 469 / 410; d=64 282 / 244, ring 2 374 / 288, ring 3 354 / 288, ring 2 with the
        # ping-pong 371 / 310. 2026-12-04, same tool: d=128 ring 3 494 / 458, ring 3 with the ping-pong
        # 565 / 477 (benchmarks/results/h200-2026-12-04-tuning-and-tests.md). Other head dims were not
        # measured warp-specialised. d=256 (ptxas 13.5, sm_90a, 2026-12-06): the kernel below 246
        # registers, warp-specialised 128 x 64 with a ring of 2 and TMA 168 at entry (197 KB of shared
        # memory), neither spilling; not timed yet.
        # Persistent (H100, same tool, 2026-12-06, N=4096, default / persistent): d=64 372 / 382, causal
        # 264 / 265, causal N=1024 174 / 200; d=128 514 / 530, causal 437 / 436. The benchmark in the same
        # lease (benchmarks/results/h100-2026-12-06-*): d=128 causal N = 1k, 2k, 4k, 16k 243, 299, 445, 526
        # against 252, 315, 437, 488 persistent: its blocks take work tiles round-robin from the longest,
        # so block 0 ends with ~6% more key tiles than block 131 at N=16k. Every other round reversed
        # ("snake") did not help (d=64 causal, 2026-12-06: 288.5 / 288.2 at N=4096, 246.3 / 251.0 at 2048)
        # and d=128 causal persistent with TMA ran 495 against 545 at N=16384: not persistent there. Since
        # causal work runs in L2 sections (walk.py; H100 2026-12-07, N=2048): d=128 causal 444.6 with one
        # block per tile against 437.9 persistent with the counter, so it stays so.
        # TMA producer (MmaTiles.tma), H100, same tool, cp.async / TMA: d=64 381 / 402, causal 270 / 290;
        # d=128 526 / 563, causal 462 / 484 (benchmarks/results/h100-2026-12-06b-tma-tests-tuning.md).
        # Not persistent on a block mask: its query tiles' work differs, and the fixed round-robin gives
        # block x the tiles x, x + G, ... (G = 132 on an H100, = 4 mod 32 and 64 query tiles), one residue
        # class mod 4 of every head's query tiles, so a mask the same in every head loads a quarter of
        # the blocks (H100, --sparse benchmark, 2026-12-06, random mask at 14% density, d=128 N=4096:
        # 0.63 ms persistent, more than at 26% density, benchmarks/results/h100-2026-12-06d-sparse-
        # persistent-fp16.md; 0.23 ms one block per tile, …-sparse-fp16.md, the hardware balancing them).
        if headdim == 128:
            return MmaTiles(128, 128, 8, a_regs=False, ring=3, pingpong=True,
                            persistent=not (causal or sparse), tma=True)
        if headdim == 64:
            return MmaTiles(128, 128, 8, a_regs=False, ring=2, pingpong=True, persistent=not sparse, tma=True)
        if headdim <= 128:
            return MmaTiles(128, 128, 8, a_regs=False)
        return MmaTiles(128, 64, 8, a_regs=False)
    # H200, fp16, N=4096 backward, synchronous products (tools/tune.py, 2026-12-02; mma.sync 199 / 195
    # TFLOP/s): d=64 dK/dV over 128 keys with 128-query tiles 244 (64-query 227, 32-query 190), dQ of 64
    # queries over 128 keys, one warpgroup 243 (128 x 64, two warpgroups 226); d=128 dK/dV 64 x 128 keys
    # 297 (32 x 128 267), dQ 128 x 128 307 (128 x 64 297, 64 x 64 288).
    # The streamed tiles by TMA (MmaTiles.tma; H100, same tool, 2026-12-06, both kernels cp.async / TMA):
    # d=64 316 / 333, d=128 337-349 / 376 (benchmarks/results/h100-2026-12-06d-bwd-tma-tests-tuning.md);
    # the head dims between were not measured.
    tma = headdim in (64, 128)
    if role == "dkdv":
        return MmaTiles(128 if headdim <= 64 else 64, 128, 8, a_regs=False, tma=tma)
    if headdim <= 64:
        return MmaTiles(64, 128, 4, a_regs=False, tma=tma)
    return MmaTiles(128, 128, 8, a_regs=False, tma=tma)


def _tf32_tiles(role, headdim):
    # The split-TF32 forward (tf32_tiles.py): K and V pre-split once into global images (MmaTiles.presplit:
    # 4x K's size of scratch during the call), copied by the synchronous body (the block's warps copy a
    # tile's four images while computing the one before; one barrier per tile). d <= 64: 128 x 64 tiles
    # (two warpgroups, 193 KB); d <= 128: 64 x 32 (one warpgroup, 193 KB). Before pre-splitting, each
    # block split every key tile itself: H100, fp32, N = 4096 (tools/tune.py, 2026-12-07), d = 64
    # TFLOP/s: warp-specialised 128 x 32 with a 2-stage ring 54.0, ring 4 60.1, the synchronous body
    # on 128 x 64 tiles 62.2 (SDPA memory-efficient 35.2; SIMT 34.0); d = 128: 31.3 (memory-efficient
    # 46.6). Pre-split, same H100, one lease (2026-12-07, benchmarks/results/h100-2026-12-07e-*): d = 64
    # this 76.2, warp-specialised 128 x 32 ring 4 on the images 74.6, the in-block split 128 x 64 60.5;
    # benchmark d = 64 76.3 (causal 67.2) against memory-efficient 35.2 (33.5), d = 128 43.8 (40.5)
    # against 46.0 (45.1).
    assert role == "fwd", role
    if headdim <= 64:
        return MmaTiles(128, 64, 8, a_regs=False, presplit=True)
    return MmaTiles(64, 32, 4, a_regs=False, presplit=True)


def _override_text(role):
    """The tile override in force for `role` (its environment variable's text), or None."""
    for var in _ENV[role]:
        v = os.environ.get(var)
        if v:
            return v
    return None


def _override(path, role):
    """Tile overrides for tuning runs only: NUMBA_FLASH_{FWD,DQ,DKDV,BWD}_TILES = "br,bc,ty,tx[,min_blocks]"
    (simt) or "br,bc,warps,a_regs[,min_blocks[,ring[,pingpong[,late_pv_wait[,persistent[,tma[,dynamic]]]]]]]"
    (mma, wgmma, tf32; then [,split_ahead[,presplit]] for tf32). None where no override is set."""
    text = _override_text(role)
    return None if text is None else _parse_override(path, text)


@lru_cache(maxsize=None)
def _parse_override(path, text):
    vals = [int(x) for x in text.split(",")]
    if path == "simt":
        return SimtTiles(*vals)
    # the fields in declaration order (MmaTiles.override writes them so), flags as bools
    if len(vals) > len(fields(MmaTiles)):       # (a value past the last field would be dropped silently)
        raise ValueError(f"tile override {text!r}: {len(vals)} values, MmaTiles has {len(fields(MmaTiles))} "
                         f"fields ({', '.join(f.name for f in fields(MmaTiles))})")
    return MmaTiles(*(bool(x) if f.type is bool else x for f, x in zip(fields(MmaTiles), vals)))


def tiles(path, role, headdim, block_k=None, causal=False, sparse=False):
    """Tiles of kernel `role` ("fwd", "dkdv", "dq", or "dkdv_atomic": the dK/dV kernel with the fused
    dQ). block_k: a block mask's key block size, which the key tiles must divide (None: dense). causal,
    sparse (a block mask): the forward's wgmma tiles differ (persistent or not). Kept per answer (every
    call asks, several times): the environment's override is read each time and is part of the key."""
    if SIMULATOR:
        sim = _SIM[path]
        return sim[role] if role in sim else sim["dkdv" if role == "dkdv_atomic" else role]
    return _tiles(path, role, headdim, block_k, bool(causal), bool(sparse),
                  _override_text("dkdv" if role == "dkdv_atomic" else role))


@lru_cache(maxsize=4096)
def _tiles(path, role, headdim, block_k, causal, sparse, override):
    t = None if override is None else _parse_override(path, override)
    if t is None:
        if path == "wgmma" and role == "dkdv_atomic":
            role = "dkdv"                            # the fused dQ runs on the dK/dV kernel's tiles
        t = (_wgmma_tiles(role, headdim, causal, sparse) if path == "wgmma"
             else {"simt": _simt_tiles, "mma": _mma_tiles, "tf32": _tf32_tiles}[path](role, headdim))
        if role == "dkdv_atomic" and block_k is not None and block_k % t.bc:
            t = _mma_tiles("dkdv", headdim)          # the mask's key blocks are narrower than 128
    return t


# Head dims whose forward "auto" puts on wgmma on a cc 9.0 GPU: where it measured faster than mma.sync
# (H200, fp16, N=4096, 2026-12-02: d=128 381 against 307 TFLOP/s, causal 328 against 267, and
# warp-specialised 550 / 463; d=64 warp-specialised with the ping-pong 371 / 310 against mma.sync's
# 291 / 261. Below 64 the mma.sync kernels stay: the wgmma kernel without warp specialisation measured
# 244 against 261 causal at d=64, and smaller head dims were not measured).
WGMMA_AUTO_HEADDIMS = range(64, 129)
# ... and whose backward (the measured d=64 and d=128, and the dims between): H200, fp16, N=4096 backward
# 2026-12-02, d=64 ~1.2x and d=128 ~1.5x the mma.sync kernels (docs/PERFORMANCE.md).
WGMMA_BWD_AUTO_HEADDIMS = range(64, 129)
PASSES = ("fwd", "bwd")


def backend_choice(backend):
    """(choice, source): `backend`, or NUMBA_FLASH_BACKEND where it is None ("auto" if unset), validated;
    source names where it came from, for error messages."""
    if backend is None:
        backend = os.environ.get(BACKEND_ENV, "auto").strip() or "auto"
        source = f"{BACKEND_ENV}={backend!r}"
    else:
        source = f"backend={backend!r}"
    if backend not in BACKENDS:
        raise ValueError(f"{source}: backend must be one of {BACKENDS}")
    return backend, source


def resolve_backend(backend, dtype_name, capability, headdim=None, pass_="fwd"):
    """The path for `backend` ("auto", "simt", "mma", "wgmma", "tf32"; None reads NUMBA_FLASH_BACKEND) and an input
    dtype on a device of compute `capability` ((major, minor); None under the simulator). headdim: the
    problem's, for "auto" on a cc 9.0 GPU (WGMMA_AUTO_HEADDIMS for the forward pass, pass_="fwd",
    WGMMA_BWD_AUTO_HEADDIMS for the backward, "bwd"); None: never wgmma by default."""
    assert pass_ in PASSES, pass_
    backend, source = backend_choice(backend)
    mma_ok = capability is None or capability >= (8, 0)
    sm90 = capability is not None and tuple(capability) == (9, 0)
    if backend == "auto":
        if dtype_name not in MMA_DTYPES or not mma_ok:
            return "simt"
        auto_dims = WGMMA_AUTO_HEADDIMS if pass_ == "fwd" else WGMMA_BWD_AUTO_HEADDIMS
        return "wgmma" if sm90 and headdim in auto_dims else "mma"
    if backend == "tf32":
        if dtype_name != "float32":
            raise ValueError(f"{source} is split TF32 for float32 inputs; the inputs are {dtype_name} (use "
                             f"backend='auto', 'mma' or 'wgmma' for float16/bfloat16)")
        if not (sm90 or capability is None):
            raise ValueError(f"{source} needs compute capability 9.0 (tf32 wgmma is an sm_90a instruction); "
                             f"this GPU has {capability[0]}.{capability[1]} (use backend='simt')")
        if headdim is not None and headdim > TF32_MAX_HEADDIM:
            raise ValueError(f"{source} takes head dims up to {TF32_MAX_HEADDIM}; headdim is {headdim} "
                             f"(use backend='simt')")
        return backend
    if backend in ("mma", "wgmma") and dtype_name not in MMA_DTYPES:
        raise ValueError(f"{source} computes in float16/bfloat16 on tensor cores; the inputs are "
                         f"{dtype_name} (use backend='simt' or 'auto')")
    if backend == "mma" and not mma_ok:
        raise ValueError(f"{source} needs compute capability >= 8.0 (mma.sync); this GPU has "
                         f"{capability[0]}.{capability[1]}")
    if backend == "wgmma" and not (sm90 or capability is None):
        raise ValueError(f"{source} needs compute capability 9.0 (wgmma is an sm_90a instruction); "
                         f"this GPU has {capability[0]}.{capability[1]} (use backend='mma')")
    return backend


# The largest head dim of the warpgroup backward: past it dK and dV (d/2 floats each per thread with 64
# keys per warpgroup) do not fit in registers, and the mma.sync backward runs instead.
WGMMA_BWD_MAX_HEADDIM = 128


def backward_path(path, headdim):
    """The path of the backward kernels for a `path` call (the same, but "mma" for a "wgmma" call whose
    head dim is past WGMMA_BWD_MAX_HEADDIM, and "simt" for a "tf32" call)."""
    if path == "tf32":
        return "simt"
    return "mma" if path == "wgmma" and headdim > WGMMA_BWD_MAX_HEADDIM else path


def forward_plan(path, headdim, dtype_name, causal, aligned, positive_scale=True, sparse=False):
    """The forward's plan; sparse: the call has a block mask."""
    return Plan(path, headdim, dtype_name, bool(causal), bool(aligned),
                fwd=tiles(path, "fwd", headdim, causal=causal, sparse=sparse), positive_scale=bool(positive_scale))


def dq_mode(path, deterministic):
    """How the backward on `path` computes dQ (module docstring; on wgmma backward_plan may still fall
    back to "kernel" where the tiles do not allow the fused dQ)."""
    if path not in ("mma", "wgmma"):
        return "kernel"
    mode = os.environ.get(DQ_MODE_ENV, "").strip()
    if mode:
        if mode not in DQ_MODES:
            raise ValueError(f"{DQ_MODE_ENV}={mode!r}: must be one of {DQ_MODES}")
        return mode
    return "kernel" if deterministic else "atomic"


def backward_plan(path, headdim, dtype_name, causal, aligned, deterministic=True, capability=None,
                  block_k=None):
    """capability: (major, minor) of the device, None under the simulator; block_k: a block mask's key
    block size (None: dense)."""
    path = backward_path(path, headdim)
    mode = dq_mode(path, deterministic)
    if mode == "bulk" and path != "wgmma":
        mode = "atomic"                              # bulk reductions: the warpgroup dQ's only
    if mode != "kernel" and path == "wgmma":
        from .wgmma_tiles import fused_dq_split
        if fused_dq_split(tiles(path, "dkdv_atomic", headdim, block_k), headdim) is None:
            mode = "kernel"
    if mode == "kernel":
        return Plan(path, headdim, dtype_name, bool(causal), bool(aligned), dkdv=tiles(path, "dkdv", headdim),
                    dq=tiles(path, "dq", headdim))
    return Plan(path, headdim, dtype_name, bool(causal), bool(aligned),
                dkdv=tiles(path, "dkdv_atomic", headdim, block_k), dq_mode=mode,
                vector_red=capability is None or tuple(capability) >= (9, 0))


def mask_tile(path, headdim):
    """The (Br, Bc) a block mask's block size must be a multiple of, for both passes of `path`."""
    ts = [tiles(path, "fwd", headdim)] + [tiles(backward_path(path, headdim), role, headdim) for role in ("dkdv", "dq")]
    return (math.lcm(*(t.br for t in ts)), math.lcm(*(t.bc for t in ts)))
