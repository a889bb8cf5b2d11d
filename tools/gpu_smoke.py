"""One device call's worth of checks while developing: correctness on a few configs, then quick timings.

    python tools/gpu_smoke.py [--time]

Not the benchmark (numba_flash/bench.py is); this is the developer's first look at a kernel change.
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F

import numba_flash as nf


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def ref(q, k, v, causal, dout):
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    Nq, Nk = q.shape[1], k.shape[1]
    s = torch.einsum("bqhd,bkhd->bhqk", q64, k64) / math.sqrt(q.shape[-1])
    if causal:
        mask = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).tril(Nk - Nq)
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    o = torch.einsum("bhqk,bkhd->bqhd", p, v64)
    o.backward(dout.double())
    return o, q64.grad, k64.grad, v64.grad


def check():
    torch.manual_seed(int(time.time()))
    worst = 0.0
    for (B, Nq, Nk, H, d, causal, dt) in [
        (2, 200, 200, 3, 64, False, torch.float32), (1, 333, 517, 2, 64, True, torch.float32),
        (1, 517, 333, 2, 128, True, torch.float32), (2, 256, 256, 2, 96, False, torch.float32),
        (1, 130, 130, 2, 256, True, torch.float32), (1, 100, 77, 1, 16, False, torch.float32),
        (2, 300, 300, 2, 64, True, torch.float16), (2, 300, 300, 2, 128, False, torch.bfloat16),
        (1, 64, 64, 1, 32, False, torch.float64),
    ]:
        q, k, v = (torch.randn(B, n, H, d, device="cuda", dtype=dt, requires_grad=True)
                   for n in (Nq, Nk, Nk))
        dout = torch.randn(B, Nq, H, d, device="cuda", dtype=dt)
        o = nf.flash_attn_func(q, k, v, causal=causal)
        o.backward(dout)
        ro, rq, rk, rv = ref(q, k, v, causal, dout)
        errs = [rel(o, ro), rel(q.grad, rq), rel(k.grad, rk), rel(v.grad, rv)]
        tol = 1e-5 if dt in (torch.float32, torch.float64) else 1e-2
        ok = all(e < tol for e in errs)
        worst = max(worst, max(errs) / tol)
        print(f"{'ok ' if ok else 'BAD'} B={B} Nq={Nq} Nk={Nk} H={H} d={d} causal={causal} {dt}: "
              + " ".join(f"{e:.2e}" for e in errs), flush=True)
    return worst


def bench(fn, reps=20):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def timing():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for d, dt, N, causal in [(64, torch.float32, 4096, False), (64, torch.float16, 4096, False),
                             (128, torch.float16, 4096, False), (64, torch.float32, 8192, False),
                             (64, torch.float32, 8192, True)]:
        H = 2048 // d
        B = 16384 // N
        q, k, v = (torch.randn(B, N, H, d, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
        dout = torch.randn_like(q)
        flops = 4 * B * H * N * N * d / (2 if causal else 1)
        res = {}
        ms = bench(lambda: nf.flash_attn_func(q, k, v, causal=causal))
        res["nf fwd"] = flops / ms / 1e9
        o = nf.flash_attn_func(q, k, v, causal=causal)
        ms_b = bench(lambda: torch.autograd.grad(o, (q, k, v), dout, retain_graph=True))
        res["nf bwd"] = 2.5 * flops / ms_b / 1e9
        qt, kt, vt = (x.detach().transpose(1, 2) for x in (q, k, v))
        for name, be in (("eff", SDPBackend.EFFICIENT_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                         ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel(be):
                    ms = bench(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal))
                res[name + " fwd"] = flops / ms / 1e9
            except Exception:
                res[name + " fwd"] = float("nan")
        print(f"d={d} {dt} N={N} causal={causal}: " + "  ".join(f"{k}={v:.1f}" for k, v in res.items()),
              flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--time", action="store_true")
    a = ap.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    w = check()
    print("worst error / tolerance:", w)
    if a.time:
        timing()
