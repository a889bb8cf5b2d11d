"""Time the kernels under several tile configurations (tuning runs on the GPU; see configs.py).

    python tools/tune.py --pass fwd --d 64 --dtype float32 --configs 64,64,16,16 64,32,16,8
"""
import argparse
import os

import torch
import triton.testing

import numba_flash as nf


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pass", dest="which", default="fwd", choices=["fwd", "bwd"])
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--N", type=int, default=4096)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--causal", type=int, default=0)
    ap.add_argument("--configs", nargs="+", required=True)
    a = ap.parse_args()
    dt = getattr(torch, a.dtype)
    H, B = 2048 // a.d, 16384 // a.N
    q, k, v = (torch.randn(B, a.N, H, a.d, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    flops = 4 * B * H * a.N * a.N * a.d / (2 if a.causal else 1) * (2.5 if a.which == "bwd" else 1)
    var = "NUMBA_FLASH_FWD_TILES" if a.which == "fwd" else "NUMBA_FLASH_BWD_TILES"
    ref = None
    for c in a.configs:
        os.environ[var] = c
        try:
            if a.which == "fwd":
                fn = lambda: nf.flash_attn_forward(q.detach(), k.detach(), v.detach(), causal=bool(a.causal))
                res = fn()[0]
            else:
                o, lse = nf.flash_attn_forward(q.detach(), k.detach(), v.detach(), causal=bool(a.causal))
                fn = lambda: nf.flash_attn_backward(dout, q.detach(), k.detach(), v.detach(), o, lse,
                                                    causal=bool(a.causal))
                res = fn()[0]
            if ref is None:
                ref = res.clone()
            err = ((res.double() - ref.double()).norm() / ref.double().norm()).item()
            ms = triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")
            print(f"{a.which} d={a.d} {a.dtype} N={a.N} causal={a.causal} tiles={c:14s} "
                  f"{ms:8.3f} ms {flops / ms / 1e9:6.1f} TFLOP/s  (diff vs first {err:.1e})", flush=True)
        except Exception as e:
            print(f"{c}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)


if __name__ == "__main__":
    main()
