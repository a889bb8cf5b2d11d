"""Small device functions the kernels share: element conversions and row reductions.

Two implementations exist only where the CUDA simulator cannot run the GPU's: it has no warp shuffles and no
libdevice bit casts, so there rows are reduced through shared memory and bfloat16 bits are reinterpreted
through a numpy view. Everything else is one code path.
"""
import numpy as np
from numba import config, cuda, float32, float64, int32, uint16, uint32

SIMULATOR = bool(config.ENABLE_CUDASIM)

if not SIMULATOR:
    from numba.cuda import libdevice


def inline_device(fn):
    """A device function NVVM must inline (local arrays passed to it then stay in registers)."""
    if SIMULATOR:  # the simulator's jit takes no inlining options
        return cuda.jit(device=True)(fn)
    return cuda.jit(device=True, forceinline=True)(fn)

SMEM_PER_SM = 228 * 1024      # Hopper: 228 KiB per SM, of which up to 227 KiB for one block
SMEM_PER_BLOCK_RESERVED = 1024


def kernel(threads, smem_bytes, min_blocks=0):
    """@cuda.jit for a kernel of `threads` threads and `smem_bytes` of dynamic shared memory.

    Shared memory decides how many blocks fit on an SM; telling ptxas that (launch bounds) makes it cap
    registers so that many fit too, instead of letting registers become the tighter limit.
    """
    if SIMULATOR:
        return cuda.jit
    return cuda.jit(launch_bounds=launch_bounds(threads, smem_bytes, min_blocks))


def launch_bounds(threads, smem_bytes, min_blocks=0):
    if min_blocks <= 0:
        # As many blocks as shared memory allows, but leave each thread >= 96 registers: below that the
        # micro-tiles spill (seen at d=16/32 with a 64-register cap).
        by_smem = SMEM_PER_SM // (smem_bytes + SMEM_PER_BLOCK_RESERVED)
        by_regs = 65536 // (threads * 96)
        min_blocks = max(1, min(4, by_smem, by_regs))
    return threads, min_blocks


# Element types the kernels read and write. bfloat16 travels as its raw 16 bits (torch refuses bfloat16
# in __cuda_array_interface__), so its storage type is uint16.
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


# The row max must skip NaN, so a NaN score reaches the output through P (exp2(NaN - m) is NaN) instead
# of turning the row's max into NaN. On the GPU Numba lowers max() of floats to LLVM maxnum, i.e. one
# max.f32 (FMNMX), which returns the non-NaN operand; Python's max() does not, so the simulator spells
# the same semantics out (the running max `a` is never NaN).
if SIMULATOR:
    @inline_device
    def fmax_nan_ignoring(a, b):
        return b if b > a else a
else:
    @inline_device
    def fmax_nan_ignoring(a, b):
        return max(a, b)


def make_row_reducers(tm, tx_count, use_shuffles):
    """Reductions, for each of a thread's `tm` rows, over the `tx_count` threads that share the row.

    Threads are numbered tid = ty * tx_count + tx, so a row's threads are `tx_count` consecutive lanes of one
    warp: XOR shuffles with offsets tx_count/2 ... 1 stay inside the group. The simulator has no shuffles, so
    there the partial values go through a shared-memory buffer `red` of tx_count * nrows values; the
    caller must put a barrier between the last read of one reduction and the first write of the next (the
    kernels' per-tile barriers do).
    Returns (row_max, row_sum, needs_shared_buffer); both reduce `vals[0:tm]` in place.
    """
    assert tx_count & (tx_count - 1) == 0 and tx_count <= 32
    reducer = _shuffle_reducer if use_shuffles else _shared_reducer
    return reducer(tm, tx_count, fmax_nan_ignoring), reducer(tm, tx_count, _add), not use_shuffles


@inline_device
def _add(a, b):
    return a + b


def _shuffle_reducer(tm, tx_count, op):
    @inline_device
    def reduce_rows(vals, red, red_off, ty, tx, tystride, nrows):
        for i in range(tm):
            v = vals[i]
            off = tx_count // 2
            while off > 0:
                v = op(v, cuda.shfl_xor_sync(0xFFFFFFFF, v, off))
                off //= 2
            vals[i] = v
    return reduce_rows


