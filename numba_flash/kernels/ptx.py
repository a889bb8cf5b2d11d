"""PTX-level building blocks, each with a simulator implementation of the same semantics.

Shared-memory access without Numba's negative-index wraparound, and as 8/16-byte vectors:
`smem[i]` with a signed index makes Numba emit a compare-and-select per access (Python's negative
indices), which also hides the alignment the LLVM load/store vectoriser needs. These intrinsics index
the array's data pointer directly; `ld4` reads 4 consecutive elements as one `ld.shared.v4`, `ld8` 8
16-bit elements as one 16-byte load (global or shared). The caller
guarantees 0 <= idx and, for vectors, idx * itemsize a multiple of the vector's size in bytes.
"""
from .launch import SIMULATOR


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
            if n == 8 and nbytes == 16:
                # eight 16-bit elements: PTX vectors have at most 4 elements, so NVPTX splits an <8 x half>
                # (or <8 x i16>, which LLVM folds a bitcast into) load in two; four 32-bit words split by
                # shifts are one 16-byte load
                wide = ir.VectorType(ir.IntType(32), 4)
                w = builder.load(builder.bitcast(ptr, wide.as_pointer()), align=16)
                vals = []
                for i in range(4):
                    word = builder.extract_element(w, ir.Constant(ir.IntType(32), i))
                    for half in (word, builder.lshr(word, ir.Constant(ir.IntType(32), 16))):
                        vals.append(builder.bitcast(builder.trunc(half, ir.IntType(16)), elty))
                return context.make_tuple(builder, signature.return_type, vals)
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
ld8 = _make_vector_load(8)
st2 = _make_vector_store(2)
st4 = _make_vector_store(4)
ld1, st1 = _make_scalar_access()


# ==================================================================================================
# Tensor-core, warp and asynchronous-copy instructions
# ==================================================================================================
#
# Each name below is one PTX instruction, callable from a @cuda.jit kernel. On a GPU it is an inline-PTX
# intrinsic; under the simulator it is a Python function with the same semantics (the warp-collective
# ones meet the other lanes of their warp through `simwarp.exchange`).
#
#   shfl_xor(value, lane_mask)                       value of lane `lane ^ lane_mask` (f32, f64, i32)
#   mma_f16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)  -> (d0, d1, d2, d3)   mma.sync m16n8k16 row.col,
#   mma_bf16(...)                                       f16 / bf16 inputs, f32 accumulators
#   ldmatrix_x1 / _x2 / _x4 (arr, idx, off)         -> u32 / (u32,)*2 / (u32,)*4   ldmatrix m8n8 .b16
#   ldmatrix_x1_trans / _x2_trans / _x4_trans (arr, idx, off)   row address: element idx + off, where
#                                                    off is the part that is constant in an unrolled loop
#   cp_async16(sarr, sidx, garr, gidx, valid)        16-byte global -> shared copy, zero-fill if not valid
#   cp_async4(sarr, sidx, garr, gidx, valid)         the same for 4 bytes
#   cp_async_commit(), cp_async_wait_all(), cp_async_wait_group(n)   n an integer literal or a
#                                                    module-level int name (not an expression)
#   pack_f16x2(lo, hi), pack_bf16x2(lo, hi)          -> u32: two f32 rounded (nearest even), lo in bits 0-15
#   ex2(x)                                           -> f32: 2^x, ex2.approx.ftz.f32
#   tf32_round(x)                                    -> f32: x rounded to tf32 (10 mantissa bits, nearest,
#                                                    ties away from zero; cvt.rna.tf32.f32, sm_80), the
#                                                    13 low bits zero: what tf32 tensor-core inputs hold
#   f32_bits(x)                                      -> u32: the bits of f32 x (a register, reinterpreted)
#   fma(a, b, c)                                     a * b + c rounded once (f32, or f64 if an argument is;
#                                                    llvm.fma: fma.rn), where the compiler must not choose
#                                                    whether to fuse
#   st_global_b32(garr, gidx, u32)                   one 32-bit store at element gidx of a global array
#   st_shared_b16(sarr, hidx, v16)                   one 16-bit store at halfword hidx of a shared array
#   st_shared_b32(sarr, widx, u32)                   one 32-bit store (bits as given) at word widx of a shared array
#   lane_id()                                        lane within the warp
#   syncwarp()                                       every lane of the warp meets (bar.warp.sync, full mask)
#   vote_any(pred)                                   -> bool: pred is true in some lane of the warp
#   red_add_f32(garr, gidx, x)                       global float32 reduction (atomic add, no result)
#   red_add_f32x2(garr, gidx, x, y)                  the same on two adjacent floats in one instruction
#                                                    (red.global.add.v2.f32, sm_90; gidx even)
#
# Fragment layouts of mma.sync.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point
# type"), g = lane >> 2, t = lane & 3, each u32 register holding two 16-bit elements, the lower-indexed
# one in bits 0-15:
#   A (16x16, row): a0 = A[g][2t:2t+2], a1 = A[g+8][2t:2t+2], a2 = A[g][2t+8:2t+10], a3 = A[g+8][2t+8:2t+10]
#   B (16x8, col):  b0 = B[2t:2t+2][g], b1 = B[2t+8:2t+10][g]            (B indexed [k][n])
#   C, D (16x8):    c0 = C[g][2t], c1 = C[g][2t+1], c2 = C[g+8][2t], c3 = C[g+8][2t+1]
# ldmatrix (PTX ISA, "Warp-level matrix load instruction: ldmatrix"): lanes 8i..8i+7 give the addresses of
# the 8 rows (16 bytes each) of matrix i; result register i of lane (g, t) holds matrix i's row g, elements
# 2t and 2t+1 (.trans: elements [2t][g] and [2t+1][g]). x1 reads the addresses of lanes 0-7, x2 of lanes
# 0-15; the other lanes' addresses are ignored. So x4 of an m16k16 A tile with lane addresses at row
# r0 + lane % 16, column c0 + 8 * (lane // 16) gives exactly (a0, a1, a2, a3) above; x2 of a B tile stored
# [n][k] at row n0 + lane % 8, column k0 + 8 * (lane // 8 % 2) gives (b0, b1); x2_trans of a B tile stored
# [k][n] at row k0 + lane % 16, column n0 gives (b0, b1) as well.
#
# Index arguments are element indices into the array as a flat C-contiguous buffer (the data pointer plus
# idx * itemsize): the caller guarantees bounds and alignment (16 bytes for ldmatrix rows and cp_async16,
# 4 bytes for cp_async4 and st_global_b32). The simulator checks both and raises.

