"""Shared test setup: simulator selection, random inputs, tolerances, markers.

NUMBA_ENABLE_CUDASIM must be in the environment before anything imports numba.cuda, so it is decided here,
at the top of the first module pytest imports, by numba_flash.runtime (the same decision the package's
command line and benchmark make): the simulator unless a GPU answers numba.cuda (an explicit
NUMBA_ENABLE_CUDASIM in the environment always wins).

Inputs are fresh random numbers on every run. Each test that takes the `rng` fixture prints its seed, so a
failure shows it under "Captured stdout setup"; NUMBA_FLASH_TEST_SEED=<seed> replays it.
"""
import math
import os

from numba_flash import runtime

if not runtime.select() and runtime.SIM_ENV in os.environ and not runtime.gpu_present():
    import pytest as _pytest
    raise _pytest.UsageError(
        f"{runtime.SIM_ENV}={os.environ[runtime.SIM_ENV]!r} asks for a GPU, but numba.cuda finds "
        f"none here: unset it (or set it to 1) to run the tests under Numba's CUDA simulator")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import numba_flash  # noqa: E402
from numba_flash.kernels import configs  # noqa: E402

SIMULATOR = numba_flash.SIMULATOR

try:
    import torch
except ImportError:  # pragma: no cover - torch is installed wherever these tests run
    torch = None

# Relative error ||out - ref|| / ||ref|| (float64) allowed against the float64 reference. float32: the
# kernels accumulate in float32, so the error is a few ulps of float32 (~1e-7) times a small growth factor.
# float16 / bfloat16: the inputs are exact in both; the error is the rounding of the output (bfloat16:
# 2^-9 relative per element) and, in the backward pass, of O and dO in D = rowsum(dO * O).
TOL = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2, "float64": 1e-10}
# float32 gradients sum Nq (dK, dV) or Nk (dQ) products of already-rounded P and dS, so they carry a few
# more rounding steps than the output; measured ~3e-7 at test sizes, 2e-5 leaves room for long sequences.
TOL_BWD = dict(TOL, float32=2e-5)

# Frameworks the kernels accept here: host arrays under the simulator, device arrays on a GPU.
if SIMULATOR:
    FRAMEWORKS = ["numpy", "torch"]
    DEFAULT_FW = "numpy"
else:
    FRAMEWORKS = ["torch", "cupy", "numba"]
    DEFAULT_FW = "torch"

# Head dims every run covers, and the larger ones only the GPU (where they are cheap) adds.
HEADDIMS = [16, 24, 32] if SIMULATOR else [16, 24, 32, 40, 64, 80, 96, 128, 160, 256]


def gpu_capability():
    """(major, minor) of the current GPU; None under the simulator."""
    if SIMULATOR:
        return None
    from numba import cuda
    try:
        return tuple(cuda.get_current_device().compute_capability)
    except Exception:       # no usable device (a child process that only generates code)
        return (0, 0)


def mask_tile(headdim=32, dtype="float32", backend=None):
    """(Br, Bc) every block size must be a multiple of, on the path `backend` picks for `dtype` here."""
    cap = gpu_capability()
    return configs.mask_tile(configs.resolve_backend(backend, dtype, cap), headdim)


def block_sizes(headdim=32, dtype="float32", backend=None):
    """Two valid square BlockMask block sizes: the smallest one (a multiple of both tile sides, 16 or 32 under
    the simulator, 64 or 128 on a GPU) and twice it."""
    b = math.lcm(*mask_tile(headdim, dtype, backend))
    return b, 2 * b


# --------------------------------------------------------------------------------------------------
# markers
# --------------------------------------------------------------------------------------------------

def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a real CUDA GPU (skipped under the simulator)")
    config.addinivalue_line("markers", "slow: larger sizes; run on the GPU only")


