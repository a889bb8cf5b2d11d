"""Time the kernels under several tile configurations on a GPU (tuning runs; the defaults live in
numba_flash/kernels/configs.py).

    python tools/tune.py --backend mma --dtype float16 --d 64 --N 4096 \\
        fwd=128,64,4,1 fwd=128,64,8,1 dkdv=64,64,4,1 dq=64,64,4,1

Each configuration is KERNEL[@DQ]=TILES with KERNEL one of fwd, dkdv, dq, bwd (both backward kernels),
TILES as the NUMBA_FLASH_*_TILES variables take them: "br,bc,ty,tx[,min_blocks]" (simt) or
"br,bc,warps,a_regs[,min_blocks]" (mma), and DQ how the backward computes dQ (kernel or atomic:
NUMBA_FLASH_DQ_MODE, kernels/configs.py), e.g. dkdv@atomic=64,128,8,1,1, optionally followed by
";NAME=VALUE" environment settings of that configuration's process (e.g. "fwd=;NUMBA_FLASH_WORK_ORDER=cyclic":
the default tiles, the cyclic work order). A fwd configuration times
flash_attn_forward; the others time flash_attn_backward. Every configuration gets its own process, so
all of them compile at once; then they time one after another (a barrier and a lock keep the GPU to one
at a time). Each is checked
against the default configuration's output. Shapes: batch x N = 16k tokens, hidden 2048 (as the
benchmark). Prints one line per configuration: milliseconds (median, triton.testing.do_bench) and
TFLOP/s (4 B H N^2 d per forward, x2.5 backward; halved when causal).
"""
import argparse
import multiprocessing as mp
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARS = {"fwd": ["NUMBA_FLASH_FWD_TILES"], "dkdv": ["NUMBA_FLASH_DKDV_TILES"],
        "dq": ["NUMBA_FLASH_DQ_TILES"], "bwd": ["NUMBA_FLASH_BWD_TILES"]}


def _work(cfg, a, barrier, lock, results):
    spec, *env = cfg.split(";")
    for assignment in env:                   # ;NAME=VALUE: an environment variable of this configuration
        name, _, value = assignment.partition("=")
        os.environ[name] = value
    kernel, _, tiles = spec.partition("=")
    kernel, _, mode = kernel.partition("@")
    if mode:
        os.environ["NUMBA_FLASH_DQ_MODE"] = mode
    if tiles:
        for var in VARS[kernel]:
            os.environ[var] = tiles
    import torch
    import triton.testing
    import numba_flash as nf

    torch.manual_seed(0)
    dt = getattr(torch, a.dtype)
    H, B = a.hidden // a.d, max(1, a.tokens // a.N)
    q, k, v, dout = (torch.randn(B, a.N, H, a.d, device="cuda", dtype=dt) for _ in range(4))
    causal = bool(a.causal)
    if kernel == "fwd":
        def fn():
            return nf.flash_attn_forward(q, k, v, causal=causal, backend=a.backend)[0]
    else:
        def fn():
            return nf.flash_attn_backward(dout, q, k, v, out, lse, causal=causal, backend=a.backend)[0]
    try:   # every worker reaches the barrier, also when its configuration fails
        out, lse = nf.flash_attn_forward(q, k, v, causal=causal, backend=a.backend)
        res = fn().double()          # compiles (all workers at once)
        err = None
    except Exception as e:          # a configuration that does not build or launch
        res, err = None, f"{type(e).__name__}: {str(e)[:160]}"
    torch.cuda.synchronize()
    barrier.wait(timeout=900)
    with lock:
        if err is None:
            ms = triton.testing.do_bench(fn, warmup=25, rep=a.rep_ms, return_mode="median")
            flops = 4 * B * H * a.N * a.N * a.d / (2 if causal else 1) * (1 if kernel == "fwd" else 2.5)
            results[cfg] = (ms, flops / ms / 1e9, res.cpu())
        else:
            results[cfg] = (None, None, err)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="+", help="KERNEL=TILES, or KERNEL alone for the default tiles")
    ap.add_argument("--backend", default="mma", choices=["simt", "mma", "wgmma", "tf32"])
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--N", type=int, default=4096)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--causal", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--rep-ms", type=int, default=200)
    a = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    cfgs = list(dict.fromkeys(a.configs))
    for kernel in {c.partition("=")[0] for c in cfgs}:
        if kernel.partition("@")[0] not in VARS:
            ap.error(f"unknown kernel {kernel!r} in a configuration: use fwd, dkdv, dq or bwd")
        if kernel not in cfgs:
            cfgs.insert(0, kernel)             # the default tiles, for the comparison
    mgr = ctx.Manager()
    results, barrier, lock = mgr.dict(), ctx.Barrier(len(cfgs)), ctx.Lock()
    procs = [ctx.Process(target=_work, args=(c, a, barrier, lock, results)) for c in cfgs]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    for c in cfgs:
        ms, tf, res = results.get(c, (None, None, "worker died"))
        if ms is None:
            print(f"{a.backend} d={a.d} N={a.N} {a.dtype} causal={a.causal} {c:24s} FAILED {res}", flush=True)
            continue
        base = results[c.partition("=")[0]][2]
        diff = float((res - base).norm() / base.norm()) if not isinstance(base, str) else float("nan")
        print(f"{a.backend} d={a.d} N={a.N} {a.dtype} causal={a.causal} {c:24s} {ms:8.3f} ms "
              f"{tf:6.1f} TFLOP/s  (vs default {diff:.1e})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
