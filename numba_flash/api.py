"""Validation and dispatch: validate -> plan -> allocate -> launch.

The low-level functions here take and return arrays of any supported framework (torch, CuPy, Numba device
arrays; numpy and CPU torch tensors under the simulator) and do no autograd; `autograd.py` wraps them for
torch. Layout is (batch, seqlen, nheads, headdim), any strides with a contiguous last dim. Which path runs
and with which tiles is the plan's business (kernels/configs.py); how a pass is launched is its kernel
module's (kernels/forward.py, kernels/backward.py).
"""
import math
import numbers
from dataclasses import dataclass

import numpy as np

from . import interop
from .blocksparse import BlockMask
from .kernels import backward, configs, forward
from .kernels.configs import BACKENDS  # noqa: F401  (public: numba_flash.BACKENDS)
from .kernels.convert import DTYPES
from .kernels.launch import SIMULATOR

CAUSAL_ALIGNS = ("bottom_right", "top_left")


@dataclass(frozen=True)
class Problem:
    batch: int
    seqlen_q: int
    seqlen_k: int
    nheads: int
    headdim: int
    dtype: str
    framework: str
    device: object


@dataclass(frozen=True)
class MaskLists:
    """A block mask's lists as arrays of any framework (see docs/CONTRACTS.md), with its block size."""
    kv_count: object
    kv_index: object
    q_count: object
    q_index: object
    block_q: int
    block_k: int

    @property
    def block_size(self):
        """(block_q, block_k), as BlockMask.block_size (path_of reads either)."""
        return self.block_q, self.block_k


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------

def _check_device(name, fw, dev):
    if SIMULATOR:
        if dev != "cpu":
            raise ValueError(f"{name} is on CUDA device {dev}, but numba_flash runs under the CUDA "
                             f"simulator (NUMBA_ENABLE_CUDASIM=1): pass host arrays")
    elif dev == "cpu":
        raise ValueError(f"{name} is on the host ({fw}); numba_flash runs on the GPU: move it to a CUDA "
                         f"device (or run under the simulator with NUMBA_ENABLE_CUDASIM=1)")


def check_qkv(q, k, v):
    """Problem of a (q, k, v) call; TypeError / ValueError naming the argument for anything unsupported."""
    return _check_qkv(q, k, v)[0]


def _check_qkv(q, k, v):
    """(Problem, the interop.describe of q, k and v): each array is described once per call."""
    descs, full = {}, []
    for name, x in (("q", q), ("k", k), ("v", v)):
        desc = interop.describe(x, name)
        full.append(desc)
        fw, shape, strides, dtype, dev = desc
        if len(shape) != 4:
            raise ValueError(f"{name} must have shape (batch, seqlen, nheads, headdim), got {shape}")
        if dtype not in DTYPES:
            raise TypeError(f"{name} has dtype {dtype}; supported: {', '.join(DTYPES)}")
        if shape[3] > 1 and strides[3] != 1 and 0 not in shape:   # an empty array has no layout to obey
            raise ValueError(f"{name} must be contiguous in its last (headdim) dim, got strides {strides}")
        _check_device(name, fw, dev)
        descs[name] = (fw, shape, dtype, dev)
    fq, sq, dq, devq = descs["q"]
    for name in ("k", "v"):
        fw, s, dt, dev = descs[name]
        if fw != fq:
            raise TypeError(f"{name} is a {fw} array but q is a {fq} array")
        if dev != devq:
            raise ValueError(f"{name} is on device {dev} but q is on device {devq}")
        if dt != dq:
            raise TypeError(f"{name} has dtype {dt} but q has dtype {dq}")
        if s[0] != sq[0]:
            raise ValueError(f"{name} has batch {s[0]} but q has batch {sq[0]}")
        if s[2] != sq[2]:
            raise ValueError(f"{name} has {s[2]} heads but q has {sq[2]}")
        if s[3] != sq[3]:
            raise ValueError(f"{name} has head dim {s[3]} but q has head dim {sq[3]}")
    if descs["k"][1][1] != descs["v"][1][1]:
        raise ValueError(f"k has seqlen {descs['k'][1][1]} but v has seqlen {descs['v'][1][1]}")
    d = sq[3]
    if not configs.MIN_HEADDIM <= d <= configs.MAX_HEADDIM:
        raise ValueError(f"q, k, v have head dim {d} (their last dim), which is not supported: numba_flash "
                         f"supports head dims {configs.MIN_HEADDIM}..{configs.MAX_HEADDIM}")
    if dq == "bfloat16" and fq == "cupy":
        raise TypeError("q: CuPy has no bfloat16 dtype")
    return Problem(sq[0], sq[1], descs["k"][1][1], sq[2], d, dq, fq, devq), full


