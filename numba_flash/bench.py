"""Benchmark numba_flash against PyTorch attention on one GPU.

Implementations (table columns):

    numba_flash      numba_flash.flash_attn_func(q, k, v, causal=...) on (B, N, H, d) tensors
    naive            matmul -> softmax -> matmul in the input dtype (PyTorch)
    sdpa_flash       F.scaled_dot_product_attention under SDPBackend.FLASH_ATTENTION
    sdpa_efficient   ... under SDPBackend.EFFICIENT_ATTENTION
    sdpa_cudnn       ... under SDPBackend.CUDNN_ATTENTION
    flex             FlexAttention through torch.compile (opt in: --impl ...,flex)

PyTorch implementations get the ``q.transpose(1, 2)`` views, shape (B, H, N, d), of the same
(B, N, H, d) leaf tensors, and return ``out.transpose(1, 2)``, so one ``dout`` and one set of leaves
serve every implementation. A backend that refuses a configuration (flash with float32, ...) is
reported as ``n/a``; one that runs out of memory (naive attention at large N) as ``OOM``.

Timing follows /work/.library/device/METHOD.md: CUDA events, warm-up, median of many repetitions
(``triton.testing.do_bench(return_mode="median")`` when triton imports, else an equivalent event loop),
L2 flushed between repetitions, random inputs. The forward pass runs with autograd recording, as in
training. TFLOP/s count ``4 B H N^2 d`` per forward (halved when causal), x2.5 for the backward
pass, x3.5 for forward+backward. "Peak extra memory" is torch's ``max_memory_allocated`` during one
forward minus what was allocated before it (inputs excluded, output included); numba_flash
allocates its outputs through torch, so the counters see them.

Usage::

    python -m numba_flash.bench                       # the full sweep (the issue's table)
    python -m numba_flash.bench --quick --check --out benchmarks/results/quick
    python -m numba_flash.bench --d 64 --seqlen 4096 --dtype float16 --causal 0 --pass fwd \\
        --impl numba_flash,sdpa_flash
    python -m numba_flash.bench --sparse              # block-sparse: time vs density
    NUMBA_ENABLE_CUDASIM=1 python -m numba_flash.bench --simulate   # no GPU: tiny, timings meaningless

The functions (``make_inputs``, ``make_forward``, ``measure_config``, ``check_config``,
``format_sweep``...) are importable; ``numba_flash.__main__`` and ``benchmarks/`` reuse them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib.metadata
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import numba_flash

IMPLS = ("numba_flash", "naive", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "flex")
DEFAULT_IMPLS = IMPLS[:-1]  # flex compiles per shape (minutes over the full sweep): opt in
PASSES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}

FULL_SWEEP = dict(d=(64, 128), seqlen=(512, 1024, 2048, 4096, 8192, 16384),
                  dtype=("float32", "float16"), causal=(False, True), passes=PASSES)
QUICK_SWEEP = dict(d=(64,), seqlen=(1024, 4096), dtype=("float32", "float16"),
                   causal=(False, True), passes=PASSES)
SPARSE_SWEEP = dict(d=(64,), seqlen=(4096, 8192), dtype=("float16",),
                    densities=(1.0, 0.5, 0.25, 0.125), passes=("fwd", "fwd+bwd"))
SIM_SWEEP = dict(batch=1, nheads=2, d=16, seqlen=(32, 64), dtype="float32")

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32",
                 "float": "float32"}
# ||x - ref|| / ||ref|| against float64 that --check accepts. float32 leaves room for tf32 matrix
# units (~3e-4, METHOD.md), which Triton (flex) and cuDNN may use; numba_flash computes in true fp32
# and is held to the project's bar of 1e-5.
CHECK_TOL = {"float16": 1e-2, "bfloat16": 3e-2, "float32": 2e-3}
OWN_FP32_TOL = 1e-5
CHECK_SIZE = dict(batch=2, seqlen=256, nheads=2)

SDPA_BACKENDS = {
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
}


class Unavailable(Exception):
    """The implementation cannot run here (backend missing, configuration refused)."""


@dataclasses.dataclass(frozen=True)
class Config:
    batch: int
    seqlen: int
    nheads: int
    headdim: int
    dtype: str
    causal: bool

    @classmethod
    def from_tokens(cls, tokens, hidden, seqlen, headdim, dtype, causal):
        """``batch * seqlen = tokens`` (at least one sequence), ``nheads = hidden // headdim``."""
        return cls(max(1, tokens // seqlen), seqlen, hidden // headdim, headdim, dtype, causal)

    def label(self) -> str:
        return (f"d={self.headdim} {self.dtype} {'causal' if self.causal else 'non-causal'} "
                f"N={self.seqlen} B={self.batch} H={self.nheads}")


def attention_flops(cfg: Config, pass_: str) -> float:
    """FLOPs counted for TFLOP/s: 4 B H N^2 d per forward, halved when causal, scaled per pass."""
    flops = 4.0 * cfg.batch * cfg.nheads * cfg.seqlen * cfg.seqlen * cfg.headdim
    if cfg.causal:
        flops /= 2
    return flops * FLOP_FACTOR[pass_]


# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------

def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _triton_do_bench():
    try:
        from triton.testing import do_bench
    except Exception:  # not installed, or no driver for it
        return None
    return do_bench


def environment(timing: dict | None = None) -> dict:
    """GPU, versions and UTC date, for the report header."""
    import numba

    meta = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "numba_cuda": _version("numba-cuda"),
        "numpy": np.__version__,
        "triton": _version("triton"),
        "numba_flash": getattr(numba_flash, "__version__", _version("numba_flash")),
        "python": sys.version.split()[0],
    }
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        meta["gpu"] = f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
        meta["cuda_runtime"] = torch.version.cuda
    else:
        meta["gpu"] = "none"
    if timing is not None:
        meta["timing"] = timing
    return meta


def format_header(meta: dict, title: str = "numba_flash attention benchmark") -> str:
    lines = [f"# {title}", "",
             f"- GPU: {meta['gpu']}" + (f", CUDA runtime {meta['cuda_runtime']}"
                                        if meta.get("cuda_runtime") else ""),
             f"- torch {meta['torch']}, numba {meta['numba']}, numba-cuda {meta['numba_cuda']}, "
             f"triton {meta['triton']}, numpy {meta['numpy']}, numba_flash {meta['numba_flash']}, "
             f"Python {meta['python']}",
             f"- date: {meta['date_utc']}"]
    timing = meta.get("timing")
    if timing:
        lines.append(f"- timing: {timing['method']}, median, warm-up {timing['warmup_ms']} ms, "
                     f"repeat {timing['rep_ms']} ms, L2 flushed between repetitions; the forward "
                     f"pass records autograd (as in training)")
    lines.append("- TFLOP/s: 4·B·H·N²·d per forward (halved when causal), ×2.5 backward, "
                 "×3.5 forward+backward; a ratio line `a / b` divides a's TFLOP/s by b's "
                 "(> 1: a faster)")
    if meta.get("sweep"):
        s = meta["sweep"]
        lines.append(f"- shapes: B·N = {s['tokens']} tokens, hidden {s['hidden']} → H = hidden // d; "
                     f"numba_flash gets (B, N, H, d), PyTorch the (B, H, N, d) transpose views")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# inputs and implementations
# ---------------------------------------------------------------------------------------------

def make_inputs(cfg: Config, device="cuda", seed=0):
    """Random leaf tensors ``q, k, v`` of shape (B, N, H, d) that require grad, and a random ``dout``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (cfg.batch, cfg.seqlen, cfg.nheads, cfg.headdim)
    dtype = DTYPES[cfg.dtype]

    def randn():
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)

    q, k, v = (randn().requires_grad_() for _ in range(3))
    return q, k, v, randn()


def _naive_attention(q, k, v, scale, causal_mask):
    # (B, H, N, d) in; every intermediate in the input dtype, as a plain PyTorch model would.
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    if causal_mask is not None:
        s.masked_fill_(causal_mask, float("-inf"))  # mul's backward does not need s: in place is safe
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v)


_FLEX = None


def _flex_attention():
    """``flex_attention`` compiled once; the recompile limit raised, one graph per shape."""
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        import torch._dynamo.config as dynamo_config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), 256))
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def _causal_mask_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def make_forward(impl: str, q, k, v, causal: bool, *, block_mask=None):
    """``(forward, context)``: ``forward()`` runs one attention forward and returns (B, N, H, d);
    ``context()`` is entered around every call (the SDPA backend choice), kept out of ``forward``
    so that its host cost stays out of the timed region.

    ``block_mask`` (numba_flash.BlockMask) applies to ``numba_flash`` and ``flex`` only.
    Raises :class:`Unavailable` if the implementation cannot be set up here.
    """
    nullcontext = contextlib.nullcontext
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if impl == "numba_flash":
        def forward():
            return numba_flash.flash_attn_func(q, k, v, causal=causal, block_mask=block_mask)
        return forward, nullcontext

    if block_mask is not None and impl != "flex":
        raise Unavailable(f"{impl} has no block-sparse mode")

    if impl == "naive":
        n = q.shape[1]
        scale = 1.0 / math.sqrt(q.shape[-1])
        mask = (torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1) if causal else None)

        def forward():
            return _naive_attention(qt, kt, vt, scale, mask).transpose(1, 2)
        return forward, nullcontext

    if impl in SDPA_BACKENDS:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA_BACKENDS[impl], None)
        if backend is None:
            raise Unavailable(f"this torch has no SDPBackend.{SDPA_BACKENDS[impl]}")

        def forward():
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
        return forward, lambda: sdpa_kernel(backend)

    if impl == "flex":
        try:
            flex = _flex_attention()
        except Exception as e:
            raise Unavailable(f"flex_attention: {_first_line(e)}") from e
        flex_mask = None
        if block_mask is not None:
            flex_mask = flex_block_mask(block_mask, q.shape[2])
        elif causal:
            from torch.nn.attention.flex_attention import create_block_mask
            n = q.shape[1]
            flex_mask = create_block_mask(_causal_mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n,
                                          device=q.device)

        def forward():
            return flex(qt, kt, vt, block_mask=flex_mask).transpose(1, 2)
        return forward, nullcontext

    raise ValueError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")


def block_layout(mask) -> np.ndarray:
    """Bool ``(Hm, Tq, Tk)`` block layout of a numba_flash.BlockMask (from its kv lists if it has
    no ``layout`` attribute)."""
    layout = getattr(mask, "layout", None)
    if layout is not None:
        return np.asarray(layout, dtype=bool)
    kv_count, kv_index = np.asarray(mask.kv_count), np.asarray(mask.kv_index)
    hm, tq = kv_count.shape
    out = np.zeros((hm, tq, np.asarray(mask.q_count).shape[1]), dtype=bool)
    for h in range(hm):
        for i in range(tq):
            out[h, i, kv_index[h, i, :kv_count[h, i]]] = True
    return out


def _layout_mask_mod(layout, bq, bk):
    """FlexAttention ``mask_mod`` that looks up block ``(q_idx // bq, kv_idx // bk)`` of ``layout``
    (a bool (Hm, Tq, Tk) tensor): element-wise the same mask as the numba_flash BlockMask."""
    if layout.shape[0] == 1:
        layout2d = layout[0]

        def mask_mod(b, h, q_idx, kv_idx):
            return layout2d[q_idx // bq, kv_idx // bk]
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return layout[h, q_idx // bq, kv_idx // bk]
    return mask_mod


def flex_block_mask(mask, nheads: int, device="cuda"):
    """FlexAttention BlockMask equivalent to ``mask`` (numba_flash.BlockMask), built by
    ``create_block_mask`` from a mask_mod that reads the same block layout."""
    from torch.nn.attention.flex_attention import create_block_mask

    layout = torch.tensor(block_layout(mask), device=device)  # a copy: BlockMask arrays are read-only
    bq, bk = mask.block_size
    heads = None if layout.shape[0] == 1 else nheads
    return create_block_mask(_layout_mask_mod(layout, bq, bk), B=None, H=heads,
                             Q_LEN=mask.seqlen_q, KV_LEN=mask.seqlen_k, device=device,
                             BLOCK_SIZE=(bq, bk))


def pass_step(pass_: str, forward, q, k, v, dout):
    """A callable whose one call is the timed region of ``pass_``.

    ``fwd``: one forward. ``fwd+bwd``: forward then ``out.backward(dout)``; the caller clears
    ``.grad`` of q, k, v between calls. ``bwd``: ``torch.autograd.grad`` through a graph built once
    here, kept with ``retain_graph=True``.
    """
    if pass_ == "fwd":
        return forward
    if pass_ == "fwd+bwd":
        def step():
            forward().backward(dout)
        return step
    if pass_ == "bwd":
        out = forward()

        def step():
            torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        return step
    raise ValueError(f"unknown pass {pass_!r}; choose from {', '.join(PASSES)}")


# ---------------------------------------------------------------------------------------------
# timing and memory
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Timing:
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    use_triton: bool = True

    def __post_init__(self):
        self._do_bench = _triton_do_bench() if self.use_triton else None

    @property
    def method(self) -> str:
        return ("triton.testing.do_bench" if self._do_bench is not None
                else "CUDA events (own loop, triton not importable)")

    def describe(self) -> dict:
        return {"method": self.method, "warmup_ms": self.warmup_ms, "rep_ms": self.rep_ms}

    def median_ms(self, fn, grad_to_none=()):
        """Median milliseconds of ``fn`` on the current CUDA stream."""
        if self._do_bench is not None:
            return float(self._do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms,
                                        grad_to_none=list(grad_to_none) or None,
                                        return_mode="median"))
        return _event_median_ms(fn, grad_to_none, self.warmup_ms, self.rep_ms)


def _event_median_ms(fn, grad_to_none, warmup_ms, rep_ms, max_reps=1000):
    # The same protocol as triton.testing.do_bench: first call (compilation), estimate from 5 calls,
    # warm-up for warmup_ms, then rep_ms worth of calls, each between its own pair of events, with
    # the L2 cache flushed (a 256 MiB write) and grads cleared before each, outside the events.
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")

    def clear():
        for x in grad_to_none:
            x.grad = None
        flush.zero_()

    clear()
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        clear()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        clear()
        fn()
    n = max(5, min(max_reps, int(rep_ms / estimate)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        clear()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def forward_peak_mib(forward) -> float:
    """Peak memory one ``forward()`` allocates through torch beyond what was allocated before (MiB)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = forward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak / 2**20


def free_memory():
    gc.collect()
    torch.cuda.empty_cache()


def _first_line(e: BaseException, limit=160) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return f"{type(e).__name__}: {line}"[:limit]


def probe(forward, context=contextlib.nullcontext):
    """Run ``forward()`` once (compiling whatever it compiles). Returns ``(status, note)``:
    ``ok``, ``n/a`` (refused: the backend's reason in ``note``), ``OOM`` or ``error``."""
    try:
        with warnings.catch_warnings(record=True) as caught, context():
            warnings.simplefilter("always")
            out = forward()
            torch.cuda.synchronize()
        del out
        return "ok", ""
    except torch.cuda.OutOfMemoryError:
        free_memory()
        return "OOM", ""
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
        # SDPA explains a refusal in warnings ("Flash attention requires q,k,v to have dtype...").
        reasons = [str(w.message).strip().splitlines()[0] for w in caught]
        reasons = [r for r in reasons if r and not r.endswith(":")]
        note = "; ".join(reasons[:2])[:200] if reasons else _first_line(e)
        free_memory()
        return "n/a", note
    except Exception as e:  # a numba_flash bug, a CUDA launch failure: report, keep going
        free_memory()
        return "error", _first_line(e)


# ---------------------------------------------------------------------------------------------
# one configuration
# ---------------------------------------------------------------------------------------------

def _record(cfg: Config, impl: str, pass_: str, status: str, ms=None, mem_mib=None, note=""):
    rec = {"d": cfg.headdim, "dtype": cfg.dtype, "causal": cfg.causal, "seqlen": cfg.seqlen,
           "batch": cfg.batch, "nheads": cfg.nheads, "impl": impl, "pass": pass_,
           "status": status, "ms": ms, "tflops": None, "note": note}
    if ms:
        rec["tflops"] = attention_flops(cfg, pass_) / (ms * 1e-3) / 1e12
    if pass_ == "fwd":
        rec["mem_mib"] = mem_mib
    return rec


def _time_pass(pass_, forward, q, k, v, dout, timing: Timing) -> float:
    step = pass_step(pass_, forward, q, k, v, dout)
    try:
        return timing.median_ms(step, grad_to_none=(q, k, v) if pass_ == "fwd+bwd" else ())
    finally:
        del step


def measure_impl(impl: str, cfg: Config, q, k, v, dout, passes, timing: Timing,
                 block_mask=None) -> list[dict]:
    """Records (one per pass) for one implementation on prepared inputs."""
    try:
        forward, context = make_forward(impl, q, k, v, cfg.causal, block_mask=block_mask)
    except Unavailable as e:
        return [_record(cfg, impl, p, "n/a", note=str(e)) for p in passes]
    status, note = probe(forward, context)
    if status != "ok":
        return [_record(cfg, impl, p, status, note=note) for p in passes]

    records, times = [], {}
    with context():
        mem = None
        if "fwd" in passes:
            try:
                mem = forward_peak_mib(forward)
            except torch.cuda.OutOfMemoryError:
                free_memory()
                return [_record(cfg, impl, p, "OOM") for p in passes]
        # fwd and fwd+bwd first: bwd falls back to their difference if autograd.grad fails.
        for pass_ in sorted(passes, key=("fwd", "fwd+bwd", "bwd").index):
            note = ""
            try:
                try:
                    ms = _time_pass(pass_, forward, q, k, v, dout, timing)
                except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
                    if pass_ != "bwd" or isinstance(e, torch.cuda.OutOfMemoryError):
                        raise
                    # autograd.grad with retain_graph refused: backward = (fwd+bwd) - fwd.
                    for p in ("fwd", "fwd+bwd"):
                        if p not in times:
                            times[p] = _time_pass(p, forward, q, k, v, dout, timing)
                    ms = times["fwd+bwd"] - times["fwd"]
                    # (flex: torch.compile donates the saved buffers to its one backward.)
                    note = (f"bwd = (fwd+bwd) − fwd: autograd.grad(retain_graph=True) refused: "
                            f"{_first_line(e, 90)}")
                times[pass_] = ms
                records.append(_record(cfg, impl, pass_, "ok", ms,
                                       mem if pass_ == "fwd" else None, note))
            except torch.cuda.OutOfMemoryError:
                free_memory()
                records.append(_record(cfg, impl, pass_, "OOM", mem_mib=mem))
            except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
                free_memory()
                records.append(_record(cfg, impl, pass_, "n/a", note=_first_line(e)))
            except Exception as e:
                free_memory()
                records.append(_record(cfg, impl, pass_, "error", note=_first_line(e)))
    free_memory()
    return records


def measure_config(cfg: Config, impls, passes, timing: Timing, seed=0) -> list[dict]:
    """Records for every (impl, pass) of one configuration, on one set of random inputs."""
    try:
        q, k, v, dout = make_inputs(cfg, seed=seed)
    except torch.cuda.OutOfMemoryError:
        free_memory()
        return [_record(cfg, i, p, "OOM", note="inputs") for i in impls for p in passes]
    records = []
    for impl in impls:
        records += measure_impl(impl, cfg, q, k, v, dout, passes, timing)
    del q, k, v, dout
    free_memory()
    return records


def _rel_err(x, ref) -> float:
    x = x.detach().to(torch.float64)
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))