if SIMULATOR:
    from fractions import Fraction as _Fraction

    import numpy as _np

    from . import simwarp as _simwarp
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray as _FakeArray
    from numba.cuda.simulator.cudadrv.devicearray import FakeWithinKernelCUDAArray as _FakeKernelArray

    def _ndarray(arr):
        """The numpy array behind a simulated kernel's array: shared and local arrays are numpy arrays
        already; kernel arguments are FakeWithinKernelCUDAArray(FakeCUDAArray(ndarray)). Their private
        attributes are read through vars(), bypassing the wrappers' attribute forwarding (which would
        answer any name with an element lookup)."""
        if isinstance(arr, _FakeKernelArray):
            arr = vars(arr)["_item"]
        if isinstance(arr, _FakeArray):
            arr = vars(arr)["_ary"]
        if not isinstance(arr, _np.ndarray):
            raise TypeError(f"expected an array, got {type(arr).__name__}")
        return arr

    def _bytes(arr):
        """The array's memory as a writable 1-D uint8 view (a view, so writes reach the array)."""
        a = _ndarray(arr)
        if not a.flags.c_contiguous:
            raise ValueError("ptx intrinsics address arrays as flat buffers: the array must be C-contiguous")
        return a.reshape(-1).view(_np.uint8)

    def _span(arr, idx, nbytes, align, what):
        """(byte view, byte offset) of `nbytes` bytes at element `idx`, checked like the GPU would fault."""
        buf = _bytes(arr)
        off = int(idx) * _ndarray(arr).itemsize
        if off % align:
            raise ValueError(f"{what}: byte offset {off} (element {int(idx)}) is not {align}-byte aligned")
        if off < 0 or off + nbytes > buf.size:
            raise IndexError(f"{what}: bytes [{off}, {off + nbytes}) outside an array of {buf.size} bytes")
        return buf, off

    # --- warp ---

    lane_id = _simwarp.lane_id

    def syncwarp():
        _simwarp.exchange(None)

    def shfl_xor(value, lane_mask):
        lane, vals, _ = _simwarp.exchange(value)
        src = lane ^ int(lane_mask)
        # Outside a short warp the GPU's result is undefined; keep the own value (PTX's out-of-range rule).
        return vals[src] if src < len(vals) else value

    # --- mma ---

    def _frag_index():
        """Where each lane's registers go in A, B and C (the table above), as (rows, cols) index arrays in
        the order of the lanes' deposits: (lane, register, half) for A and B, (lane, register) for C."""
        lane = _np.arange(32).reshape(32, 1, 1)
        g, t = lane >> 2, lane & 3
        half = _np.arange(2).reshape(1, 1, 2)
        ra = _np.arange(4).reshape(1, 4, 1)
        rb = _np.arange(2).reshape(1, 2, 1)
        a = _np.broadcast_arrays(g + 8 * (ra & 1), 2 * t + half + 8 * (ra >> 1))
        b = _np.broadcast_arrays(2 * t + half + 8 * rb, g)
        c = _np.broadcast_arrays(g + 8 * (ra >> 1), 2 * t + (ra & 1))
        return tuple(tuple(x.ravel() for x in idx) for idx in (a, b, c))

    _A_IDX, _B_IDX, _C_IDX = _frag_index()

    def _f16_to_f64(bits):
        return bits.view(_np.float16).astype(_np.float64)

    def _bf16_to_f64(bits):
        # bf16 is the upper half of a float32: exact
        return (bits.astype(_np.uint32) << 16).view(_np.float32).astype(_np.float64)

    def _mma_product(ops, to_f64):
        """D (16 x 8, float32) from all 32 lanes' (a0..a3, b0, b1, c0..c3)."""
        regs = _np.array([op[:6] for op in ops], dtype=_np.uint32)
        halves = to_f64(regs.view(_np.uint16).reshape(32, 12))      # little-endian: low half first
        A = _np.empty((16, 16))
        B = _np.empty((16, 8))
        C = _np.empty((16, 8))
        A[_A_IDX] = halves[:, :8].ravel()
        B[_B_IDX] = halves[:, 8:].ravel()
        C[_C_IDX] = _np.array([op[6:] for op in ops], dtype=_np.float32).ravel()
        # exact products, summed in float64, rounded once to float32
        return (A @ B + C).astype(_np.float32)

    def _make_mma(to_f64):
        def mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
            mine = (int(a0) & 0xFFFFFFFF, int(a1) & 0xFFFFFFFF, int(a2) & 0xFFFFFFFF, int(a3) & 0xFFFFFFFF,
                    int(b0) & 0xFFFFFFFF, int(b1) & 0xFFFFFFFF,
                    _np.float32(c0), _np.float32(c1), _np.float32(c2), _np.float32(c3))
            lane, ops, scratch = _simwarp.exchange(mine, full_warp=True)
            D = scratch.get("D")
            if D is None:       # the first lane computes the warp's product, the others share it
                D = scratch.setdefault("D", _mma_product(ops, to_f64))
            g, t = lane >> 2, lane & 3
            return D[g, 2 * t], D[g, 2 * t + 1], D[g + 8, 2 * t], D[g + 8, 2 * t + 1]
        return mma

    mma_f16 = _make_mma(_f16_to_f64)
    mma_bf16 = _make_mma(_bf16_to_f64)

    # --- ldmatrix ---

    def _make_ldmatrix(n, trans):
        def ldmatrix(arr, idx, off):
            lane = _simwarp.lane_id()
            # only the lanes whose addresses the instruction reads resolve (and check) them
            mine = None
            if lane < 8 * n:
                buf, off = _span(arr, idx + off, 16, 16, "ldmatrix row address")
                mine = (buf, off)
            lane, rows, _ = _simwarp.exchange(mine, full_warp=True)
            g, t = lane >> 2, lane & 3
            out = []
            for i in range(n):
                if trans:
                    b0, o0 = rows[8 * i + 2 * t]
                    b1, o1 = rows[8 * i + 2 * t + 1]
                    lo = int(b0[o0 + 2 * g]) | int(b0[o0 + 2 * g + 1]) << 8
                    hi = int(b1[o1 + 2 * g]) | int(b1[o1 + 2 * g + 1]) << 8
                    out.append(_np.uint32(lo | hi << 16))
                else:
                    b, o = rows[8 * i + g]
                    out.append(_np.uint32(int.from_bytes(b[o + 4 * t:o + 4 * t + 4].tobytes(), "little")))
            return out[0] if n == 1 else tuple(out)
        return ldmatrix

    ldmatrix_x1 = _make_ldmatrix(1, False)
    ldmatrix_x2 = _make_ldmatrix(2, False)
    ldmatrix_x4 = _make_ldmatrix(4, False)
    ldmatrix_x1_trans = _make_ldmatrix(1, True)
    ldmatrix_x2_trans = _make_ldmatrix(2, True)
    ldmatrix_x4_trans = _make_ldmatrix(4, True)

    # --- cp.async: done at once; commit and wait have nothing left to do (so a missing wait or
    # syncthreads goes unnoticed here: only the GPU catches it) ---

    def _make_cp_async(nbytes):
        def cp_async(sarr, sidx, garr, gidx, valid):
            dst, doff = _span(sarr, sidx, nbytes, nbytes, "cp.async destination")
            if valid:
                src, soff = _span(garr, gidx, nbytes, nbytes, "cp.async source")
                dst[doff:doff + nbytes] = src[soff:soff + nbytes]
            else:
                dst[doff:doff + nbytes] = 0
        return cp_async

    cp_async16 = _make_cp_async(16)
    cp_async4 = _make_cp_async(4)

    def cp_async_commit():
        pass

    def cp_async_wait_all():
        pass

    def cp_async_wait_group(n):
        if int(n) < 0:
            raise ValueError(f"cp_async_wait_group: n = {n} < 0")

    # --- conversions, ex2, stores ---

    def _f32(x):
        with _np.errstate(over="ignore"):
            return _np.float32(x)

    def _f16_bits(x):
        with _np.errstate(over="ignore", invalid="ignore"):   # overflow -> inf, as cvt.rn does
            return int(_f32(x).astype(_np.float16).view(_np.uint16))

    def _bf16_bits(x):
        b = int(_f32(x).view(_np.uint32))
        if (b & 0x7FFFFFFF) > 0x7F800000:
            return 0x7FC0
        # round to nearest even on the 16 discarded bits; a carry out of the mantissa bumps the exponent
        # (up to inf), which is what rounding does
        return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF

    def pack_f16x2(lo, hi):
        return _np.uint32(_f16_bits(lo) | _f16_bits(hi) << 16)

    def pack_bf16x2(lo, hi):
        return _np.uint32(_bf16_bits(lo) | _bf16_bits(hi) << 16)

    _F32_TINY = _np.finfo(_np.float32).tiny

    def fma(a, b, c):
        # float32 if an argument is (and none is float64), as Numba types it; then every argument is a
        # float32 first, the exact a * b + c rounds to odd at float64 and that to nearest even at float32,
        # which is the correctly rounded float32 (53 >= 24 + 2 bits)
        f32 = any(isinstance(x, _np.float32) for x in (a, b, c)) and \
            not any(isinstance(x, _np.float64) for x in (a, b, c))
        t = _np.float32 if f32 else _np.float64
        a, b, c = (t(x) for x in (a, b, c))
        with _np.errstate(all="ignore"):
            if not (_np.isfinite(a) and _np.isfinite(b) and _np.isfinite(c)):
                return t(a * b + c)                  # inf and NaN as the hardware gives them
            exact = _Fraction(float(a)) * _Fraction(float(b)) + _Fraction(float(c))
            if exact == 0:
                return t(_np.float64(a) * _np.float64(b) + _np.float64(c))     # the sign of a zero
            try:
                r = float(exact)                     # nearest even (int / int is correctly rounded)
            except OverflowError:
                return t(_np.inf if exact > 0 else -_np.inf)
            if f32 and _Fraction(r) != exact and not (int(_np.float64(r).view(_np.uint64)) & 1):
                r = float(_np.nextafter(r, _np.inf if exact > _Fraction(r) else -_np.inf))    # to odd
            return t(r)

    def tf32_round(x):
        b = int(_f32(x).view(_np.uint32))
        if (b & 0x7F800000) == 0x7F800000:           # inf stays, NaN stays NaN
            return _np.uint32(b if not (b & 0x7FFFFF) else b | 0x400000).view(_np.float32)
        # sign-magnitude: adding half a unit to the magnitude's bits rounds it half away from zero
        # (a carry into the exponent is the correct rounding, up to inf)
        return _np.uint32(((b & 0x7FFFFFFF) + 0x1000 & 0xFFFFE000) | (b & 0x80000000)).view(_np.float32)

    def f32_bits(x):
        return _f32(x).view(_np.uint32)

    def ex2(x):
        x = _f32(x)
        if abs(x) < _F32_TINY:          # .ftz: subnormal inputs are zero
            x = _np.float32(0)
        with _np.errstate(over="ignore", under="ignore"):
            y = _np.exp2(x)
        if y < _F32_TINY:               # .ftz: subnormal results are zero
            y = _np.float32(0)
        return y

    def st_global_b32(garr, gidx, val):
        buf, off = _span(garr, gidx, 4, 4, "st_global_b32")
        buf[off:off + 4] = _np.frombuffer((int(val) & 0xFFFFFFFF).to_bytes(4, "little"), _np.uint8)

    def st_shared_b16(sarr, hidx, val):
        buf, off = _span(sarr, 0, 2, 1, "st_shared_b16")
        off = 2 * int(hidx)
        bits = _np.asarray(val).astype(_np.float16 if isinstance(val, (float, _np.floating)) else _np.uint16)
        buf[off:off + 2] = _np.frombuffer(bits.tobytes(), _np.uint8)

    def st_shared_b32(sarr, widx, val):
        buf, off = _span(sarr, 0, 4, 1, "st_shared_b32")
        off = 4 * int(widx)
        if off < 0 or off + 4 > buf.size:
            raise IndexError(f"st_shared_b32: bytes [{off}, {off + 4}) outside {buf.size} bytes")
        buf[off:off + 4] = _np.frombuffer((int(val) & 0xFFFFFFFF).to_bytes(4, "little"), _np.uint8)

    # --- votes, global reductions ---

    def vote_any(pred):
        _, preds, _ = _simwarp.exchange(bool(pred))
        return any(preds)

    # Blocks of a simulated grid run one after another, but the threads of a block run concurrently:
    # a reduction is a read-modify-write under one lock, as the GPU's L2 performs it atomically.
    _RED_LOCK = __import__("threading").Lock()

    def _f32_array(garr, gidx, n, what):
        a = _ndarray(garr)
        if a.dtype != _np.float32 or a.ndim != 1:
            raise TypeError(f"{what}: needs a flat float32 array, got {a.dtype} with {a.ndim} dims")
        i = int(gidx)
        if i % n:
            raise ValueError(f"{what}: element {i} is not {4 * n}-byte aligned")
        if i < 0 or i + n > a.size:
            raise IndexError(f"{what}: elements [{i}, {i + n}) outside an array of {a.size}")
        return a, i

    def red_add_f32(garr, gidx, x):
        a, i = _f32_array(garr, gidx, 1, "red_add_f32")
        with _RED_LOCK:
            a[i] = a[i] + _f32(x)

    def red_add_f32x2(garr, gidx, x, y):
        a, i = _f32_array(garr, gidx, 2, "red_add_f32x2")
        with _RED_LOCK:
            a[i] = a[i] + _f32(x)
            a[i + 1] = a[i + 1] + _f32(y)


