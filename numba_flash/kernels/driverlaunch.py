"""Launching a compiled kernel straight through the CUDA driver: a few microseconds instead of Numba's
hundreds.

Why: Numba's dispatcher prepares every argument in Python on every launch (a typing pass, an isinstance
chain per argument, a cuda.core memory view per device array), and the arrays it takes have to be built
first (`cuda.from_cuda_array_interface`, a context lookup each). Measured on an H200 (2026-12-02): 144 us
for an empty 20-argument kernel, 0.88 ms of host time per forward call and 5 ms per forward+backward:
slower than the GPU work below N ~ 2k, so every short call was host-bound.

What: the kernels take flat 1-D arrays, integers, floats, bools and tuples of those, and Numba passes
them to the kernel as a fixed list of parameters (its data model): a 1-D array is seven 64-bit values
(meminfo, parent, nitems, itemsize, data, shape[0], strides[0] in bytes), a tuple its elements in order, an
int64 / float64 / float32 / int32 / bool its own value. `ArgPacker` turns an argument list into that
parameter list and its Numba signature; `DriverKernel` compiles the signature once (Numba does the
compiling and caching), takes the CUfunction for the current context, and launches it with
`cuLaunchKernel` called through ctypes, each parameter in its own 8-byte slot of one packed buffer.

The arrays are `DeviceBuffer`s: an address, an element count and a dtype (and the object that owns the
memory, which the caller keeps alive until the launch is enqueued, as with any stream-ordered launch).
"""
from __future__ import annotations

import ctypes
import struct
import threading

import numpy as np


class DeviceBuffer:
    """A flat device allocation as the kernels take it (a 1-D C-contiguous array of `size` elements)."""

    __slots__ = ("ptr", "size", "dtype", "owner", "itemsize", "char")

    def __init__(self, ptr, size, dtype, owner=None):
        self.ptr = int(ptr)
        self.size = int(size)
        self.dtype = dt = np.dtype(dtype)
        self.owner = owner
        self.itemsize, self.char = dt.itemsize, dt.char      # what every launch packs (ArgPacker.flatten)

    @property
    def __cuda_array_interface__(self):
        # so Numba's own dispatcher (the fallback below), CuPy or torch can take it too
        return {"shape": (self.size,), "strides": None, "typestr": self.dtype.str, "data": (self.ptr, False),
                "version": 3}

    def __repr__(self):
        return f"DeviceBuffer(0x{self.ptr:x}, {self.size}, {self.dtype})"


# Each scalar's slot: struct code padded to 8 bytes, and the Numba type it is typed as (numba.typeof's
# choices for these Python / numpy types).
_SCALARS = {
    bool: ("B7x", "boolean"), np.bool_: ("B7x", "boolean"),
    int: ("q", "int64"), np.int64: ("q", "int64"), np.int32: ("i4x", "int32"),
    float: ("d", "float64"), np.float64: ("d", "float64"), np.float32: ("f4x", "float32"),
}
_INT64_MIN, _INT64_MAX = -2**63, 2**63 - 1
_ARRAY_SLOTS = "QQqqQqq"   # meminfo, parent, nitems, itemsize, data, shape[0], strides[0] (bytes)


