"""Element types: what the kernels read and write, what they compute in, and the conversions between them.

bfloat16 travels as its raw 16 bits (torch refuses bfloat16 in __cuda_array_interface__), so its storage
type is uint16 and its conversions are bit operations. The simulator has no libdevice bit casts: there
the bits are reinterpreted through a numpy view.
"""
import numpy as np
from numba import cuda, float32, float64, int32, uint16, uint32

from .launch import SIMULATOR, inline_device

if not SIMULATOR:
    from numba.cuda import libdevice

DTYPES = ("float32", "float16", "bfloat16", "float64")


def storage_dtype(dtype_name):
    """numpy dtype of the arrays a kernel of `dtype_name` is launched on."""
    return np.dtype("uint16" if dtype_name == "bfloat16" else dtype_name)


def acc_constant(dtype_name, value):
    """`value` as a numpy scalar of the arithmetic type. A plain Python float in a kernel is a float64
    constant, and Numba then widens every value it meets (a comparison with -inf, a select between a
    score and -inf) to float64: SASS filled with F2F conversions and DSETP compares."""
    return np.float64(value) if dtype_name == "float64" else np.float32(value)


def acc_type(dtype_name):
    """Arithmetic type: float64 for float64 inputs (so gradcheck works), float32 for everything else."""
    return float64 if dtype_name == "float64" else float32


if SIMULATOR:
    @cuda.jit(device=True)
    def _bits_to_f32(bits):
        t = cuda.local.array(1, uint32)
        t[0] = bits
        return t.view(np.float32)[0]

    @cuda.jit(device=True)
    def _f32_to_bits(x):
        t = cuda.local.array(1, float32)
        t[0] = x
        return t.view(np.uint32)[0]
else:
    @inline_device
    def _bits_to_f32(bits):
        return libdevice.int_as_float(int32(bits))

    @inline_device
    def _f32_to_bits(x):
        return uint32(libdevice.float_as_int(x))


@inline_device
def bf16_to_f32(b):
    return _bits_to_f32(uint32(b) << 16)


@inline_device
def f32_to_bf16(x):
    """Round to nearest even, keeping NaN a NaN (plain rounding could carry a NaN's payload into inf)."""
    if x != x:
        return uint16(0x7FC0)
    bits = _f32_to_bits(x)
    bits += uint32(0x7FFF) + ((bits >> 16) & uint32(1))
    return uint16(bits >> 16)


@inline_device
def to_f32(x):
    return float32(x)


@inline_device
def identity(x):
    return x


def loader(dtype_name):
    """Device function converting one stored element to the arithmetic type."""
    return {"float32": identity, "float16": to_f32, "bfloat16": bf16_to_f32, "float64": identity}[dtype_name]


def storer(dtype_name):
    """Device function converting an arithmetic value to the stored element (float16 converts on store)."""
    return {"float32": identity, "float16": identity, "bfloat16": f32_to_bf16, "float64": identity}[dtype_name]
