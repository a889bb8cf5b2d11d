"""Host time per call against GPU time per call: is a numba_flash call bound by Python or by the GPU?

For each step (the low-level forward and backward, the torch op, forward+backward through autograd, and
PyTorch SDPA's FlashAttention-2 for reference) it enqueues the step `--calls` times without
synchronising and reports the host milliseconds per call, then the GPU milliseconds per call (CUDA
events around a batch of calls). When host time reaches GPU time the GPU waits for Python and every
timing of that size measures the host. PyTorch runs a CUDA backward on its own device thread; the
"calling thread" step runs it on the caller's (`torch.autograd.set_multithreading_enabled(False)`), to
tell that hand-off's cost from the backward's. `--profile` adds the cProfile of the forward+backward step,
backward on the calling thread (a profile of the calling thread cannot see the device thread's work);
`--breakdown` times the step's API bodies on each thread without a profiler.

    python tools/host_overhead.py --seqlen 512 2048 --headdim 64
"""
import argparse
import cProfile
import io
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def per_call_ms(torch, fn, calls):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e3
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return host, start.elapsed_time(end) / calls


def steps(torch, nf, B, N, H, d, dtype):
    def rand(grad=False):
        return torch.randn(B, N, H, d, device="cuda", dtype=dtype, requires_grad=grad)
    q, k, v = rand(), rand(), rand()
    out, lse = nf.flash_attn_forward(q, k, v)
    dout = torch.randn_like(out)
    qg, kg, vg = rand(True), rand(True), rand(True)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def autograd_step():
        nf.flash_attn_func(qg, kg, vg).backward(dout)

    def autograd_step_here():
        with torch.autograd.set_multithreading_enabled(False):
            nf.flash_attn_func(qg, kg, vg).backward(dout)

    class Empty(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b, c):
            return a.detach()

        @staticmethod
        def backward(ctx, g):
            return g, None, None

    def empty_step():
        Empty.apply(qg, kg, vg).backward(dout)

    def sdpa_step():
        sdpa(qg.transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2)).backward(dout.transpose(1, 2))

    def op_forward():
        with torch.no_grad():
            return nf.flash_attn_func(q, k, v)

    mask = nf.BlockMask.random(0.125, seed=0, seqlen_q=N, seqlen_k=N)

    def op_forward_masked():
        with torch.no_grad():
            return nf.flash_attn_func(q, k, v, block_mask=mask)

    def autograd_step_masked():
        nf.flash_attn_func(qg, kg, vg, block_mask=mask).backward(dout)

    return {
        "api forward": lambda: nf.flash_attn_forward(q, k, v),
        "api forward, block mask 12.5%": lambda: nf.flash_attn_forward(q, k, v, block_mask=mask),
        "api backward": lambda: nf.flash_attn_backward(dout, q, k, v, out, lse),
        "torch op forward (no grad)": op_forward,
        "torch op forward, block mask 12.5% (no grad)": op_forward_masked,
        "autograd forward+backward": autograd_step,
        "autograd forward+backward, block mask 12.5%": autograd_step_masked,
        "autograd forward+backward, backward on the calling thread": autograd_step_here,
        "autograd.Function launching nothing, forward+backward": empty_step,
        "SDPA FA2 forward+backward": sdpa_step,
    }


def breakdown(torch, nf, B, N, H, d, dtype, calls):
    """Host ms per autograd forward+backward step (causal), with the backward on torch's device thread and
    on the calling thread, and inside it the API bodies and the backward's launches, timed per thread
    (perf_counter, no profiler: cProfile's own cost hides what it measures here)."""
    import collections
    import threading
    from numba_flash import api
    from numba_flash.kernels import backward
    acc, real = collections.defaultdict(float), {}

    def timed(mod, name):
        real[(mod, name)] = fn = getattr(mod, name)

        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                where = "calling" if threading.current_thread() is threading.main_thread() else "device"
                acc[f"{name} ({where} thread)"] += time.perf_counter() - t0
        setattr(mod, name, wrapper)
    # the API bodies: flash_attn_forward / _backward and the autograd path both run them (forward_checked,
    # backward_checked), the autograd path with the wrapper's checks of q, k, v
    for mod, name in ((api, "forward_checked"), (api, "backward_checked"), (backward, "launch")):
        timed(mod, name)
    try:
        q, k, v = (torch.randn(B, N, H, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        dout = torch.randn(B, N, H, d, device="cuda", dtype=dtype)
        for label, threads in (("backward on the device thread", True), ("backward on the calling thread", False)):
            with torch.autograd.set_multithreading_enabled(threads):
                for _ in range(5):
                    nf.flash_attn_func(q, k, v, causal=True).backward(dout)
                torch.cuda.synchronize()
                acc.clear()
                t0 = time.perf_counter()
                for _ in range(calls):
                    nf.flash_attn_func(q, k, v, causal=True).backward(dout)
                host = (time.perf_counter() - t0) / calls * 1e3
                torch.cuda.synchronize()
            parts = ", ".join(f"{k} {v / calls * 1e3:.3f}" for k, v in sorted(acc.items()))
            print(f"| {N} | {label} | {host:.3f} | {parts} |", flush=True)
    finally:
        for (mod, name), fn in real.items():
            setattr(mod, name, fn)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlen", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=16384, help="batch x seqlen (default 16384)")
    ap.add_argument("--nheads", type=int, default=16)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--profile", action="store_true", help="print cProfile of the autograd step")
    ap.add_argument("--breakdown", action="store_true",
                    help="time the autograd step's API bodies per thread, without a profiler (causal)")
    args = ap.parse_args(argv)

    import torch
    if not torch.cuda.is_available():
        print("host_overhead: needs a CUDA GPU (it measures launch overhead, which the simulator has not)")
        return 0
    import numba_flash as nf
    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, d={args.headdim}, H={args.nheads}, "
          f"batch x seqlen = {args.tokens}; ms per call")
    print("| N | step | host | GPU | bound by |\n|---:|---|---:|---:|---|")
    for N in args.seqlen:
        B = max(1, args.tokens // N)
        for name, fn in steps(torch, nf, B, N, args.nheads, args.headdim, dtype).items():
            host, gpu = per_call_ms(torch, fn, args.calls)
            print(f"| {N} | {name} | {host:.3f} | {gpu:.3f} | {'host' if host > 0.9 * gpu else 'GPU'} |",
                  flush=True)
        if args.breakdown:
            print("\n| N | causal autograd step | host ms | inside it, ms per step |\n|---:|---|---:|---|")
            breakdown(torch, nf, B, N, args.nheads, args.headdim, dtype, args.calls)
            print()
        if args.profile:
            fn = steps(torch, nf, B, N, args.nheads, args.headdim, dtype)[
                "autograd forward+backward, backward on the calling thread"]
            fn()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.calls):
                fn()
            prof.disable()
            torch.cuda.synchronize()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(35)
            print(text.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
