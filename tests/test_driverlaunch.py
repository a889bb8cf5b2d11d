"""kernels/driverlaunch.py: the parameter list and signature of a direct launch are Numba's own.

The packing is checked everywhere against Numba's typing (numba.typeof of equivalent numpy arrays and
scalars) and its data model (an array is seven 64-bit parameters); on a GPU, a kernel launched through
the driver must see exactly what the same kernel launched by Numba's dispatcher sees.
"""
import struct

import numpy as np
import pytest
from numba import cuda, typeof

from numba_flash.kernels.driverlaunch import ArgPacker, DeviceBuffer
from numba_flash.kernels.launch import SIMULATOR, Launchable


def _args(rng):
    a = DeviceBuffer(0x7f0000001000, int(rng.integers(1, 1000)), np.float16)
    b = DeviceBuffer(0x7f0000002000, int(rng.integers(1, 1000)), np.int32)
    n = int(rng.integers(-2**40, 2**40))
    return a, b, (a, b, n, float(rng.standard_normal()), True, (n, 3, 4), np.float32(2.5), np.int32(-7))


def test_flatten_gives_numbas_parameter_order(rng):
    a, b, args = _args(rng)
    key, values = ArgPacker.flatten(args)
    n = args[2]
    assert values == [0, 0, a.size, 2, a.ptr, a.size, 2,        # meminfo, parent, nitems, itemsize, data,
                      0, 0, b.size, 4, b.ptr, b.size, 4,        # shape[0], strides[0] in bytes
                      n, args[3], True, n, 3, 4, np.float32(2.5), np.int32(-7)]
    fmt = "<" + ArgPacker.struct_format(args)
    assert struct.calcsize(fmt) == 8 * len(values)          # one 8-byte slot per parameter
    packed = struct.pack(fmt, *values)
    assert struct.unpack_from("<q", packed, 8 * 14)[0] == n
    assert struct.unpack_from("<d", packed, 8 * 15)[0] == args[3]
    assert packed[8 * 16] == 1


def test_signature_is_what_numba_typeof_gives(rng):
    a, b, args = _args(rng)
    stand_ins = (np.zeros(3, np.float16), np.zeros(3, np.int32), *args[2:])
    assert ArgPacker.signature(args) == tuple(typeof(x) for x in stand_ins)


def test_keys_tell_signatures_apart(rng):
    a, b, args = _args(rng)
    key1, _ = ArgPacker.flatten(args)
    key2, _ = ArgPacker.flatten((b, a) + args[2:])
    key3, _ = ArgPacker.flatten(args[:3] + (1,) + args[4:])      # int where the float was
    key4, _ = ArgPacker.flatten(args)
    assert key1 != key2 and key1 != key3 and key1 == key4


def test_unsupported_arguments_are_refused():
    with pytest.raises(TypeError, match="str"):
        ArgPacker.flatten(("x",))
    with pytest.raises(OverflowError):
        ArgPacker.flatten((2**70,))


@pytest.mark.gpu
@pytest.mark.skipif(SIMULATOR, reason="launches through the CUDA driver")
def test_direct_launch_matches_numba_dispatch(rng):
    import torch

    @cuda.jit
    def record(out, src, n, x, flag, t, y):
        i = cuda.grid(1)
        if i < out.size:
            out[i] = src[i] * x + n + (t[0] - t[2]) * (1.0 if flag else -1.0) + y + out.size * 1000.0

    src = torch.randn(300, dtype=torch.float64, device="cuda")
    args_of = lambda out: (DeviceBuffer(out.data_ptr(), out.numel(), np.float64, out),
                           DeviceBuffer(src.data_ptr(), src.numel(), np.float64, src),
                           int(rng.integers(-50, 50)), float(rng.standard_normal()), False, (7, 8, 2),
                           np.float32(0.25))
    direct = torch.full((300,), float("nan"), dtype=torch.float64, device="cuda")
    via_numba = torch.full((300,), float("nan"), dtype=torch.float64, device="cuda")
    args = args_of(direct)
    Launchable(record, 128, 0)((3,), torch.cuda.current_stream().cuda_stream, *args)
    record[3, 128](cuda.as_cuda_array(via_numba), cuda.as_cuda_array(src), *args[2:])
    torch.cuda.synchronize()
    assert torch.equal(direct, via_numba)
    expect = src * args[3] + args[2] + 5.0 * -1.0 + 0.25 + 300 * 1000.0
    assert torch.allclose(direct, expect)
