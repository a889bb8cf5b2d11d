"""Timing and memory, as /work/.library/device/METHOD.md asks: CUDA events, warm-up, the median of many
repetitions (``triton.testing.do_bench(return_mode="median")`` when triton imports, else an equivalent
event loop), the L2 cache flushed between repetitions; and the peak memory one forward allocates.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import statistics
import warnings

import torch


def _triton_do_bench():
    try:
        from triton.testing import do_bench
    except Exception:  # not installed, or no driver for it
        return None
    return do_bench


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


def first_line(e: BaseException, limit=160) -> str:
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
        note = "; ".join(reasons[:2])[:200] if reasons else first_line(e)
        free_memory()
        return "n/a", note
    except Exception as e:  # a numba_flash bug, a CUDA launch failure: report, keep going
        free_memory()
        return "error", first_line(e)
