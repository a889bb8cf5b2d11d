"""Tensor maps for TMA copies (hopper.tma_load_4d): encoded on the host, kept in global memory.

A tensor map describes a tensor in global memory (address, dims, byte strides), the box one copy moves and
the shared-memory swizzle it lands in. On a GPU the CUDA driver encodes it (`cuTensorMapEncodeTiled`,
called through ctypes: an opaque 128-byte object); the driver refuses what TMA cannot express (an address
or a stride that is not a multiple of 16 bytes, a dim past 2^32, ...) and the caller then falls back to
ordinary copies (never copying the tensor silently). Under the simulator the map is this module's own
encoding, which hopper.tma_load_4d's simulator implementation decodes (hopper.SIM_TMAP_MAGIC).

Numba cannot pass a kernel parameter as `__grid_constant__`, so the maps go to the kernel as a flat uint64
array in global memory, one row of hopper.TMAP_WORDS words each (`device_maps`). Encoding and copying them
there cost host time; `device_maps` keeps the last CACHE_SIZE map sets per device (keyed by everything a
map encodes: the same tensors give the same maps), so repeated calls on the same buffers reuse them.

A (B, N, H, d) tensor (head dim contiguous, element strides st = (batch, row, head)) is described as the
4-D tensor (d, H, N, B) with byte strides (st[2], st[1], st[0]) * itemsize, and a tile of `rows` rows and
`cols` elements of one head as the box (cols, 1, rows, 1): its rows land one after another, `cols`
elements each, which with cols * itemsize = the swizzle's span is one column block of the swizzled
K-major image wgmma reads (wgmma_tiles.py).
"""
import ctypes
import threading
from collections import OrderedDict

import numpy as np

from . import hopper
from .launch import SIMULATOR

CACHE_SIZE = 256
_DT_UINT16 = 1                       # CU_TENSOR_MAP_DATA_TYPE_UINT16: the copy moves bits only
_SWIZZLE = {0: 0, 32: 1, 64: 2, 128: 3}   # CU_TENSOR_MAP_SWIZZLE_NONE, _32B, _64B, _128B
_L2_256B = 3                         # CU_TENSOR_MAP_L2_PROMOTION_L2_256B
_encode_fn = None
_lock = threading.Lock()
_cache = OrderedDict()


def _driver_encode():
    """The driver's cuTensorMapEncodeTiled through ctypes, or None where it cannot be loaded."""
    global _encode_fn
    if _encode_fn is None:
        from .driverlaunch import libcuda
        lib = libcuda()
        fn = getattr(lib, "cuTensorMapEncodeTiled", None) if lib else None
        if fn is not None:
            u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p,
                           u32p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
            fn.restype = ctypes.c_int
        _encode_fn = fn or False
    return _encode_fn or None


def encode(ptr, itemsize, dims, strides, box, swizzle):
    """One tensor map (numpy uint64 array of hopper.TMAP_WORDS words) of the 4-D tensor at address `ptr`
    with element size `itemsize` (2), dims (d0..d3, d0 contiguous), byte strides of d1..d3, box (b0..b3)
    and swizzle bytes (0, 32, 64, 128); None where TMA cannot express it (the driver refuses, or none is
    loaded)."""
    assert itemsize == 2 and len(dims) == 4 and len(strides) == 3 and len(box) == 4, (itemsize, dims, strides, box)
    if SIMULATOR:
        if ptr % 16 or any(s % 16 for s in strides) or (box[0] * itemsize) % 16 or \
                (swizzle and box[0] * itemsize > swizzle) or not all(0 < b <= 256 for b in box):
            return None
        return np.array([hopper.SIM_TMAP_MAGIC, ptr, itemsize, swizzle, *dims, *strides, *box, 0], np.uint64)
    fn = _driver_encode()
    if fn is None:
        return None
    out = np.zeros(hopper.TMAP_WORDS + 8, np.uint64)      # room to align the map to 64 bytes
    start = (-out.ctypes.data % 64) // 8
    view = out[start:start + hopper.TMAP_WORDS]
    rc = fn(view.ctypes.data, _DT_UINT16, 4, ptr, (ctypes.c_uint64 * 4)(*dims),
            (ctypes.c_uint64 * 3)(*strides), (ctypes.c_uint32 * 4)(*box), (ctypes.c_uint32 * 4)(1, 1, 1, 1), 0,
            _SWIZZLE[swizzle], _L2_256B, 0)
    return view.copy() if rc == 0 else None


def head_tile_spec(view, rows, cols, swizzle):
    """What the map of `view` (an interop.View of (B, N, H, d), 16-bit) with a box of `cols` elements of
    `rows` rows of one head encodes (module docstring), as encode's arguments after the item size: (ptr,
    dims, strides, box, swizzle); None where the head dim is not contiguous."""
    B, N, H, d = view.shape
    st = view.strides
    if st[3] != 1:
        return None
    return view.ptr, (d, H, N, B), (2 * st[2], 2 * st[1], 2 * st[0]), (cols, 1, rows, 1), swizzle


_MISS = object()


def device_maps(specs, device):
    """The maps of `specs` (head_tile_spec's) as one flat uint64 array where the kernels run (rows of
    hopper.TMAP_WORDS words), or None where one cannot be made. The last CACHE_SIZE answers per device are
    kept, keyed by the specs: a call on the same buffers encodes and copies nothing (encoding three maps
    through ctypes took ~0.1 ms of host time per call, which made short forwards host-bound). Evicted
    arrays are freed by Numba's deferred deallocation."""
    key = (device, tuple(specs))
    with _lock:
        hit = _cache.get(key, _MISS)
        if hit is not _MISS:
            _cache.move_to_end(key)
            return hit
    maps = [None if sp is None else encode(sp[0], 2, *sp[1:]) for sp in specs]
    arr = _upload(np.concatenate(maps), device) if all(m is not None for m in maps) else None
    with _lock:
        _cache[key] = arr
        if len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return arr


def _upload(host, device):
    """The uint64 words `host` where the kernels run, as the kernels take a flat array (a DeviceBuffer on a
    GPU, which keeps the allocation alive)."""
    from .. import interop
    arr = interop.to_device_like(host, "numba", device)
    if SIMULATOR:
        return arr
    from .driverlaunch import DeviceBuffer
    return DeviceBuffer(arr.__cuda_array_interface__["data"][0], host.size, np.uint64, arr)


def placeholder(device):
    """A map array of one zero map: the argument of kernels that copy without TMA (never read)."""
    key = (device, "placeholder")
    with _lock:
        hit = _cache.get(key)
    if hit is None:
        hit = _upload(np.zeros(hopper.TMAP_WORDS, np.uint64), device)
        with _lock:
            _cache[key] = hit
    return hit