def check_scale(softmax_scale, headdim):
    if softmax_scale is None:
        return 1.0 / math.sqrt(headdim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale must be a real number, got {type(softmax_scale).__name__}")
    s = float(softmax_scale)
    if not math.isfinite(s):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    return s


def check_bool(name, value):
    """A flag must be a bool (numpy's included): causal='False' would otherwise mean causal."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def causal_offset(causal, causal_align, seqlen_q, seqlen_k):
    """Key c is visible to query r iff c <= r + offset (bottom-right: offset = seqlen_k - seqlen_q)."""
    causal = check_bool("causal", causal)
    if causal_align not in CAUSAL_ALIGNS:
        raise ValueError(f"causal_align must be one of {CAUSAL_ALIGNS}, got {causal_align!r}")
    if not causal:
        return 0
    return seqlen_k - seqlen_q if causal_align == "bottom_right" else 0


def _check_out(name, x, p, shape, dtype, contiguous=False):
    """Check an output (or a saved forward array) against problem p; returns its interop.describe."""
    desc = fw, s, strides, dt, dev = interop.describe(x, name)
    if fw != p.framework or dev != p.device:
        raise ValueError(f"{name} must be a {p.framework} array on device {p.device}, got {fw} on {dev}")
    if s != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {s}")
    if dt != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {dt}")
    if 0 in s:          # no elements: any strides will do (out.sum()'s gradient of an empty out: all 0)
        return desc
    if contiguous:
        expect = _contiguous_strides(shape)
        if any(n > 1 and st != e for n, st, e in zip(s, strides, expect)):
            raise ValueError(f"{name} must be C-contiguous, got strides {strides}")
    elif s[-1] > 1 and strides[-1] != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {strides}")
    return desc


def _contiguous_strides(shape):
    """C-contiguous element strides of `shape`."""
    strides, n = [], 1
    for dim in reversed(shape):
        strides.append(n)
        n *= dim
    return tuple(reversed(strides))


def _new_array(p, shape, dtype):
    """(array, its interop.describe): a fresh C-contiguous array of p's framework and device."""
    x = interop.empty_like_framework(p.framework, p.device, shape, dtype)
    return x, (p.framework, tuple(shape), _contiguous_strides(shape), dtype, p.device)


def lse_dtype(dtype):
    return "float64" if dtype == "float64" else "float32"


# --------------------------------------------------------------------------------------------------
# plans and tile lists
# --------------------------------------------------------------------------------------------------

_capabilities = {}


def capability_of(p):
    """(major, minor) of problem p's GPU; None under the simulator."""
    if SIMULATOR or p.device == "cpu":
        return None
    cap = _capabilities.get(p.device)
    if cap is None:
        from numba import cuda
        cap = _capabilities[p.device] = tuple(cuda.gpus[p.device].compute_capability)
    return cap


def path_of(p, backend, block_mask=None, pass_="fwd", memo=None):
    """The kernel path for problem p's pass ("fwd" or "bwd"): configs.resolve_backend with the device's
    compute capability. Where only the default (not an explicit backend) chose "wgmma" and the block
    mask's blocks are not multiples of its tiles, "mma" (whose tiles are smaller) runs instead.
    memo: a dict one call shares between its path_of and validate_block_mask (see _mask_tile)."""
    cap = capability_of(p)
    path = configs.resolve_backend(backend, p.dtype, cap, p.headdim, pass_)
    if path == "wgmma" and block_mask is not None and configs.resolve_backend(backend, p.dtype, cap) != "wgmma":
        br, bc = _mask_tile("wgmma", p.headdim, memo)
        bq, bk = block_mask.block_size
        if bq % br or bk % bc:
            path = "mma"
    return path


def _aligned(path, p, *views):
    """Whether every row of every view given (the inputs, and the outputs the kernels store in pairs)
    starts on the path's vector boundary (configs.vector_elems)."""
    n = configs.vector_elems(path)
    return p.dtype != "float64" and p.headdim % n == 0 and all(v.aligned(n) for v in views)


def _mask_tile(path, headdim, memo=None):
    """configs.mask_tile, asked once per path within one call when the call passes a `memo` dict (each
    answer reads the tile overrides from the environment: microseconds that add up on every call)."""
    if memo is None:
        return configs.mask_tile(path, headdim)
    t = memo.get(path)
    if t is None:
        t = memo[path] = configs.mask_tile(path, headdim)
    return t


def validate_block_mask(block_mask, p, path, memo=None):
    if block_mask is None or isinstance(block_mask, MaskLists):
        return
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a numba_flash.BlockMask, got {type(block_mask).__name__}")
    block_mask.check(p.nheads, p.seqlen_q, p.seqlen_k, _mask_tile(path, p.headdim, memo))


_dense_lists = {}


def mask_lists_of(block_mask, p):
    """MaskLists on p's device for a BlockMask (cached on the mask) or a MaskLists (passed through)."""
    if isinstance(block_mask, MaskLists):
        return block_mask
    cached = block_mask._device_cache.get(p.device)
    if cached is None:
        cached = tuple(interop.to_device_like(a, p.framework, p.device)
                       for a in (block_mask.kv_count, block_mask.kv_index,
                                 block_mask.q_count, block_mask.q_index))
        block_mask._device_cache[p.device] = cached
    return MaskLists(*cached, *block_mask.block_size)


class TileLists:
    """The lists a kernel walks (kernels/walk.py), for the tiles it is compiled with.

    Dense attention is a block mask with one block covering everything: [[1]] / [[[0]]], that block
    spanning all Tr x Tc tiles. `lists(br, bc, transpose)` returns the kernel arguments (count, index,
    mask head stride, list width, q tiles per block, k tiles per block); transpose: the per-key-block
    lists of the dK/dV kernel.
    """

    def __init__(self, p, block_mask):
        self.p = p
        if block_mask is None:
            views = _dense_lists.get(p.device)
            if views is None:
                one, zero = np.ones((1, 1), np.int32), np.zeros((1, 1, 1), np.int32)
                views = _dense_lists[p.device] = tuple(
                    interop.flat_view(interop.to_device_like(a, p.framework, p.device), "block_mask")
                    for a in (one, zero, one, zero))
            self.views, self.block = views, None
        else:
            ml = mask_lists_of(block_mask, p)
            self.views = _list_views(ml)
            self.block = (ml.block_q, ml.block_k)

    def lists(self, br, bc, transpose):
        cv, iv = self.views[2:] if transpose else self.views[:2]
        if self.block is None:
            tq, tk = -(-self.p.seqlen_q // br), -(-self.p.seqlen_k // bc)
            return cv.flat, iv.flat, 0, 1, max(tq, 1), tk
        hm, rows = cv.shape
        return cv.flat, iv.flat, rows if hm > 1 else 0, iv.shape[2], self.block[0] // br, self.block[1] // bc


_LIST_VIEWS_KEPT = 64
_list_views_cache = {}      # ids of the four list arrays -> (the arrays, their views)


def _list_views(ml):
    """The Views of a MaskLists' four arrays. Kept for the last _LIST_VIEWS_KEPT list sets, keyed by the
    arrays' identities (a BlockMask's device copies, or autograd's tensors, are the same objects call
    after call); the entry holds the arrays, so an id in the cache is never a dead object's."""
    arrays = (ml.kv_count, ml.kv_index, ml.q_count, ml.q_index)
    key = tuple(map(id, arrays))
    hit = _list_views_cache.get(key)
    if hit is not None:
        return hit[1]
    views = tuple(interop.flat_view(a, "block_mask") for a in arrays)
    while len(_list_views_cache) >= _LIST_VIEWS_KEPT:     # the oldest first (another thread may be here too)
        try:
            _list_views_cache.pop(next(iter(_list_views_cache)), None)
        except (StopIteration, RuntimeError):
            break
    _list_views_cache[key] = (arrays, views)
    return views


def _alloc(p):
    """Scratch of the inputs' framework (uninitialised: the kernels that need zeros write them)."""
    def alloc(shape, dtype):
        return interop.flat_view(interop.empty_like_framework(p.framework, p.device, shape, dtype), "scratch")
    return alloc


# --------------------------------------------------------------------------------------------------
# forward / backward
# --------------------------------------------------------------------------------------------------

def flash_attn_forward(q, k, v, *, softmax_scale=None, causal=False, causal_align="bottom_right",
                       block_mask=None, out=None, lse=None, backend=None):
    """FlashAttention forward: `(out, lse)` of softmax(softmax_scale * Q K^T) V, without autograd.

    Args:
        q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads, headdim). torch tensors,
            CuPy arrays or Numba device arrays on one GPU (numpy arrays / CPU tensors under the
            simulator), all float32, float16, bfloat16 or float64; any strides with the last dim contiguous.
            headdim 16..256.
        softmax_scale: float, default 1/sqrt(headdim).
        causal: mask keys right of the diagonal. causal_align: "bottom_right" (flash-attn >= 2.1: query r
            sees key c iff c <= r + seqlen_k - seqlen_q) or "top_left" (torch SDPA: c <= r).
        block_mask: optional `BlockMask`; only its nonzero blocks are computed.
        out: optional preallocated (batch, seqlen_q, nheads, headdim) output, input dtype.
        lse: optional preallocated C-contiguous (batch, nheads, seqlen_q) float32 (float64 for float64 inputs).
        backend: "auto" (default; None reads NUMBA_FLASH_BACKEND), "simt", "mma", "wgmma" or "tf32". "auto" runs
            float16 / bfloat16 on tensor cores (mma.sync, compute capability >= 8.0; on a cc 9.0 GPU
            Hopper's wgmma instead where it measured faster: the forward for 64 <= headdim <= 128, the
            backward for 64 <= headdim <= 128) and everything else on the SIMT kernels (fp32
            arithmetic; float64 in float64); "mma" insists on mma.sync tensor cores (float16 / bfloat16
            only), "wgmma" on warpgroup MMA (cc 9.0 only; the backward past headdim 128 on mma.sync),
            "simt" on CUDA cores. "tf32" (opt-in; float32 inputs, cc 9.0, headdim <= 128): the forward
            on tensor cores at float32 accuracy by split TF32 (three tf32 products per product; K and
            V are split once into scratch of 4x K's size, freed after the call; its backward runs the
            SIMT kernels).

    Returns:
        (out, lse), arrays of the inputs' framework. lse is the natural-log log-sum-exp of each row's scaled
        scores. A row that sees no key (causal with seqlen_q > seqlen_k, or empty mask blocks) gets
        out = 0 and lse = -inf. NaN is never turned into a number: a NaN in q makes its row NaN, a NaN in
        k the rows that attend to it; a NaN in v reaches those rows and, as in any attention computed
        by matrix products (PyTorch's included), possibly rows of the same tile that mask it out
        (0 * NaN = NaN).
    """
    return forward_checked(_check_qkv(q, k, v), q, k, v, softmax_scale, causal, causal_align, block_mask, out,
                           lse, backend)


def forward_checked(checked, q, k, v, softmax_scale=None, causal=False, causal_align="bottom_right",
                    block_mask=None, out=None, lse=None, backend=None):
    """flash_attn_forward after its q, k, v checks: `checked` is `_check_qkv(q, k, v)`, which the torch
    wrapper (functional.py) has made already (every check on one call costs host time)."""
    p, descs = checked
    scale = check_scale(softmax_scale, p.headdim)
    offset = causal_offset(causal, causal_align, p.seqlen_q, p.seqlen_k)
    memo = {}
    path = path_of(p, backend, block_mask, memo=memo)
    validate_block_mask(block_mask, p, path, memo)
    B, Nq, H, d = p.batch, p.seqlen_q, p.nheads, p.headdim
    if out is None:
        out, out_desc = _new_array(p, (B, Nq, H, d), p.dtype)
    else:
        out_desc = _check_out("out", out, p, (B, Nq, H, d), p.dtype)
    if lse is None:
        lse, lse_desc = _new_array(p, (B, H, Nq), lse_dtype(p.dtype))
    else:
        lse_desc = _check_out("lse", lse, p, (B, H, Nq), lse_dtype(p.dtype), contiguous=True)
    if B * H * Nq == 0:
        return out, lse

    views = [interop.flat_view(x, n, desc) for x, n, desc in
             ((q, "q", descs[0]), (k, "k", descs[1]), (v, "v", descs[2]), (out, "out", out_desc),
              (lse, "lse", lse_desc))]
    plan = configs.forward_plan(path, d, p.dtype, causal, _aligned(path, p, *views[:4]), scale > 0,
                                sparse=block_mask is not None)
    with _on_device(p):
        forward.launch(plan, interop.launch_stream(p.framework, p.device), *views, Nq, p.seqlen_k, scale,
                       offset, TileLists(p, block_mask))
    return out, lse


def flash_attn_backward(dout, q, k, v, out, lse, *, softmax_scale=None, causal=False,
                        causal_align="bottom_right", block_mask=None, dq=None, dk=None, dv=None, backend=None,
                        deterministic=True, dlse=None):
    """FlashAttention backward: `(dq, dk, dv)` given dout = dL/dout and the forward's `out` and `lse`.

    Shapes and dtypes as `flash_attn_forward` (dout, out: like q; lse: C-contiguous (batch, nheads,
    seqlen_q)); softmax_scale, causal, causal_align and block_mask must be those of the forward call;
    backend as there. dq, dk, dv: optional preallocated outputs shaped like q, k, v. Rows that saw no
    key contribute nothing.

    dlse: optional dL/dlse, C-contiguous like lse, for a loss that uses the log-sum-exp too (merging
    partial attentions, say). Since d lse_r / d S_rc = P_rc, it enters as dS = P * (dP - D + dlse): the
    kernels subtract it from D = rowsum(dO * O) and cost nothing more.

    deterministic: True (default): the same inputs give bitwise the same gradients: a separate dQ
        kernel writes every dQ element once (it recomputes S and dP, 7 tile products per tile pair
        instead of 5). False: on tensor cores the dK/dV kernel adds its share of dQ into a float32
        accumulator with unordered atomics, as flash-attn does: 5 products, and the last bits of dq
        vary from run to run. On tensor cores (mma.sync, and wgmma at head dims 32-64 and 128 where its
        tiles allow it); the SIMT kernels are deterministic either way. Not always faster: on an H200
        the wgmma variant was 5-12% faster than the deterministic backward at N = 16k, even at 4k,
        10-15% slower at 1k (benchmarks/results/h200-2026-12-04b-fp16.md); on an H100, since the
        deterministic kernels copy by TMA, 1-5% slower at N = 4k, 12-21% causal
        (benchmarks/results/h100-2026-12-06d-bwd-tma-tests-tuning.md).
    """
    return backward_checked(_check_qkv(q, k, v), dout, q, k, v, out, lse, softmax_scale, causal, causal_align,
                            block_mask, dq, dk, dv, backend, deterministic, dlse)


def backward_checked(checked, dout, q, k, v, out, lse, softmax_scale=None, causal=False,
                     causal_align="bottom_right", block_mask=None, dq=None, dk=None, dv=None, backend=None,
                     deterministic=True, dlse=None):
    """flash_attn_backward after its q, k, v checks: `checked` is `_check_qkv(q, k, v)` (autograd's backward
    takes it from the forward call, whose q, k, v it saved)."""
    p, (q_desc, k_desc, v_desc) = checked
    scale = check_scale(softmax_scale, p.headdim)
    offset = causal_offset(causal, causal_align, p.seqlen_q, p.seqlen_k)
    memo = {}
    path = path_of(p, backend, block_mask, "bwd", memo)
    validate_block_mask(block_mask, p, path, memo)
    B, Nq, Nk, H, d = p.batch, p.seqlen_q, p.seqlen_k, p.nheads, p.headdim
    dout_desc = _check_out("dout", dout, p, (B, Nq, H, d), p.dtype)
    out_desc = _check_out("out", out, p, (B, Nq, H, d), p.dtype)
    lse_desc = _check_out("lse", lse, p, (B, H, Nq), lse_dtype(p.dtype), contiguous=True)
    if dlse is not None:
        dlse_desc = _check_out("dlse", dlse, p, (B, H, Nq), lse_dtype(p.dtype), contiguous=True)
    outs = []
    for name, x, n in (("dq", dq, Nq), ("dk", dk, Nk), ("dv", dv, Nk)):
        if x is None:
            outs.append(_new_array(p, (B, n, H, d), p.dtype))
        else:
            outs.append((x, _check_out(name, x, p, (B, n, H, d), p.dtype)))
    (dq, dq_desc), (dk, dk_desc), (dv, dv_desc) = outs
    if B * H == 0 or (Nq == 0 and Nk == 0):
        return dq, dk, dv

    views = [interop.flat_view(x, n, desc) for x, n, desc in
             ((dout, "dout", dout_desc), (q, "q", q_desc), (k, "k", k_desc), (v, "v", v_desc),
              (out, "out", out_desc), (lse, "lse", lse_desc), (dq, "dq", dq_desc), (dk, "dk", dk_desc),
              (dv, "dv", dv_desc))]
    dlse_view = None if dlse is None else interop.flat_view(dlse, "dlse", dlse_desc)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    lists = TileLists(p, block_mask)
    plan = configs.backward_plan(path, d, p.dtype, causal, _aligned(path, p, *views[:4], *views[6:]),
                                 deterministic, capability_of(p), lists.block[1] if lists.block else None)
    with _on_device(p):
        backward.launch(plan, interop.launch_stream(p.framework, p.device), *views, Nq, Nk, scale, offset,
                        lists, _alloc(p), dlse_view)
    return dq, dk, dv


class _on_device:
    """Make the arrays' device's primary context current for the launch (a no-op under the simulator, and
    when it already is current: torch and Numba share the primary context, so it usually is)."""

    def __init__(self, p):
        self.dev = None if SIMULATOR or p.device == "cpu" else p.device
        self._cm = None

    def __enter__(self):
        if self.dev is None:
            return
        from .kernels import driverlaunch
        if driverlaunch.libcuda() is not None and driverlaunch.current_context() == _primary_context(self.dev):
            return
        from numba import cuda
        self._cm = cuda.gpus[self.dev]
        self._cm.__enter__()

    def __exit__(self, *exc):
        if self._cm is not None:
            self._cm.__exit__(*exc)


_primary = {}


def _primary_context(dev):
    """The handle (int) of device dev's primary context, which Numba and torch both use."""
    h = _primary.get(dev)
    if h is None:
        from numba import cuda
        h = _primary[dev] = int(cuda.gpus[dev].get_primary_context().handle)
    return h