def reference_outputs(q, k, v, dout, causal):
    """``(out, dq, dk, dv)`` in float64 from SDPA's math backend on upcast copies, (B, N, H, d)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q64, k64, v64 = (x.detach().to(torch.float64).requires_grad_() for x in (q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q64.transpose(1, 2), k64.transpose(1, 2),
                                             v64.transpose(1, 2), is_causal=causal).transpose(1, 2)
    grads = torch.autograd.grad(out, (q64, k64, v64), dout.to(torch.float64))
    return (out.detach(), *grads)


def check_impl(impl: str, cfg: Config, q, k, v, dout, ref) -> dict:
    """Relative errors of out, dq, dk, dv of ``impl`` against ``ref`` (from reference_outputs)."""
    tol = OWN_FP32_TOL if (impl == "numba_flash" and cfg.dtype == "float32") else CHECK_TOL[cfg.dtype]
    rec = {"impl": impl, "d": cfg.headdim, "dtype": cfg.dtype, "causal": cfg.causal,
           "seqlen": cfg.seqlen, "batch": cfg.batch, "nheads": cfg.nheads, "tol": tol,
           "status": "ok", "note": "", "errors": {}}
    try:
        forward, context = make_forward(impl, q, k, v, cfg.causal)
        with context():
            out = forward()
            grads = torch.autograd.grad(out, (q, k, v), dout)
        torch.cuda.synchronize()
    except Unavailable as e:
        rec.update(status="n/a", note=str(e))
        return rec
    except torch.cuda.OutOfMemoryError:
        free_memory()
        rec.update(status="OOM")
        return rec
    except Exception as e:
        free_memory()
        refused = isinstance(e, (RuntimeError, ValueError, TypeError, NotImplementedError))
        rec.update(status="n/a" if refused else "error", note=_first_line(e))
        return rec
    rec["errors"] = {name: _rel_err(x, r)
                     for name, x, r in zip(("out", "dq", "dk", "dv"), (out, *grads), ref)}
    worst = max(rec["errors"].values())
    if not worst <= tol:  # NaN fails too
        rec["status"] = "FAIL"
    return rec


def check_config(cfg: Config, impls, seed=1) -> list[dict]:
    """Check every implementation at ``cfg`` against float64 SDPA math on the same inputs."""
    q, k, v, dout = make_inputs(cfg, seed=seed)
    ref = reference_outputs(q, k, v, dout, cfg.causal)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SDPA's refusal warnings: the status says n/a
        records = [check_impl(impl, cfg, q, k, v, dout, ref) for impl in impls]
    del q, k, v, dout, ref
    free_memory()
    return records


# ---------------------------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------------------------

def _cell(rec, key="tflops", fmt="{:.1f}") -> str:
    if rec is None:
        return "—"
    if rec["status"] != "ok":
        return rec["status"]
    value = rec.get(key)
    return "—" if value is None else fmt.format(value)


def _md_table(header, rows) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def format_sweep(records, impls, passes, reference_impl="numba_flash") -> str:
    """Markdown: per (d, dtype, causal, pass) a TFLOP/s table (rows N, columns impls), ratio lines
    ``numba_flash / other`` and, for the forward pass, a peak-memory table."""
    index = {(r["d"], r["dtype"], r["causal"], r["seqlen"], r["impl"], r["pass"]): r
             for r in records}
    groups = sorted({(r["d"], r["dtype"], r["causal"]) for r in records},
                    key=lambda g: (g[0], g[1] != "float32", g[2]))
    out, notes = [], {}
    for d, dtype, causal in groups:
        rows_n = sorted({r["seqlen"] for r in records
                         if (r["d"], r["dtype"], r["causal"]) == (d, dtype, causal)})
        first = next(r for r in records if (r["d"], r["dtype"], r["causal"]) == (d, dtype, causal))
        for pass_ in [p for p in PASSES if p in passes]:
            get = lambda n, impl: index.get((d, dtype, causal, n, impl, pass_))  # noqa: E731
            out.append(f"### d={d}, {dtype}, {'causal' if causal else 'non-causal'}, {pass_}: "
                       f"TFLOP/s (H={first['nheads']})")
            out.append("")
            rows = [[n, get(n, impls[0])["batch"] if get(n, impls[0]) else "—"]
                    + [_cell(get(n, impl)) for impl in impls] for n in rows_n]
            out += _md_table(["N", "B", *impls], rows)
            out.append("")
            if reference_impl in impls:
                for other in impls:
                    if other == reference_impl:
                        continue
                    parts, ratios = [], []
                    for n in rows_n:
                        a, b = get(n, reference_impl), get(n, other)
                        if a and b and a["status"] == b["status"] == "ok":
                            ratios.append(a["tflops"] / b["tflops"])
                            parts.append(f"N={n} {ratios[-1]:.2f}")
                        else:
                            parts.append(f"N={n} —")
                    geo = (f" (geomean {math.exp(statistics.fmean(map(math.log, ratios))):.2f})"
                           if ratios else "")
                    out.append(f"- {reference_impl} / {other}: " + ", ".join(parts) + geo)
                out.append("")
            if pass_ == "fwd":
                out.append(f"Peak extra memory of one forward, MiB (d={d}, {dtype}, "
                           f"{'causal' if causal else 'non-causal'})")
                out.append("")
                rows = [[n] + [_cell(get(n, impl), "mem_mib", "{:.0f}") for impl in impls]
                        for n in rows_n]
                out += _md_table(["N", *impls], rows)
                out.append("")
            for n in rows_n:
                for impl in impls:
                    r = get(n, impl)
                    if r and r.get("note"):
                        notes.setdefault((impl, r["status"], r["note"]), []).append(
                            f"d={d} {dtype} {'causal' if causal else 'non-causal'} N={n} {pass_}")
    if notes:
        out.append("Notes:")
        for (impl, status, note), where in notes.items():
            more = f" (+{len(where) - 1} more)" if len(where) > 1 else ""
            out.append(f"- {impl} {status} at {where[0]}{more}: {note}")
        out.append("")
    return "\n".join(out)


def format_checks(checks) -> str:
    rows = []
    for c in checks:
        e = c["errors"]
        rows.append([c["impl"], c["d"], c["dtype"], "causal" if c["causal"] else "non-causal",
                     c["seqlen"]] + [f"{e[k]:.1e}" if k in e else "—" for k in ("out", "dq", "dk", "dv")]
                    + [f"{c['tol']:.0e}", c["status"] + (f" ({c['note']})" if c["note"] else "")])
    lines = [f"Check against float64 SDPA math on upcast inputs, ‖x − ref‖/‖ref‖ "
             f"(B={checks[0]['batch']}, H={checks[0]['nheads']})", ""] if checks else []
    lines += _md_table(["impl", "d", "dtype", "mask", "N", "out", "dq", "dk", "dv", "tol", "status"],
                       rows)
    return "\n".join(lines) + "\n"


def write_report(path, markdown: str, payload: dict):
    """Write ``path`` with suffix .md (the report) and .json (``payload``) beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    md, js = path.with_suffix(".md"), path.with_suffix(".json")
    md.write_text(markdown)
    js.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return md, js


