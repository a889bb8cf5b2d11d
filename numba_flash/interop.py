"""The one place that converts arrays: torch tensors, CuPy arrays, Numba device arrays, numpy (simulator).

Kernels see every tensor as a flat 1-D array over the tensor's memory plus element strides, so any view
whose last dim is contiguous (a slice of a packed QKV tensor, a (B, H, N, d) transpose) runs without a copy,
and index arithmetic is 64-bit. A `View` carries that flat array and the logical shape and strides.

On a GPU the flat array is a `DeviceBuffer` (address, element count, dtype) made from the tensor's data
pointer, zero-copy, with no Numba device array in between (kernels/driverlaunch.py: those cost tens of
microseconds each); bfloat16 goes as its raw 16 bits (uint16). Kernels launch on the framework's current
stream, with no host synchronisation. Under the CUDA simulator the arrays are host memory: numpy arrays
and CPU torch tensors are wrapped as numpy views.
"""
from dataclasses import dataclass

import numpy as np
from numba import cuda

from .kernels.driverlaunch import DeviceBuffer
from .kernels.launch import SIMULATOR

_TYPESTR = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "float64": "<f8", "int32": "<i4"}


@dataclass(frozen=True)
class View:
    flat: object          # 1-D array the kernels index: a DeviceBuffer (simulator: a FakeCUDAArray)
    shape: tuple
    strides: tuple        # in elements
    dtype: str            # "float32", "float16", "bfloat16", "float64", "int32", ...
    framework: str        # "torch", "cupy", "numba", "numpy"
    device: object        # CUDA device ordinal, or "cpu"
    ptr: int = 0          # address of element 0, for alignment checks

    def aligned(self, nelem):
        """True if element 0 and every row/head/batch start are `nelem`-element (nelem*itemsize) aligned."""
        item = 2 if self.dtype in ("float16", "bfloat16") else np.dtype(self.dtype).itemsize
        return self.ptr % (nelem * item) == 0 and all(st % nelem == 0 for st in self.strides[:-1])


_FRAMEWORK_OF_TYPE = {}     # type -> "torch" / "cupy" / "numpy" (decided by the type alone)


def framework_of(x):
    t = type(x)
    fw = _FRAMEWORK_OF_TYPE.get(t)
    if fw is not None:
        return fw
    mod = t.__module__
    if mod.startswith("torch"):
        fw = "torch"
    elif mod.startswith("cupy"):
        fw = "cupy"
    elif isinstance(x, np.ndarray):
        fw = "numpy"
    if fw is not None:
        _FRAMEWORK_OF_TYPE[t] = fw
        return fw
    if _is_numba_device_array(x):      # per object: any class with __cuda_array_interface__ qualifies
        return "numba"
    return None


def _is_numba_device_array(x):
    if SIMULATOR:  # the simulator has no is_cuda_array; its device arrays are FakeCUDAArray
        return type(x).__name__ == "FakeCUDAArray"
    return cuda.is_cuda_array(x)


def _kernel_host_array(a):
    """Under the simulator, hand kernels host memory as a simulator device array: a plain numpy argument
    would be copied in and back out around the launch, and copies of overlapping views (packed dq/dk/dv)
    or of read-only arrays (mask lists) then clobber each other or fail."""
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
    return FakeCUDAArray(a)


_TORCH_NAMES = {}


def _torch_dtype_name(t):
    dt = t.dtype
    name = _TORCH_NAMES.get(dt)
    if name is None:
        name = _TORCH_NAMES[dt] = str(dt).replace("torch.", "")    # "float16", "bfloat16", "int32", ...
    return name