def pytest_collection_modifyitems(config, items):
    if not SIMULATOR:
        return
    skip_gpu = pytest.mark.skip(reason="needs a real GPU (running under the CUDA simulator)")
    skip_slow = pytest.mark.skip(reason="large sizes run on the GPU only (running under the CUDA simulator)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        elif "slow" in item.keywords:
            item.add_marker(skip_slow)


# --------------------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------------------

def as64(x):
    """float64 numpy copy of a numpy / torch / CuPy / Numba array (bfloat16 included)."""
    if type(x).__module__.startswith("torch"):
        return x.detach().to("cpu").double().numpy()
    if type(x).__module__.startswith("cupy"):
        x = x.get()
    elif hasattr(x, "copy_to_host"):
        x = x.copy_to_host()
    return np.asarray(x, dtype=np.float64)


def rel_err(a, ref):
    """||a - ref|| / ||ref|| in float64; inf if either holds a NaN or an infinity, so a NaN fails."""
    a, ref = as64(a), as64(ref)
    assert a.shape == ref.shape, f"shape {a.shape} != reference shape {ref.shape}"
    if not (np.isfinite(a).all() and np.isfinite(ref).all()):
        return math.inf
    den = np.linalg.norm(ref)
    num = np.linalg.norm(a - ref)
    return float(num / den) if den > 0 else float(num)


def assert_close(a, ref, dtype, what="out", tol=None):
    tol = TOL[dtype] if tol is None else tol
    err = rel_err(a, ref)
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol:g} ({dtype})"


def assert_lse_close(lse, ref_lse, dtype="float32"):
    """-inf exactly where the reference has -inf (rows that see no key), close elsewhere."""
    lse, ref_lse = as64(lse), as64(ref_lse)
    assert lse.shape == ref_lse.shape
    empty = np.isneginf(ref_lse)
    np.testing.assert_array_equal(np.isneginf(lse), empty, err_msg="lse is -inf exactly on rows that see no key")
    # lse is float32 for every input dtype but float64, so its tolerance is float32's (float64's for float64).
    # The backward uses lse as P = exp(S - lse), so what matters is its error relative to max(|lse|, 1):
    # an absolute error e scales P by exp(e) ~ 1 + e. A plain relative error is ill-posed for an lse near
    # 0 (one key whose score is ~0: seen at 3e-5 relative for an absolute error of 1e-7).
    tol = TOL["float64"] if dtype == "float64" else TOL["float32"]
    a, r = lse[~empty], ref_lse[~empty]
    err = float(np.max(np.abs(a - r) / np.maximum(np.abs(r), 1.0))) if a.size else 0.0
    if np.isnan(err):
        err = np.inf
    assert err < tol, f"lse: error {err:.3g} relative to max(|lse|, 1) >= {tol:g}"


# --------------------------------------------------------------------------------------------------
# random inputs
# --------------------------------------------------------------------------------------------------

@pytest.fixture
def rng():
    """A fresh generator per test; its seed is printed (shown with a failure) and replayable."""
    env = os.environ.get("NUMBA_FLASH_TEST_SEED")
    seed = int(env) if env else int.from_bytes(os.urandom(8), "little")
    print(f"random seed: {seed}   (replay with NUMBA_FLASH_TEST_SEED={seed})")
    return np.random.default_rng(seed)


_TORCH_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "float64": "float64"}


def torch_dtype(dtype):
    return getattr(torch, _TORCH_DTYPES[dtype])


def from_numpy(a, dtype, framework):
    """A float64 numpy array as `framework`'s array of `dtype`, on the device the kernels run on."""
    if framework == "torch":
        t = torch.from_numpy(np.ascontiguousarray(a)).to(torch_dtype(dtype))
        return t if SIMULATOR else t.cuda()
    if dtype == "bfloat16":
        pytest.skip(f"{framework} has no bfloat16 dtype")
    a = np.ascontiguousarray(a.astype(dtype))
    if framework == "numpy":
        return a
    if framework == "cupy":
        cupy = pytest.importorskip("cupy")
        return cupy.asarray(a)
    if framework == "numba":
        from numba import cuda
        return cuda.to_device(a)
    raise ValueError(f"unknown framework {framework!r}")


def random_array(rng, shape, dtype, framework):
    """Standard normal values, none of them zero (a zero would hide a missing write)."""
    a = rng.standard_normal(shape)
    a[a == 0] = 1.0
    return from_numpy(a, dtype, framework)


def _transpose12(x):
    """(B, H, N, d) <-> (B, N, H, d) as a view, in any framework."""
    if type(x).__module__.startswith("torch"):
        return x.transpose(1, 2)
    if hasattr(x, "swapaxes") and not hasattr(x, "copy_to_host"):
        return x.swapaxes(1, 2)
    from numba_flash.functional import _numba_swap  # numba device arrays have no 4-d transposing view
    return _numba_swap(x)


LAYOUTS = ["bshd", "bhsd", "qkvpacked", "kvpacked"]