# ---------------------------------------------------------------------------------------------
# block-sparse mode
# ---------------------------------------------------------------------------------------------

def sparse_masks(seqlen: int, densities, block_size=(128, 128)):
    """``[(pattern, mask)]``: random masks at each density, then the butterfly pattern."""
    BlockMask = numba_flash.BlockMask
    masks = [("random", BlockMask.random(rho, seed=0, seqlen_q=seqlen, seqlen_k=seqlen,
                                         block_size=block_size)) for rho in densities]
    masks.append(("butterfly", BlockMask.butterfly(seqlen_q=seqlen, seqlen_k=seqlen,
                                                   block_size=block_size)))
    return masks


def _sparse_record(cfg, impl, pattern, density, pass_, status, ms=None, note=""):
    rec = {"mode": "sparse", "d": cfg.headdim, "dtype": cfg.dtype, "seqlen": cfg.seqlen,
           "batch": cfg.batch, "nheads": cfg.nheads, "impl": impl, "pattern": pattern,
           "density": density, "pass": pass_, "status": status, "ms": ms, "note": note,
           "tflops_effective": None}
    if ms:
        rec["tflops_effective"] = attention_flops(cfg, pass_) * density / (ms * 1e-3) / 1e12
    return rec


def measure_sparse(cfg: Config, densities, passes, timing: Timing, impls=("numba_flash", "flex"),
                   seed=0) -> list[dict]:
    """Time ``impls`` dense and under each mask of :func:`sparse_masks`; for the forward pass also
    the agreement ``‖numba_flash − flex‖/‖flex‖`` on the same inputs (proves the masks match)."""
    q, k, v, dout = make_inputs(cfg, seed=seed)
    records = []
    cases = [("dense", None)] + sparse_masks(cfg.seqlen, densities)
    for pattern, mask in cases:
        density = 1.0 if mask is None else float(mask.density)
        outs, case = {}, []
        for impl in impls:
            rows = measure_impl(impl, cfg, q, k, v, dout, passes, timing, block_mask=mask)
            case += [_sparse_record(cfg, impl, pattern, density, r["pass"], r["status"], r["ms"],
                                    r["note"]) for r in rows]
            if all(r["status"] == "ok" for r in rows):
                forward, context = make_forward(impl, q, k, v, False, block_mask=mask)
                with context(), torch.no_grad():
                    outs[impl] = forward().float()
        if {"numba_flash", "flex"} <= outs.keys():
            a, b = outs["numba_flash"], outs["flex"]
            err = float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))
            for r in case:
                if r["impl"] == "numba_flash" and r["pass"] == "fwd":
                    r["agreement"] = err
        records += case
        del outs
        free_memory()
    del q, k, v, dout
    free_memory()
    return records