else:
    from llvmlite import ir as _ir
    from numba.core import types as _types
    from numba.core.errors import TypingError as _TypingError
    from numba.cuda.extending import intrinsic as _intrinsic

    _I32 = _ir.IntType(32)
    _I64 = _ir.IntType(64)
    _F32 = _ir.FloatType()
    # Call attributes: pure register instructions may be CSE'd or removed when unused; warp-collective
    # ones must not be moved into or out of divergent control flow (convergent), as clang marks CUDA asm.
    _PURE = ("nounwind", "readnone")
    _COLLECTIVE_PURE = ("convergent", "nounwind", "readnone")
    _COLLECTIVE_LOAD = ("convergent", "nounwind", "readonly")

    def _asm(builder, ret, argtys, text, constraints, args, side_effect=False, attrs=()):
        fnty = _ir.FunctionType(ret, argtys)
        return builder.call(_ir.InlineAsm(fnty, text, constraints, side_effect=side_effect), args,
                            attrs=attrs)

    def _elem_ptr(context, builder, arrty, arr, idxty, idx):
        """i8* (generic) to element idx of the array's data."""
        ary = context.make_array(arrty)(context, builder, arr)
        idx = context.cast(builder, idx, idxty, _types.intp)
        return builder.bitcast(builder.gep(ary.data, [idx]), _ir.IntType(8).as_pointer())

    def _shared_addr(context, builder, arrty, arr, idxty, idx):
        """32-bit shared-window address (what `.shared` instructions take): the array's base, cast once to
        the shared window (NVVM folds the addrspacecast back to the shared symbol), plus the element offset
        computed in 32 bits. Kept in 32 bits, `base + lane part + constant` leaves one register per lane
        pattern and the constants as immediate offsets; computed as a 64-bit generic address first, every
        ldmatrix of an unrolled tile product would hold its own 64-bit address."""
        ary = context.make_array(arrty)(context, builder, arr)
        base = builder.addrspacecast(builder.bitcast(ary.data, _ir.IntType(8).as_pointer()),
                                     _ir.PointerType(_ir.IntType(8), 3))
        base = builder.ptrtoint(base, _I32)
        off = builder.trunc(context.cast(builder, idx, idxty, _types.intp), _I32)
        item = context.get_abi_sizeof(context.get_value_type(arrty.dtype))
        return builder.add(base, builder.mul(off, _ir.Constant(_I32, item)))

    def _shared_word_ptr(context, builder, arrty, arr, idxty, idx, bits):
        """Pointer (shared address space) to the idx-th `bits`-bit word of a shared array of any dtype."""
        ary = context.make_array(arrty)(context, builder, arr)
        base = builder.addrspacecast(builder.bitcast(ary.data, _ir.IntType(8).as_pointer()),
                                     _ir.PointerType(_ir.IntType(8), 3))
        return builder.gep(builder.bitcast(base, _ir.PointerType(_ir.IntType(bits), 3)),
                           [context.cast(builder, idx, idxty, _types.intp)])

    def _global_ptr(context, builder, arrty, arr, idxty, idx):
        p = _elem_ptr(context, builder, arrty, arr, idxty, idx)
        return builder.addrspacecast(p, _ir.PointerType(_ir.IntType(8), 1))

    def _is_array(t):
        return isinstance(t, _types.Array)

    def _is_int(t):
        return isinstance(t, (_types.Integer, _types.Boolean))

    # --- warp ---

    # Intrinsics rather than device functions calling cuda.laneid / cuda.shfl_xor_sync: a device
    # function's dispatcher asks the current device for its compute capability when typed, which breaks
    # cuda.compile_ptx(..., cc=...) on a machine without a GPU.

    @_intrinsic
    def lane_id(typingctx):
        def codegen(context, builder, signature, args):
            lane = _asm(builder, _I32, [], "mov.u32 $0, %laneid;", "=r", [], attrs=_PURE)
            return context.cast(builder, lane, _types.uint32, _types.int32)
        return _types.int32(), codegen

    _SHFL = "shfl.sync.bfly.b32 $0, $1, $2, 0x1f, 0xffffffff;"

    @_intrinsic
    def shfl_xor(typingctx, value, lane_mask):
        value = _types.unliteral(value)
        if value not in (_types.int32, _types.uint32, _types.int64, _types.uint64, _types.float32,
                         _types.float64) or not _is_int(lane_mask):
            return None

        def codegen(context, builder, signature, args):
            vty, mty = signature.args
            mask = context.cast(builder, args[1], mty, _types.int32)
            bits = vty.bitwidth

            def shfl(x32):
                return _asm(builder, _I32, [_I32, _I32], _SHFL, "=r,r,r", [x32, mask],
                            attrs=_COLLECTIVE_PURE)

            x = builder.bitcast(args[0], _ir.IntType(bits)) if isinstance(vty, _types.Float) else args[0]
            if bits == 32:
                y = shfl(x)
            else:   # two 32-bit halves
                lo = shfl(builder.trunc(x, _I32))
                hi = shfl(builder.trunc(builder.lshr(x, _ir.Constant(_I64, 32)), _I32))
                y = builder.or_(builder.shl(builder.zext(hi, _I64), _ir.Constant(_I64, 32)),
                                builder.zext(lo, _I64))
            return builder.bitcast(y, context.get_value_type(vty)) if isinstance(vty, _types.Float) else y

        return value(value, lane_mask), codegen

    # --- mma ---

    def _make_mma(ab_type):
        text = (f"mma.sync.aligned.m16n8k16.row.col.f32.{ab_type}.{ab_type}.f32 "
                "{$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, {$10,$11,$12,$13};")

        @_intrinsic
        def mma(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
            ab, c = (a0, a1, a2, a3, b0, b1), (c0, c1, c2, c3)
            if not (all(_is_int(x) for x in ab) and all(isinstance(x, _types.Number) for x in c)):
                return None
            sig = _types.UniTuple(_types.float32, 4)(*ab, *c)

            def codegen(context, builder, signature, args):
                tys = signature.args
                ops = [context.cast(builder, v, ty, _types.uint32) for v, ty in zip(args[:6], tys[:6])]
                ops += [context.cast(builder, v, ty, _types.float32) for v, ty in zip(args[6:], tys[6:])]
                out = _asm(builder, _ir.LiteralStructType([_F32] * 4), [_I32] * 6 + [_F32] * 4, text,
                           "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", ops, attrs=_COLLECTIVE_PURE)
                return context.make_tuple(builder, signature.return_type,
                                          [builder.extract_value(out, i) for i in range(4)])

            return sig, codegen

        return mma

    mma_f16 = _make_mma("f16")
    mma_bf16 = _make_mma("bf16")

    # --- ldmatrix ---

    def _make_ldmatrix(n, trans):
        regs = ",".join(f"${i}" for i in range(n))
        # The constant part of the address is added inside the asm: left to LLVM, base + constant for
        # every ldmatrix of an unrolled tile product is hoisted out of the loop into its own register
        # (seen as ~100 extra registers); inside, ptxas folds it into the instruction's immediate offset.
        text = (f"{{ .reg .u32 a; add.u32 a, ${n}, ${n + 1}; "
                f"ldmatrix.sync.aligned.m8n8.x{n}{'.trans' if trans else ''}.shared.b16 {{{regs}}}, [a]; }}")
        constraints = ",".join(["=r"] * n + ["r", "r"])

        @_intrinsic
        def ldmatrix(typingctx, arr, idx, off):
            if not (_is_array(arr) and _is_int(idx) and _is_int(off)):
                return None
            ret = _types.uint32 if n == 1 else _types.UniTuple(_types.uint32, n)

            def codegen(context, builder, signature, args):
                t = signature.args
                addr = _shared_addr(context, builder, t[0], args[0], t[1], args[1])
                item = context.get_abi_sizeof(context.get_value_type(t[0].dtype))
                off = builder.mul(builder.trunc(context.cast(builder, args[2], t[2], _types.intp), _I32),
                                  _ir.Constant(_I32, item))
                rty = _I32 if n == 1 else _ir.LiteralStructType([_I32] * n)
                # readonly + convergent: ordered after the stores and barriers before it, never moved
                # into divergent code
                out = _asm(builder, rty, [_I32, _I32], text, constraints, [addr, off], attrs=_COLLECTIVE_LOAD)
                if n == 1:
                    return out
                return context.make_tuple(builder, signature.return_type,
                                          [builder.extract_value(out, i) for i in range(n)])

            return ret(arr, idx, off), codegen

        return ldmatrix

    ldmatrix_x1 = _make_ldmatrix(1, False)
    ldmatrix_x2 = _make_ldmatrix(2, False)
    ldmatrix_x4 = _make_ldmatrix(4, False)
    ldmatrix_x1_trans = _make_ldmatrix(1, True)
    ldmatrix_x2_trans = _make_ldmatrix(2, True)
    ldmatrix_x4_trans = _make_ldmatrix(4, True)

    # --- cp.async ---

    def _make_cp_async(nbytes, cache):
        text = f"cp.async.{cache}.shared.global [$0], [$1], {nbytes}, $2;"

        @_intrinsic
        def cp_async(typingctx, sarr, sidx, garr, gidx, valid):
            if not (_is_array(sarr) and _is_int(sidx) and _is_array(garr) and _is_int(gidx)
                    and _is_int(valid)):
                return None

            def codegen(context, builder, signature, args):
                t = signature.args
                dst = _shared_addr(context, builder, t[0], args[0], t[1], args[1])
                src = _global_ptr(context, builder, t[2], args[2], t[3], args[3])
                ok = context.cast(builder, args[4], t[4], _types.boolean)
                size = builder.select(ok, _ir.Constant(_I32, nbytes), _ir.Constant(_I32, 0))
                _asm(builder, _ir.VoidType(), [_I32, src.type, _I32], text, "r,l,r,~{memory}",
                     [dst, src, size], side_effect=True)
                return context.get_dummy_value()

            return _types.void(sarr, sidx, garr, gidx, valid), codegen

        return cp_async

    cp_async16 = _make_cp_async(16, "cg")   # .cg: 16-byte copies may bypass L1
    cp_async4 = _make_cp_async(4, "ca")     # .cg allows only 16 bytes

    def _make_void_asm(text, attrs=()):
        """An argument-free instruction with a memory clobber; attrs: call attributes (e.g. convergent)."""
        @_intrinsic
        def op(typingctx):
            def codegen(context, builder, signature, args):
                _asm(builder, _ir.VoidType(), [], text, "~{memory}", [], side_effect=True, attrs=attrs)
                return context.get_dummy_value()
            return _types.void(), codegen
        return op

    cp_async_commit = _make_void_asm("cp.async.commit_group;")
    # every lane of the warp meets here, and shared-memory accesses before it are ordered before those after
    syncwarp = _make_void_asm("bar.warp.sync -1;", ("convergent",))
    cp_async_wait_all = _make_void_asm("cp.async.wait_all;")

    @_intrinsic
    def cp_async_wait_group(typingctx, n):
        """n: an integer literal (the instruction takes an immediate): a constant in the call, or a
        module-level integer name (frozen as a literal). An expression such as `STAGES - 2` is typed as
        a plain int64 and fails to type: bind it to a module-level name first."""
        if not isinstance(n, _types.IntegerLiteral):
            return None     # Numba retries with the literal type where the argument is a constant
        if n.literal_value < 0:
            raise _TypingError(f"cp_async_wait_group: n = {n.literal_value} < 0")
        text = f"cp.async.wait_group {n.literal_value};"

        def codegen(context, builder, signature, args):
            _asm(builder, _ir.VoidType(), [], text, "~{memory}", [], side_effect=True)
            return context.get_dummy_value()

        return _types.void(n), codegen

    # --- conversions, ex2, stores ---

    def _make_pack(dtype):
        # cvt.rn.{f16x2,bf16x2}.f32 d, a, b puts a in the upper half and b in the lower one
        text = f"cvt.rn.{dtype}x2.f32 $0, $2, $1;"

        @_intrinsic
        def pack(typingctx, lo, hi):
            if not (isinstance(lo, _types.Number) and isinstance(hi, _types.Number)):
                return None

            def codegen(context, builder, signature, args):
                t = signature.args
                ops = [context.cast(builder, v, ty, _types.float32) for v, ty in zip(args, t)]
                return _asm(builder, _I32, [_F32, _F32], text, "=r,f,f", ops, attrs=_PURE)

            return _types.uint32(lo, hi), codegen

        return pack

    pack_f16x2 = _make_pack("f16")
    pack_bf16x2 = _make_pack("bf16")

    @_intrinsic
    def fma(typingctx, a, b, c):
        if not all(isinstance(x, _types.Number) for x in (a, b, c)):
            return None
        t = _types.float64 if _types.float64 in (a, b, c) else _types.float32

        def codegen(context, builder, signature, args):
            vs = [context.cast(builder, v, ty, t) for v, ty in zip(args, signature.args)]
            ft = context.get_value_type(t)
            fn = builder.module.declare_intrinsic("llvm.fma", [ft], _ir.FunctionType(ft, [ft, ft, ft]))
            return builder.call(fn, vs)              # fma.rn.f32 / .f64

        return t(a, b, c), codegen

    def _f32_op(text, result_bits=False):
        """A pure one-operand f32 instruction (`text`: $0 <- $1); result_bits: its result is a .b32
        register (read as the float32 with those bits)."""
        @_intrinsic
        def op(typingctx, x):
            if not isinstance(x, _types.Number):
                return None

            def codegen(context, builder, signature, args):
                v = context.cast(builder, args[0], signature.args[0], _types.float32)
                if result_bits:
                    return builder.bitcast(_asm(builder, _I32, [_F32], text, "=r,f", [v], attrs=_PURE), _F32)
                return _asm(builder, _F32, [_F32], text, "=f,f", [v], attrs=_PURE)

            return _types.float32(x), codegen
        return op

    tf32_round = _f32_op("cvt.rna.tf32.f32 $0, $1;", result_bits=True)
    ex2 = _f32_op("ex2.approx.ftz.f32 $0, $1;")

    @_intrinsic
    def f32_bits(typingctx, x):
        if not isinstance(x, _types.Float):
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(context.cast(builder, args[0], signature.args[0], _types.float32), _I32)

        return _types.uint32(x), codegen

    @_intrinsic
    def st_global_b32(typingctx, garr, gidx, val):
        if not (_is_array(garr) and _is_int(gidx) and _is_int(val)):
            return None

        def codegen(context, builder, signature, args):
            t = signature.args
            p = _global_ptr(context, builder, t[0], args[0], t[1], args[1])
            v = context.cast(builder, args[2], t[2], _types.uint32)
            builder.store(v, builder.bitcast(p, _ir.PointerType(_I32, 1)), align=4)
            return context.get_dummy_value()

        return _types.void(garr, gidx, val), codegen

    @_intrinsic
    def st_shared_b16(typingctx, sarr, hidx, val):
        """Store the 16 bits of `val` (float16 or a 16-bit integer) at halfword `hidx` of a shared array of
        any dtype (the tensor-core path's plain-load fallback writes its 16-bit tiles into a float32 view)."""
        if not (_is_array(sarr) and _is_int(hidx)):
            return None
        if not (val == _types.float16 or (_is_int(val) and getattr(val, "bitwidth", 0) == 16)):
            return None

        def codegen(context, builder, signature, args):
            t = signature.args
            p = _shared_word_ptr(context, builder, t[0], args[0], t[1], args[1], 16)
            builder.store(builder.bitcast(args[2], _ir.IntType(16)), p, align=2)
            return context.get_dummy_value()

        return _types.void(sarr, hidx, val), codegen

    @_intrinsic
    def st_shared_b32(typingctx, sarr, widx, val):
        """Store the 32 bits of integer `val` at word `widx` of a shared array of any 4-byte dtype."""
        if not (_is_array(sarr) and _is_int(widx) and _is_int(val)):
            return None

        def codegen(context, builder, signature, args):
            t = signature.args
            p = _shared_word_ptr(context, builder, t[0], args[0], t[1], args[1], 32)
            builder.store(context.cast(builder, args[2], t[2], _types.uint32), p, align=4)
            return context.get_dummy_value()

        return _types.void(sarr, widx, val), codegen

    @_intrinsic
    def vote_any(typingctx, pred):
        if not _is_int(pred):
            return None
        text = ("{ .reg .pred p, q; setp.ne.u32 p, $1, 0; vote.sync.any.pred q, p, 0xffffffff; "
                "selp.u32 $0, 1, 0, q; }")

        def codegen(context, builder, signature, args):
            v = context.cast(builder, args[0], signature.args[0], _types.uint32)
            r = _asm(builder, _I32, [_I32], text, "=r,r", [v], attrs=_COLLECTIVE_PURE)
            return builder.icmp_unsigned("!=", r, _ir.Constant(_I32, 0))

        return _types.boolean(pred), codegen

    def _red_codegen(n):
        vals = ", ".join(f"${i + 1}" for i in range(n))
        text = (f"red.global.add.v{n}.f32 [$0], {{{vals}}};" if n > 1 else "red.global.add.f32 [$0], $1;")

        def codegen(context, builder, signature, args):
            t = signature.args
            p = _global_ptr(context, builder, t[0], args[0], t[1], args[1])
            ops = [context.cast(builder, v, ty, _types.float32) for v, ty in zip(args[2:], t[2:])]
            _asm(builder, _ir.VoidType(), [p.type] + [_F32] * n, text,
                 ",".join(["l"] + ["f"] * n) + ",~{memory}", [p] + ops, side_effect=True)
            return context.get_dummy_value()

        return codegen

    @_intrinsic
    def red_add_f32(typingctx, garr, gidx, x):
        if not (_is_array(garr) and _is_int(gidx) and isinstance(x, _types.Number)):
            return None
        return _types.void(garr, gidx, x), _red_codegen(1)

    @_intrinsic
    def red_add_f32x2(typingctx, garr, gidx, x, y):
        if not (_is_array(garr) and _is_int(gidx) and isinstance(x, _types.Number)
                and isinstance(y, _types.Number)):
            return None
        return _types.void(garr, gidx, x, y), _red_codegen(2)