def _shared_reducer(tm, tx_count, op):
    @inline_device
    def reduce_rows(vals, red, red_off, ty, tx, tystride, nrows):
        for i in range(tm):
            red[red_off + tx * nrows + ty + i * tystride] = vals[i]
        cuda.syncthreads()
        for i in range(tm):
            row = ty + i * tystride
            r = red[red_off + row]
            for t in range(1, tx_count):
                r = op(r, red[red_off + t * nrows + row])
            vals[i] = r
    return reduce_rows


# --------------------------------------------------------------------------------------------------
# Shared-memory access without Numba's negative-index wraparound, and as 8/16-byte vectors.
#
# `smem[i]` with a signed index makes Numba emit a compare-and-select per access (Python's negative
# indices), which also hides the alignment the LLVM load/store vectoriser needs. These intrinsics index
# the array's data pointer directly; `ld_vec(n)` reads n consecutive elements as one `ld.shared.v{n}`.
# The caller guarantees 0 <= idx and, for vectors, idx * itemsize a multiple of n * itemsize (every tile
# offset and row stride here is a multiple of 4 elements; the dynamic shared window is 16-byte aligned).
# --------------------------------------------------------------------------------------------------
def _make_vector_load(n):
    if SIMULATOR:
        def ld(arr, idx):
            return tuple(arr[idx:idx + n])
        return ld

    from llvmlite import ir
    from numba.core import types
    from numba.cuda.extending import intrinsic

    @intrinsic
    def ld(typingctx, arr, idx):
        sig = types.UniTuple(arr.dtype, n)(arr, idx)

        def codegen(context, builder, signature, args):
            ary = context.make_array(signature.args[0])(context, builder, args[0])
            ptr = builder.gep(ary.data, [args[1]])
            elty = context.get_value_type(signature.args[0].dtype)
            vecty = ir.VectorType(elty, n)
            nbytes = n * context.get_abi_sizeof(elty)
            v = builder.load(builder.bitcast(ptr, vecty.as_pointer()), align=nbytes)
            return context.make_tuple(builder, signature.return_type,
                                      [builder.extract_element(v, ir.Constant(ir.IntType(32), i))
                                       for i in range(n)])

        return sig, codegen

    return ld


def _make_vector_store(n):
    if SIMULATOR:
        def st(arr, idx, vals):
            for i in range(n):
                arr[idx + i] = vals[i]
        return st

    from llvmlite import ir
    from numba.core import types
    from numba.cuda.extending import intrinsic

    @intrinsic
    def st(typingctx, arr, idx, vals):
        def codegen(context, builder, signature, args):
            ary = context.make_array(signature.args[0])(context, builder, args[0])
            ptr = builder.gep(ary.data, [args[1]])
            elty = context.get_value_type(signature.args[0].dtype)
            vecty = ir.VectorType(elty, n)
            v = ir.Constant(vecty, ir.Undefined)
            for i in range(n):
                x = builder.extract_value(args[2], i)
                x = context.cast(builder, x, signature.args[2].dtype, signature.args[0].dtype)
                v = builder.insert_element(v, x, ir.Constant(ir.IntType(32), i))
            nbytes = n * context.get_abi_sizeof(elty)
            builder.store(v, builder.bitcast(ptr, vecty.as_pointer()), align=nbytes)
            return context.get_dummy_value()

        return types.void(arr, idx, vals), codegen

    return st


def _make_scalar_access():
    if SIMULATOR:
        def ld(arr, idx):
            return arr[idx]

        def st(arr, idx, val):
            arr[idx] = val
        return ld, st

    from numba.core import types
    from numba.cuda.extending import intrinsic

    @intrinsic
    def ld(typingctx, arr, idx):
        def codegen(context, builder, signature, args):
            ary = context.make_array(signature.args[0])(context, builder, args[0])
            return builder.load(builder.gep(ary.data, [args[1]]))
        return arr.dtype(arr, idx), codegen

    @intrinsic
    def st(typingctx, arr, idx, val):
        def codegen(context, builder, signature, args):
            ary = context.make_array(signature.args[0])(context, builder, args[0])
            v = context.cast(builder, args[2], signature.args[2], signature.args[0].dtype)
            builder.store(v, builder.gep(ary.data, [args[1]]))
            return context.get_dummy_value()
        return types.void(arr, idx, val), codegen

    return ld, st


ld2 = _make_vector_load(2)
ld4 = _make_vector_load(4)
st4 = _make_vector_store(4)
ld1, st1 = _make_scalar_access()