def format_sparse(records) -> str:
    out = []
    keys = sorted({(r["d"], r["dtype"], r["seqlen"], r["pass"]) for r in records},
                  key=lambda t: (t[0], t[1], t[2], PASSES.index(t[3])))
    for d, dtype, n, pass_ in keys:
        rs = [r for r in records if (r["d"], r["dtype"], r["seqlen"], r["pass"]) == (d, dtype, n, pass_)]
        by = {(r["impl"], r["pattern"], r["density"]): r for r in rs}
        dense = {impl: by.get((impl, "dense", 1.0)) for impl in ("numba_flash", "flex")}
        cases = []
        for r in rs:
            if (r["pattern"], r["density"]) not in cases:
                cases.append((r["pattern"], r["density"]))
        b, h = rs[0]["batch"], rs[0]["nheads"]
        out.append(f"### block-sparse, N={n}, d={d}, {dtype}, {pass_} (B={b}, H={h}, "
                   f"128×128 blocks): time in ms, ratio = time / dense time, target ρ + 0.1")
        out.append("")
        rows = []
        for pattern, density in cases:
            nf, fx = by.get(("numba_flash", pattern, density)), by.get(("flex", pattern, density))

            def ms_ratio(rec, base):
                if rec is None or rec["status"] != "ok":
                    return (rec["status"] if rec else "—"), "—"
                if base is None or base["status"] != "ok":
                    return f"{rec['ms']:.3f}", "—"
                return f"{rec['ms']:.3f}", f"{rec['ms'] / base['ms']:.3f}"

            nf_ms, nf_ratio = ms_ratio(nf, dense["numba_flash"])
            fx_ms, fx_ratio = ms_ratio(fx, dense["flex"])
            target = "—" if pattern == "dense" else f"{density + 0.1:.3f}"
            met = "—"
            if pattern != "dense" and nf_ratio != "—":
                met = "yes" if float(nf_ratio) <= density + 0.1 else "no"
            tflops = _cell(nf, "tflops_effective")
            agree = f"{nf['agreement']:.1e}" if nf and nf.get("agreement") is not None else "—"
            rows.append([pattern, f"{density:.3f}", nf_ms, nf_ratio, target, met, tflops,
                         fx_ms, fx_ratio] + ([agree] if pass_ == "fwd" else []))
        header = ["mask", "density ρ", "numba_flash ms", "ratio", "target", "met",
                  "eff. TFLOP/s", "flex ms", "flex ratio"]
        if pass_ == "fwd":
            header.append("‖nf − flex‖/‖flex‖")
        out += _md_table(header, rows)
        out.append("")
    notes = {(r["impl"], r["status"], r["note"]) for r in records if r.get("note")}
    if notes:
        out.append("Notes:")
        out += [f"- {impl} {status}: {note}" for impl, status, note in sorted(notes)]
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# simulator mode
# ---------------------------------------------------------------------------------------------

