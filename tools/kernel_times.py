"""Where a forward + backward step's GPU time goes: per-kernel times from torch.profiler (CUPTI).

For each implementation and shape it runs the step (forward, then ``out.backward(dout)``) a few times
under ``torch.profiler`` and prints, per kernel, its GPU microseconds per step, its share, and the
step's total kernel time against its wall time (events around the same steps): a gap between the two is
time the GPU waited (host, launch gaps). The implementations are the benchmark's (numba_flash.bench).

    python tools/kernel_times.py --impl numba_flash,sdpa_flash --N 1024,4096 --d 64,128 --causal 0,1
"""
import argparse
import collections
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ints(s):
    return [int(x) for x in s.split(",")]


def profile_step(torch, step, steps):
    """(kernel name -> total µs over `steps` calls, wall µs over the same calls)."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
    times = collections.Counter()
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            times[ev.name] += ev.device_time if hasattr(ev, "device_time") else ev.cuda_time
    return times, start.elapsed_time(end) * 1e3


def _mangled_names(name):
    """The length-prefixed identifiers of an Itanium-mangled name (_ZN6cudapy11numba_flash...)."""
    out, i = [], 0
    while i < len(name):
        m = re.match(r"\d+", name[i:])
        if m is None:
            i += 1
            continue
        n = int(m.group())
        i += len(m.group())
        out.append(name[i:i + n])
        i += n
    return out


def short(name, width=60):
    """A readable kernel name: Numba's mangled names (_Z...) shortened to their flash_*/bwd_* part."""
    if name.startswith("_Z"):
        parts = [p for p in _mangled_names(name) if re.match(r"(flash|bwd|fwd)_", p)]
        if parts:
            name = "numba_flash " + parts[0]
    name = name.split("(")[0]
    return name if len(name) <= width else name[:width - 3] + "..."


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", default="numba_flash,sdpa_flash")
    ap.add_argument("--N", default="1024,4096")
    ap.add_argument("--d", default="64,128")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args(argv)

    import torch
    from numba_flash.bench.impls import make_forward, make_inputs, pass_step
    from numba_flash.bench.problem import Config, attention_flops

    for d in _ints(a.d):
        for n in _ints(a.N):
            for causal in _ints(a.causal):
                cfg = Config.from_tokens(a.tokens, a.hidden, n, d, a.dtype, bool(causal))
                q, k, v, dout = make_inputs(cfg)
                print(f"\n## {cfg.label()}")
                for impl in a.impl.split(","):
                    forward, ctx = make_forward(impl, q, k, v, bool(causal))
                    inner = pass_step("fwd+bwd", forward, q, k, v, dout)

                    def step():
                        for x in (q, k, v):
                            x.grad = None
                        with ctx():
                            inner()
                    times, wall = profile_step(torch, step, a.steps)
                    total = sum(times.values()) / a.steps
                    wall /= a.steps
                    tflops = attention_flops(cfg, "fwd+bwd") / (wall * 1e-6) / 1e12
                    print(f"{impl}: kernels {total:8.1f} µs, wall {wall:8.1f} µs per step "
                          f"({tflops:.0f} TFLOP/s counted on wall time)")
                    for name, t in times.most_common():
                        t /= a.steps
                        if t >= 0.005 * total:
                            print(f"    {t:8.1f} µs  {100 * t / total:5.1f}%  {short(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