def describe(x, name):
    """(framework, shape, strides in elements, dtype name, device) of an array, without touching its data."""
    fw = framework_of(x)
    if fw is None:
        raise TypeError(f"{name} must be a torch tensor, CuPy array, Numba device array or (under the "
                        f"simulator) numpy array, got {type(x).__name__}")
    if fw == "torch":
        dev = x.device.index if x.is_cuda else "cpu"
        if x.is_cuda and dev is None:
            dev = 0
        return fw, tuple(x.shape), tuple(x.stride()), _torch_dtype_name(x), dev
    if fw == "cupy":
        item = x.dtype.itemsize
        return fw, tuple(x.shape), tuple(s // item for s in x.strides), str(x.dtype), x.device.id
    if fw == "numpy":
        item = x.dtype.itemsize
        return fw, x.shape, tuple(s // item for s in x.strides), str(x.dtype), "cpu"
    item = x.dtype.itemsize
    dev = _numba_device_of(x)
    return fw, tuple(x.shape), tuple(s // item for s in x.strides), str(x.dtype), dev


def _numba_device_of(x):
    # A Numba device array belongs to the context that was current when it was made.
    return "cpu" if SIMULATOR else cuda.get_current_device().id


def _span(shape, strides):
    """Elements from the first to one past the last element the view touches (strides >= 0)."""
    span = 1
    for n, st in zip(shape, strides):
        if n == 0:
            return 0
        span += (n - 1) * st
    return span


def flat_view(x, name, desc=None):
    """The View of array `x` (`desc`: its `describe(x, name)`, where the caller has it already)."""
    fw, shape, strides, dtype, dev = describe(x, name) if desc is None else desc
    if min(strides, default=0) < 0:
        raise ValueError(f"{name} has negative strides {strides}; make it contiguous first")
    span = _span(shape, strides)
    if dev == "cpu":
        if fw == "numba":  # the simulator's device arrays wrap a numpy array
            x = x._ary
            fw = "numba"
        if fw == "torch":
            import torch
            t = x.view(torch.int16) if x.dtype == torch.bfloat16 else x
            arr = t.detach().numpy()
            if x.dtype == torch.bfloat16:
                arr = arr.view(np.uint16)
        else:
            arr = np.asarray(x)
        flat = np.lib.stride_tricks.as_strided(arr, shape=(span,), strides=(arr.dtype.itemsize,))
        return View(_kernel_host_array(flat), shape, strides, dtype, fw, "cpu",
                    arr.__array_interface__["data"][0])
    if dtype not in _TYPESTR:
        raise TypeError(f"{name} has unsupported dtype {dtype}")
    if fw == "torch":
        ptr = x.data_ptr()
    elif fw == "cupy":
        ptr = x.data.ptr
    else:
        ptr = x.__cuda_array_interface__["data"][0]
    return View(DeviceBuffer(ptr, span, _TYPESTR[dtype], x), shape, strides, dtype, fw, dev, ptr)


def empty_like_framework(framework, device, shape, dtype):
    """Allocate an output with the framework of the inputs (torch allocates torch's outputs)."""
    if framework == "torch":
        import torch
        tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
               "float64": torch.float64, "int32": torch.int32}[dtype]
        dev = "cpu" if device == "cpu" else torch.device("cuda", device)
        return torch.empty(shape, dtype=tdt, device=dev)
    npdt = np.uint16 if dtype == "bfloat16" else np.dtype(dtype)
    if framework == "cupy":
        import cupy
        with cupy.cuda.Device(device):
            if dtype == "bfloat16":
                raise TypeError("CuPy has no bfloat16 dtype")
            return cupy.empty(shape, dtype=npdt)
    if framework == "numpy":
        return np.empty(shape, dtype=npdt)
    if device == "cpu":  # simulator device arrays
        return cuda.device_array(shape, dtype=npdt)
    with cuda.gpus[device]:
        return cuda.device_array(shape, dtype=npdt)


def to_device_like(host_array, framework, device):
    """Copy a small host int32 array (mask lists) to where the kernels run (simulator: stays on the host)."""
    if SIMULATOR or device == "cpu":
        return _kernel_host_array(np.ascontiguousarray(host_array))
    with cuda.gpus[device]:
        return cuda.to_device(np.ascontiguousarray(host_array))


def launch_stream(framework, device):
    """The CUstream handle (an int) kernels go on: torch's / CuPy's current stream, else the default (0)."""
    if SIMULATOR or device == "cpu":
        return 0
    if framework == "torch":
        import torch
        return torch.cuda.current_stream(device).cuda_stream
    if framework == "cupy":
        import cupy
        return cupy.cuda.get_current_stream().ptr
    return 0