def run_simulated(args) -> int:
    """Tiny numba_flash-only sweep on CPU torch tensors through Numba's CUDA simulator."""
    print("SIMULATED: Numba's CUDA simulator, CPU torch tensors, tiny sizes; timings are host "
          "seconds of the simulator and mean nothing for GPU performance.")
    print(format_header(environment(), "numba_flash benchmark (simulated)"))
    s = SIM_SWEEP
    causals = args.causal if args.causal is not None else (False, True)
    seqlens = args.seqlen or s["seqlen"]
    passes = args.passes or ("fwd", "fwd+bwd")
    rows, payload, failed = [], [], False
    for causal in causals:
        for n in seqlens:
            cfg = Config(s["batch"], n, s["nheads"], s["d"], s["dtype"], causal)
            q, k, v, dout = make_inputs(cfg, device="cpu")
            ref = reference_outputs(q, k, v, dout, causal)
            errors = {}
            try:
                out = numba_flash.flash_attn_func(q, k, v, causal=causal)
                grads = torch.autograd.grad(out, (q, k, v), dout)
                errors = {name: _rel_err(x, r)
                          for name, x, r in zip(("out", "dq", "dk", "dv"), (out, *grads), ref)}
            except Exception as e:
                print(f"{cfg.label()}: {_first_line(e, 300)}")
                failed = True
                continue
            failed |= not max(errors.values()) <= 1e-5
            for pass_ in passes:
                step = pass_step(pass_, lambda: numba_flash.flash_attn_func(q, k, v, causal=causal),
                                 q, k, v, dout)
                seconds = []
                for _ in range(args.sim_reps):
                    q.grad = k.grad = v.grad = None
                    t0 = time.perf_counter()
                    step()
                    seconds.append(time.perf_counter() - t0)
                ms = statistics.median(seconds) * 1e3
                rows.append([n, "causal" if causal else "non-causal", pass_, f"{ms:.0f}",
                             " ".join(f"{name}={e:.1e}" for name, e in errors.items())])
                payload.append({"seqlen": n, "causal": causal, "pass": pass_,
                                "simulated_ms": ms, "errors": errors, **dataclasses.asdict(cfg)})
    text = (f"B={s['batch']}, H={s['nheads']}, d={s['d']}, {s['dtype']}; median of "
            f"{args.sim_reps} runs; errors ‖x − ref‖/‖ref‖ against float64\n\n"
            + "\n".join(_md_table(["N", "mask", "pass", "host ms (simulated)", "rel. errors"], rows))
            + "\n")
    print(text)
    if args.out:
        for f in write_report(args.out, text, {"simulated": True, "results": payload}):
            print(f"wrote {f}")
    if failed:
        print("FAILED: an error above exceeds 1e-5 or a call raised")
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

