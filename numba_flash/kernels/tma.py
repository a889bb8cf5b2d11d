"""Tensor maps for TMA copies (hopper.tma_load_4d): encoded on the host, kept in global memory.

A tensor map describes a tensor in global memory (address, dims, byte strides), the box one copy moves and
the shared-memory swizzle it lands in. On a GPU the CUDA driver encodes it (`cuTensorMapEncodeTiled`,
called through ctypes: an opaque 128-byte object); the driver refuses what TMA cannot express (an address
or a stride that is not a multiple of 16 bytes, a dim past 2^32, ...) and the caller then falls back to
ordinary copies (never copying the tensor silently). Under the simulator the map is this module's own
encoding, which hopper.tma_load_4d's simulator implementation decodes (hopper.SIM_TMAP_MAGIC).

Numba cannot pass a kernel parameter as `__grid_constant__`, so the maps go to the kernel as a flat uint64
array in global memory, one row of hopper.TMAP_WORDS words each (`device_maps`). They live in a fixed ring
of slots per device (`MapSlots`): a new set of maps is encoded into pinned host memory and copied into its
slot on the launch's stream, asynchronously, so a call never waits for the GPU. (The first version copied
each new set with a synchronous `cuda.to_device`: a training step, whose activations move between calls,
made ~20 such copies per step, each draining the GPU's queue, and GPT-2 small trained at 0.69-0.74x SDPA
FlashAttention-2 on an H100 while the same attention alone ran faster than it.) `device_maps` keeps the
last answers per device keyed by everything a map encodes (the same tensors give the same maps), so
repeated calls on the same buffers encode and copy nothing.

A (B, N, H, d) tensor (head dim contiguous, element strides st = (batch, row, head)) is described as the
4-D tensor (d, H, N, B) with byte strides (st[2], st[1], st[0]) * itemsize, and a tile of `rows` rows and
`cols` elements of one head as the box (cols, 1, rows, 1): its rows land one after another, `cols`
elements each, which with cols * itemsize = the swizzle's span is one column block of the swizzled
K-major image wgmma reads (wgmma_tiles.py).
"""
import ctypes
import sys
import threading

import numpy as np

from . import hopper
from .launch import SIMULATOR, stream_handle

CACHE_SIZE = 512                     # map slots per device (MapSlots): 512 x 384 bytes
SLOT_MAPS = 3                        # the most maps one kernel takes (the forward's Q, K, V)
CAPTURE_SLOTS = 64                   # map sets CUDA graphs may capture per device (MapSlots.captured)
_DT_UINT16 = 1                       # CU_TENSOR_MAP_DATA_TYPE_UINT16: the copy moves bits only
_SWIZZLE = {0: 0, 32: 1, 64: 2, 128: 3}   # CU_TENSOR_MAP_SWIZZLE_NONE, _32B, _64B, _128B
_L2_256B = 3                         # CU_TENSOR_MAP_L2_PROMOTION_L2_256B
_encode_fn = None
_lock = threading.Lock()
_cache = {}


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