class ArgPacker:
    """The kernel parameters of one argument list: `flatten(args)` -> (key, values); `signature(args)`."""

    @staticmethod
    def flatten(args, values=None, key=None):
        """Parameter values in Numba's order, and a key that is equal for argument lists of one signature.
        (Every launch runs this: the common cases are tested first and the lists' methods bound once.)"""
        values = [] if values is None else values
        key = [] if key is None else key
        put, put_all, mark = values.append, values.extend, key.append
        for a in args:
            t = type(a)
            if t is int:
                if not _INT64_MIN <= a <= _INT64_MAX:
                    raise OverflowError(f"kernel argument {a} does not fit in int64")
                put(a)
                mark(int)
            elif t is DeviceBuffer:
                n, item = a.size, a.itemsize
                put_all((0, 0, n, item, a.ptr, n, item))
                mark(a.char)
            elif t is tuple:
                mark("(")
                for b in a:
                    if type(b) is int and _INT64_MIN <= b <= _INT64_MAX:
                        put(b)
                        mark(int)
                    else:
                        ArgPacker.flatten((b,), values, key)
                mark(")")
            elif t in _SCALARS:
                put(a)
                mark(t)
            else:
                raise TypeError(f"no direct launch for a kernel argument of type {t.__name__}")
        return key, values

    @staticmethod
    def struct_format(args):
        parts = []
        for a in args:
            t = type(a)
            if t is DeviceBuffer:
                parts.append(_ARRAY_SLOTS)
            elif t is tuple:
                parts.append(ArgPacker.struct_format(a))
            else:
                parts.append(_SCALARS[t][0])
        return "".join(parts)

    @staticmethod
    def signature(args):
        """The Numba signature numba.typeof would give these arguments (arrays: 1-D, C-contiguous)."""
        from numba import types
        from numba.np.numpy_support import from_dtype

        def one(a):
            t = type(a)
            if t is DeviceBuffer:
                return types.Array(from_dtype(a.dtype), 1, "C")
            if t is tuple:
                return types.BaseTuple.from_types([one(x) for x in a])
            return getattr(types, _SCALARS[t][1])
        return tuple(one(a) for a in args)


# --------------------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------------------

_lib = None
_lib_lock = threading.Lock()


def libcuda():
    """ctypes handle on the driver library (None if it cannot be loaded: launches then go through Numba)."""
    global _lib
    if _lib is None:
        with _lib_lock:
            if _lib is None:
                lib = False
                for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
                    try:
                        lib = ctypes.CDLL(name)
                        break
                    except OSError:
                        continue
                if lib:
                    vp, ui = ctypes.c_void_p, ctypes.c_uint
                    lib.cuLaunchKernel.argtypes = [vp, ui, ui, ui, ui, ui, ui, ui, vp, vp, vp]
                    lib.cuLaunchKernel.restype = ctypes.c_int
                    lib.cuCtxGetCurrent.argtypes = [ctypes.POINTER(vp)]
                    lib.cuCtxGetCurrent.restype = ctypes.c_int
                    lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
                    lib.cuGetErrorName.restype = ctypes.c_int
                _lib = lib
    return _lib or None


def current_context():
    """The calling thread's current CUDA context handle (an int; 0 if none)."""
    ctx = ctypes.c_void_p()
    _check(libcuda().cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
    return ctx.value or 0


def _check(rc, what):
    if rc != 0:
        name = ctypes.c_char_p()
        libcuda().cuGetErrorName(rc, ctypes.byref(name))
        raise RuntimeError(f"{what} failed: {(name.value or b'?').decode()} ({rc})")


class DriverKernel:
    """One compiled overload, launchable in one context: `launch(grid, block, smem, stream, values)`."""

    def __init__(self, function_handle, fmt):
        self.function = int(function_handle)
        self.struct = struct.Struct("<" + fmt)      # every slot is 8 bytes: no alignment padding needed
        self.nparams = self.struct.size // 8
        self._local = threading.local()             # one parameter buffer per host thread

    def _buffers(self):
        bufs = getattr(self._local, "bufs", None)
        if bufs is None:
            raw = ctypes.create_string_buffer(8 * self.nparams)
            base = ctypes.addressof(raw)
            params = (ctypes.c_void_p * self.nparams)(*(base + 8 * i for i in range(self.nparams)))
            bufs = self._local.bufs = (raw, params)
        return bufs

    def launch(self, grid, block, smem, stream, values):
        raw, params = self._buffers()
        self.struct.pack_into(raw, 0, *values)
        gx, gy, gz = (tuple(grid) + (1, 1))[:3]
        _check(libcuda().cuLaunchKernel(self.function, gx, gy, gz, block, 1, 1, smem, stream or None, params,
                                        None), "cuLaunchKernel")