def _list(convert):
    def parse(text):
        return tuple(convert(t.strip()) for t in text.split(",") if t.strip())
    return parse


def _dtype(name):
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return name


def _bool01(text):
    if text.lower() in ("0", "false", "no", "non-causal"):
        return False
    if text.lower() in ("1", "true", "yes", "causal"):
        return True
    raise argparse.ArgumentTypeError(f"causal must be 0 or 1, got {text!r}")


def _choice(options):
    def parse(text):
        if text not in options:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(options)}")
        return text
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m numba_flash.bench",
        description="Time numba_flash against PyTorch naive attention, SDPA backends and "
                    "FlexAttention (TFLOP/s, peak forward memory). Lists are comma-separated.")
    p.add_argument("--d", type=_list(int), help="head dims (default 64,128)")
    p.add_argument("--seqlen", "--N", type=_list(int),
                   help="sequence lengths (default 512,...,16384)")
    p.add_argument("--dtype", type=_list(_dtype), help="float32,float16 (default both)")
    p.add_argument("--causal", type=_list(_bool01), help="0,1 (default both)")
    p.add_argument("--pass", dest="passes", type=_list(_choice(PASSES)),
                   help="fwd,bwd,fwd+bwd (default all)")
    p.add_argument("--impl", type=_list(_choice(IMPLS)),
                   help=f"implementations (default {','.join(DEFAULT_IMPLS)}; also: flex)")
    p.add_argument("--tokens", type=int, default=16384, help="batch × seqlen (default 16384)")
    p.add_argument("--hidden", type=int, default=2048, help="nheads × d (default 2048)")
    p.add_argument("--quick", action="store_true",
                   help="d=64, N=1024,4096, both dtypes, causal and not")
    p.add_argument("--check", action="store_true",
                   help="check each implementation against float64 at a small size first")
    p.add_argument("--out", help="write PATH.md and PATH.json")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--no-triton", action="store_true", help="time with the own CUDA-event loop")
    p.add_argument("--sparse", action="store_true",
                   help="block-sparse mode: time vs density (random, butterfly masks) "
                        "against dense numba_flash and FlexAttention")
    p.add_argument("--densities", type=_list(float),
                   help="random-mask densities for --sparse (default 1,0.5,0.25,0.125)")
    p.add_argument("--simulate", action="store_true",
                   help="without a GPU: tiny numba_flash-only run under Numba's CUDA simulator")
    p.add_argument("--sim-reps", type=int, default=3, help=argparse.SUPPRESS)
    return p