class CudaDriver:
    """The driver calls MapSlots makes, through ctypes (the caller makes the device's context current)."""

    def __init__(self, lib):
        vp, sz, ui = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint
        self.lib = lib
        for name, args in (("cuMemAlloc_v2", [ctypes.POINTER(ctypes.c_uint64), sz]),
                           ("cuMemAllocHost_v2", [ctypes.POINTER(vp), sz]),
                           ("cuMemcpyHtoDAsync_v2", [ctypes.c_uint64, vp, sz, vp]),
                           ("cuEventCreate", [ctypes.POINTER(vp), ui]),
                           ("cuEventRecord", [vp, vp]),
                           ("cuEventSynchronize", [vp]),
                           ("cuStreamWaitEvent", [vp, vp, ui]),
                           ("cuMemsetD32Async", [ctypes.c_uint64, ui, sz, vp])):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int

    def _call(self, name, *args):
        from .driverlaunch import _check
        _check(getattr(self.lib, name)(*args), name)

    def device_alloc(self, nbytes):
        ptr = ctypes.c_uint64()
        self._call("cuMemAlloc_v2", ctypes.byref(ptr), nbytes)
        return ptr.value

    def host_alloc(self, nbytes):
        """Pinned host memory (an asynchronous copy reads it when it runs, not when it is enqueued)."""
        ptr = ctypes.c_void_p()
        self._call("cuMemAllocHost_v2", ctypes.byref(ptr), nbytes)
        return np.ctypeslib.as_array((ctypes.c_uint64 * (nbytes // 8)).from_address(ptr.value))

    def event(self):
        ev = ctypes.c_void_p()
        self._call("cuEventCreate", ctypes.byref(ev), 2)       # CU_EVENT_DISABLE_TIMING
        return ev.value

    def copy_async(self, dst, host_view, stream):
        self._call("cuMemcpyHtoDAsync_v2", dst, host_view.ctypes.data, host_view.nbytes, stream or None)

    def record(self, event, stream):
        self._call("cuEventRecord", event, stream or None)

    def wait_host(self, event):
        self._call("cuEventSynchronize", event)

    def stream_wait(self, stream, event):
        self._call("cuStreamWaitEvent", stream or None, event, 0)

    def memset32_async(self, ptr, value, count, stream):
        self._call("cuMemsetD32Async", ptr, value, count, stream or None)


class MapSlots:
    """A device's ring of `n` slots of SLOT_MAPS tensor maps: device memory the kernels read, pinned host
    memory each slot is staged in, and what keeps the asynchronous copies and the kernels apart.

    `put(key, words, stream)` takes the next slot of the ring (`owner` becomes `key`: the previous owner's
    answer stops being valid), writes the words into its host half and copies them into its device half
    on `stream`;
    `use(slot, stream)` is a later launch on `stream` reading it. The hazards, none of which blocks the
    host in the usual case of one stream:
    - the host half is rewritten only after its previous copy has run (that copy's event; a ring of n
      slots comes back to a slot n new map sets later, long after its copy);
    - a slot's device half is rewritten only after the kernels that read it: those on the copy's own
      stream by stream order, those on other streams through an event recorded there and waited on by
      the copy's stream;
    - a launch on another stream than the copy's waits for the copy (its event).
    A launch captured into a CUDA graph replays later, after the ring has moved on, so it gets none of the
    ring's slots: `captured(key, words, stream)` gives each map set seen in a capture a slot of its own
    (CAPTURE_SLOTS of them, made with the ring, never rewritten with other maps) and adds its copy to the
    graph, so each replay writes the maps before its kernels read them.
    `drv` is CudaDriver (a GPU) or a stand-in with its methods (the tests of this logic)."""

    SLOT_WORDS = SLOT_MAPS * hopper.TMAP_WORDS         # 384 bytes: every slot stays 64-byte aligned

    def __init__(self, drv, n):
        self.drv, self.n = drv, n
        self.base = drv.device_alloc(n * self.SLOT_WORDS * 8)
        self.host = drv.host_alloc(n * self.SLOT_WORDS * 8)
        self.copied = [drv.event() for _ in range(n)]     # recorded after each slot's copy
        self.cross = drv.event()                          # stream -> stream waits, re-recorded each time
        self.owner = [None] * n
        self.writer = [None] * n                          # the stream of each slot's last copy
        self.readers = [set() for _ in range(n)]          # streams that read it since that copy
        self.next = 0
        nc = CAPTURE_SLOTS * self.SLOT_WORDS
        self.capture_base = drv.device_alloc(nc * 8)       # allocation is not allowed while capturing
        self.capture_host = drv.host_alloc(nc * 8)
        self.captured_slots = {}                          # map-set key -> its slot (index)

    def put(self, key, words, stream):
        """(slot, DeviceBuffer of `words`) with `words` copied there on `stream` (in stream order)."""
        from .driverlaunch import DeviceBuffer
        assert words.dtype == np.uint64 and words.size <= self.SLOT_WORDS, words.shape
        s = self.next
        self.next = (s + 1) % self.n
        if self.writer[s] is not None:
            self.drv.wait_host(self.copied[s])
            for r in self.readers[s]:                     # the writer's stream is one of them
                if r != stream:
                    self.drv.record(self.cross, r)
                    self.drv.stream_wait(stream, self.cross)
        lo = s * self.SLOT_WORDS
        view = self.host[lo:lo + words.size]
        view[:] = words
        dst = self.base + 8 * lo
        self.drv.copy_async(dst, view, stream)
        self.drv.record(self.copied[s], stream)
        self.owner[s], self.writer[s], self.readers[s] = key, stream, {stream}
        return s, DeviceBuffer(dst, words.size, np.uint64, self)

    def use(self, slot, stream):
        """A launch on `stream` will read `slot`: order it after the slot's copy."""
        if stream not in self.readers[slot]:
            if stream != self.writer[slot]:
                self.drv.stream_wait(stream, self.copied[slot])
            self.readers[slot].add(stream)

    def captured(self, key, words, stream):
        """A DeviceBuffer of `words` for a launch being captured on `stream` (class docstring)."""
        from .driverlaunch import DeviceBuffer
        s = self.captured_slots.get(key)
        if s is None:
            s = len(self.captured_slots)
            if s == CAPTURE_SLOTS:
                raise RuntimeError(f"numba_flash: CUDA graphs on this device have captured {CAPTURE_SLOTS} "
                                   f"different sets of tensor maps (tensors TMA copies from), the most it "
                                   f"keeps; raise numba_flash.kernels.tma.CAPTURE_SLOTS before the first call")
            self.captured_slots[key] = s
            lo = s * self.SLOT_WORDS
            self.capture_host[lo:lo + words.size] = words
        lo = s * self.SLOT_WORDS
        dst = self.capture_base + 8 * lo
        self.drv.copy_async(dst, self.capture_host[lo:lo + words.size], stream)
        return DeviceBuffer(dst, words.size, np.uint64, self)


_slots = {}
_driver = None


def _cuda_driver():
    global _driver
    if _driver is None:
        from .driverlaunch import libcuda
        lib = libcuda()
        _driver = CudaDriver(lib) if lib is not None else False
    return _driver or None


def _device_slots(device):
    """The device's MapSlots (made on first use; its context is current), or None without a driver."""
    slots = _slots.get(device)
    if slots is None:
        drv = _cuda_driver()
        if drv is None:
            return None
        slots = _slots[device] = MapSlots(drv, CACHE_SIZE)
    return slots


def device_maps(specs, device, stream=0):
    """The maps of `specs` (head_tile_spec's) as one flat uint64 array where the kernels run (rows of
    hopper.TMAP_WORDS words), for a launch on `stream`; None where one cannot be made. Answers are kept
    per device, keyed by the specs, until their slot comes round again (MapSlots): a call on the same
    buffers encodes and copies nothing (encoding three maps through ctypes took ~0.1 ms of host time per
    call, which made short forwards host-bound)."""
    key = (device, tuple(specs))
    stream = stream_handle(stream)
    if not SIMULATOR and _capturing():
        return _captured_maps(key, specs, device, stream)
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            slots, slot, arr = hit
            if slots is None:
                return arr                      # the simulator's, or None: TMA cannot express the specs
            if slots.owner[slot] == key:
                slots.use(slot, stream)
                return arr
    words = _encode_all(specs)
    with _lock:
        if words is None or SIMULATOR:
            entry = (None, None, None if words is None else _upload(words, device))
        else:
            slots = _device_slots(device)
            if slots is None:
                return None
            slot, arr = slots.put(key, words, stream)
            entry = (slots, slot, arr)
        _cache[key] = entry
        if len(_cache) > 2 * CACHE_SIZE:        # stale answers (their slots reused) and refusals
            for k in [k for k, (sl, i, _) in _cache.items() if sl is None or sl.owner[i] != k]:
                del _cache[k]
        return entry[2]


_torch_cuda = None


def _capturing():
    """Whether torch is capturing its current stream (a torch call's launch stream) into a CUDA graph.
    Graphs captured through CuPy or Numba are not detected: their launches would use the ring."""
    global _torch_cuda
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    if _torch_cuda is None:
        _torch_cuda = bool(torch.cuda.is_available())       # a CPU-only torch has no capture to ask about
    return _torch_cuda and torch.cuda.is_current_stream_capturing()


def _captured_maps(key, specs, device, stream):
    """device_maps for a launch being captured into a CUDA graph (MapSlots.captured)."""
    with _lock:
        slots = _slots.get(device)
    if slots is None:
        raise RuntimeError("numba_flash: run a call once on this device before capturing one in a CUDA graph "
                           "(the first call allocates the tensor maps' memory, which a capture does not allow)")
    words = _encode_all(specs)
    if words is None:
        return None
    with _lock:
        return slots.captured(key, words, stream)


def _encode_all(specs):
    """The maps of `specs` one after another (uint64 words), or None where one cannot be made."""
    maps = [None if sp is None else encode(sp[0], 2, *sp[1:]) for sp in specs]
    return np.concatenate(maps) if all(m is not None for m in maps) else None


def _upload(host, device):
    """The uint64 words `host` where the kernels run, as the kernels take a flat array (a DeviceBuffer on a
    GPU, which keeps the allocation alive). Synchronous: for the simulator and the placeholder only."""
    from .. import interop
    arr = interop.to_device_like(host, "numba", device)
    if SIMULATOR:
        return arr
    from .driverlaunch import DeviceBuffer
    return DeviceBuffer(arr.__cuda_array_interface__["data"][0], host.size, np.uint64, arr)


_placeholders = {}


def zero_int32(ptr, count, stream):
    """Zero `count` int32 at device address `ptr`, in order on `stream` (cuMemsetD32Async; the device's
    context current)."""
    drv = _cuda_driver()
    if drv is None:
        raise RuntimeError("zero_int32: the CUDA driver library could not be loaded")
    drv.memset32_async(ptr, 0, count, stream_handle(stream))


def placeholder(device):
    """A map array of one zero map: the argument of kernels that copy without TMA (never read)."""
    with _lock:
        hit = _placeholders.get(device)
        if hit is None:
            hit = _placeholders[device] = _upload(np.zeros(hopper.TMAP_WORDS, np.uint64), device)
    return hit
