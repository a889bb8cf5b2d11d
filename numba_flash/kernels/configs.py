"""Tile sizes: the one place that decides how work is cut.

A kernel runs TY x TX threads. Each thread owns a TM x TN micro-tile of a score tile (TM = rows / TY,
TN = cols / TX) and a TM x DPT micro-tile of an output tile (DPT = padded head dim / TX), so its partial
dot products stay in registers and every value it reads from shared memory feeds TM or TN multiply-adds.
"""
import math
import os
from dataclasses import dataclass

from .intrinsics import SIMULATOR


@dataclass(frozen=True)
class TileConfig:
    br: int   # query rows per tile (Br)
    bc: int   # key rows per tile (Bc)
    ty: int   # thread rows
    tx: int   # thread columns (a power of two <= 32: a row's threads are consecutive lanes of one warp)
    min_blocks: int = 0   # blocks per SM to cap registers for (launch bounds); 0: as many as shared memory allows

    @property
    def threads(self):
        return self.ty * self.tx

    def padded_headdim(self, headdim):
        return -(-headdim // self.tx) * self.tx


# The simulator runs every thread as a Python thread: 16 threads on 16 x 16 tiles keep the tests quick
# and still give several tiles per sequence at the small lengths tests use.
_SIM = TileConfig(br=16, bc=16, ty=4, tx=4)

MAX_HEADDIM = 256
MIN_HEADDIM = 16


def _override(var):
    """NUMBA_FLASH_FWD_TILES / NUMBA_FLASH_BWD_TILES="br,bc,ty,tx[,min_blocks]": for tuning runs only."""
    v = os.environ.get(var)
    return TileConfig(*(int(x) for x in v.split(","))) if v else None


def forward_config(headdim, dtype_name):
    if SIMULATOR:
        return _SIM
    if _override("NUMBA_FLASH_FWD_TILES"):
        return _override("NUMBA_FLASH_FWD_TILES")
    # Measured on an H200 (tools/tune.py, fp32, N=4096, 2026-11-21): d=64: 128x64 tiles 33.9 TFLOP/s vs
    # 27.5 for 64x64 (8x4 micro-tiles: fewer shared loads per FMA); d=96/128: 64x64 with 8x16 threads,
    # P stored over K so two blocks fit per SM, 34.0 / 32.4; d=256 (N=2048): 20.1 vs 10.7 for 32x32.
    if headdim <= 64:
        return TileConfig(br=128, bc=64, ty=16, tx=16)
    return TileConfig(br=64, bc=64, ty=8, tx=16)


def backward_config(headdim, dtype_name):
    """Shared by the dQ and the dK/dV kernels: both must cut the sequence into the same tiles."""
    if SIMULATOR:
        return _SIM
    if _override("NUMBA_FLASH_BWD_TILES"):
        return _override("NUMBA_FLASH_BWD_TILES")
    # Measured as above: d=64: 64x64 / 16x16 threads 21.3 TFLOP/s (best of 5); d=128: 32x64 / 8x16 19.4;
    # d > 128: 32x32 / 16x16 (7.0 TFLOP/s at d=256, N=2048); 32x64 / 8x16 ran 7.6 but holds 256
    # accumulator registers per thread for dK, dV and spills.
    if headdim <= 64:
        return TileConfig(br=64, bc=64, ty=16, tx=16)
    if headdim <= 128:
        return TileConfig(br=32, bc=64, ty=8, tx=16)
    return TileConfig(br=32, bc=32, ty=16, tx=16)


def mask_tile(headdim, dtype_name):
    """The (Br, Bc) a block mask's block size must be a multiple of, for both passes."""
    f, b = forward_config(headdim, dtype_name), backward_config(headdim, dtype_name)
    return (math.lcm(f.br, b.br), math.lcm(f.bc, b.bc))