def _resolve(args, sweep) -> dict:
    return {"d": args.d or sweep["d"], "seqlen": args.seqlen or sweep["seqlen"],
            "dtype": args.dtype or sweep["dtype"],
            "causal": args.causal if args.causal is not None else sweep.get("causal", (False,)),
            "passes": args.passes or sweep["passes"]}


def run_sweep(args) -> int:
    sweep = _resolve(args, QUICK_SWEEP if args.quick else FULL_SWEEP)
    impls = args.impl or DEFAULT_IMPLS
    timing = Timing(args.warmup_ms, args.rep_ms, use_triton=not args.no_triton)
    meta = environment(timing.describe())
    meta["sweep"] = {"tokens": args.tokens, "hidden": args.hidden, **sweep, "impls": impls}
    header = format_header(meta)
    print(header, flush=True)

    checks = []
    if args.check:
        for d in sweep["d"]:
            for dtype in sweep["dtype"]:
                for causal in sweep["causal"]:
                    cfg = Config(CHECK_SIZE["batch"], CHECK_SIZE["seqlen"], CHECK_SIZE["nheads"],
                                 d, dtype, causal)
                    checks += check_config(cfg, impls)
        print(format_checks(checks), flush=True)

    records, printed = [], 0
    for d in sweep["d"]:
        for dtype in sweep["dtype"]:
            for causal in sweep["causal"]:
                for n in sweep["seqlen"]:
                    cfg = Config.from_tokens(args.tokens, args.hidden, n, d, dtype, causal)
                    t0 = time.perf_counter()
                    records += measure_config(cfg, impls, sweep["passes"], timing)
                    print(f"[{cfg.label()}: {time.perf_counter() - t0:.1f} s]", file=sys.stderr,
                          flush=True)
                # Print (and save) each (d, dtype, causal) group as soon as it is complete.
                print(format_sweep(records[printed:], impls, sweep["passes"]), flush=True)
                printed = len(records)
                if args.out:
                    body = (header + "\n" + (format_checks(checks) + "\n" if checks else "")
                            + format_sweep(records, impls, sweep["passes"]))
                    write_report(args.out, body, {"meta": meta, "checks": checks,
                                                  "results": records})
    if args.out:
        print(f"wrote {Path(args.out).with_suffix('.md')} and {Path(args.out).with_suffix('.json')}")
    bad = [c for c in checks if c["status"] in ("FAIL", "error")]
    if bad:
        print(f"CHECK FAILED for: {', '.join(sorted({c['impl'] for c in bad}))}")
        return 1
    return 0