def make_qkv_arrays(rng, B, Nq, Nk, H, d, dtype="float32", framework=None, layout="bshd"):
    """Random (q, k, v) in (batch, seqlen, nheads, headdim) order, as views of the given memory layout.

    layout: "bshd" contiguous; "bhsd" transposed views of (B, H, N, d) tensors (what SDPA passes down);
    "qkvpacked" slices [:, :, i] of one (B, N, 3, H, d) tensor (needs Nq == Nk); "kvpacked" q contiguous,
    k and v slices of one (B, Nk, 2, H, d) tensor.
    """
    framework = framework or DEFAULT_FW
    if layout == "bshd":
        return tuple(random_array(rng, (B, n, H, d), dtype, framework) for n in (Nq, Nk, Nk))
    if layout == "bhsd":
        return tuple(_transpose12(random_array(rng, (B, H, n, d), dtype, framework)) for n in (Nq, Nk, Nk))
    if layout == "qkvpacked":
        assert Nq == Nk, "a packed qkv tensor needs seqlen_q == seqlen_k"
        qkv = random_array(rng, (B, Nq, 3, H, d), dtype, framework)
        return tuple(qkv[:, :, i] for i in range(3))
    if layout == "kvpacked":
        q = random_array(rng, (B, Nq, H, d), dtype, framework)
        kv = random_array(rng, (B, Nk, 2, H, d), dtype, framework)
        return (q,) + tuple(kv[:, :, i] for i in range(2))
    raise ValueError(f"unknown layout {layout!r}")


@pytest.fixture
def make_qkv(rng):
    """make_qkv(B, Nq, Nk, H, d, dtype="float32", framework=None, layout="bshd") -> (q, k, v)."""
    def make(B, Nq, Nk, H, d, dtype="float32", framework=None, layout="bshd"):
        return make_qkv_arrays(rng, B, Nq, Nk, H, d, dtype, framework, layout)
    return make


@pytest.fixture
def make_like(rng):
    """make_like(shape, dtype, framework=None): one more random array (dout, say)."""
    def make(shape, dtype="float32", framework=None):
        return random_array(rng, shape, dtype, framework or DEFAULT_FW)
    return make


def poison(shape, dtype="float32", framework=None):
    """An output buffer filled with NaN, so an element the kernel forgets to write fails the comparison.

    For bfloat16 outside torch (numpy / Numba storage is uint16), the NaN is the bfloat16 bit pattern 0x7FC0.
    """
    framework = framework or DEFAULT_FW
    if framework == "torch":
        dev = "cpu" if SIMULATOR else "cuda"
        return torch.full(shape, float("nan"), dtype=torch_dtype(dtype), device=dev)
    if dtype == "bfloat16":
        a = np.full(shape, 0x7FC0, dtype=np.uint16)
    else:
        a = np.full(shape, np.nan, dtype=dtype)
    if framework == "numpy":
        return a
    if framework == "cupy":
        import cupy
        return cupy.asarray(a)
    from numba import cuda
    return cuda.to_device(a)


def lse_dtype(dtype):
    return "float64" if dtype == "float64" else "float32"


def copy(x):
    """A contiguous copy in the same framework (torch: .contiguous(); numpy/CuPy: ascontiguousarray)."""
    if type(x).__module__.startswith("torch"):
        return x.clone(memory_format=torch.contiguous_format)
    if type(x).__module__.startswith("cupy"):
        import cupy
        return cupy.ascontiguousarray(x)
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x).copy()
    from numba import cuda
    return cuda.to_device(np.ascontiguousarray(x.copy_to_host()))


def host_raw(x):
    """Bitwise host copy (bfloat16 as its bits), for bitwise comparisons."""
    if type(x).__module__.startswith("torch"):
        t = x.detach().to("cpu")
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        return t.numpy().copy()
    if type(x).__module__.startswith("cupy"):
        return x.get()
    if hasattr(x, "copy_to_host"):
        return x.copy_to_host()
    return np.array(x, copy=True)


def assert_bitwise_equal(a, b, what="arrays"):
    a, b = host_raw(a), host_raw(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    # view as integers so NaN payloads and signed zeros count too
    ia = a.view(np.dtype(f"u{a.dtype.itemsize}"))
    ib = b.view(np.dtype(f"u{b.dtype.itemsize}"))
    n = int((ia != ib).sum())
    assert n == 0, f"{what}: {n} of {ia.size} elements differ bitwise"