def run_sparse(args) -> int:
    sweep = _resolve(args, dict(SPARSE_SWEEP, causal=(False,)))
    passes = tuple(p for p in sweep["passes"] if p in ("fwd", "fwd+bwd")) or ("fwd", "fwd+bwd")
    densities = args.densities or SPARSE_SWEEP["densities"]
    impls = tuple(i for i in (args.impl or ("numba_flash", "flex")) if i in ("numba_flash", "flex"))
    timing = Timing(args.warmup_ms, args.rep_ms, use_triton=not args.no_triton)
    meta = environment(timing.describe())
    meta["sweep"] = {"tokens": args.tokens, "hidden": args.hidden, "mode": "sparse",
                     "densities": densities, **sweep, "passes": passes}
    header = format_header(meta, "numba_flash block-sparse benchmark")
    print(header, flush=True)
    records = []
    for d in sweep["d"]:
        for dtype in sweep["dtype"]:
            for n in sweep["seqlen"]:
                cfg = Config.from_tokens(args.tokens, args.hidden, n, d, dtype, False)
                t0 = time.perf_counter()
                new = measure_sparse(cfg, densities, passes, timing, impls)
                print(f"[{cfg.label()}: {time.perf_counter() - t0:.1f} s]", file=sys.stderr,
                      flush=True)
                print(format_sparse(new), flush=True)
                records += new
                if args.out:
                    write_report(args.out, header + "\n" + format_sparse(records),
                                 {"meta": meta, "results": records})
    if args.out:
        print(f"wrote {Path(args.out).with_suffix('.md')} and {Path(args.out).with_suffix('.json')}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from numba_flash import runtime

    simulated = runtime.simulator_active()
    if not simulated and torch.cuda.is_available() and runtime.gpu_present():
        return run_sparse(args) if args.sparse else run_sweep(args)
    if not args.simulate:
        print("numba_flash.bench needs a CUDA GPU (torch.cuda and numba.cuda); "
              + ("Numba's CUDA simulator is on." if simulated else "none found.")
              + " Use --simulate for a tiny run under the simulator (timings meaningless).")
        return 0
    if args.sparse:
        print("--sparse needs a GPU (128×128 blocks are too large for the simulator); "
              "running the dense simulated sweep instead.")
    if not simulated:
        return runtime.rerun_under_simulator(["-m", "numba_flash.bench",
                                      *(sys.argv[1:] if argv is None else argv)])
    return run_simulated(args)


if __name__ == "__main__":
    sys.exit(main())
