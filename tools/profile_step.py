"""One attention call inside an NVTX range, for Nsight Compute's ``--nvtx-include "prof/"`` filter.

It warms the call up (compilation, autotuning) outside the range, then runs it once inside a range named
``prof``, so ``ncu --nvtx --nvtx-include "prof/"`` profiles exactly the kernels of that one call: ours
(forward, or the backward's kernels) or an SDPA backend's, on the same random inputs.

    ncu --nvtx --nvtx-include "prof/" --set full -o rep python tools/profile_step.py --impl numba_flash --d 64
    tools/gpu_check.sh profile OUT IMPL D CAUSAL PASS      (the same, with a text export of the report)
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", default="numba_flash", choices=["numba_flash", "sdpa_cudnn", "sdpa_flash"])
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--N", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=16384, help="batch × N")
    p.add_argument("--hidden", type=int, default=2048, help="heads × d")
    p.add_argument("--causal", type=int, default=0)
    p.add_argument("--pass", dest="pass_", default="fwd", choices=["fwd", "bwd"])
    a = p.parse_args(argv)

    import torch
    B, H = max(1, a.tokens // a.N), a.hidden // a.d
    q, k, v, do = (torch.randn(B, a.N, H, a.d, device="cuda", dtype=torch.float16) for _ in range(4))
    causal = bool(a.causal)
    if a.impl == "numba_flash":
        import numba_flash as nf

        def fwd():
            return nf.flash_attn_forward(q, k, v, causal=causal)

        out, lse = fwd()

        def bwd():
            return nf.flash_attn_backward(do, q, k, v, out, lse, causal=causal)
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = SDPBackend.CUDNN_ATTENTION if a.impl == "sdpa_cudnn" else SDPBackend.FLASH_ATTENTION
        qt, kt, vt, dot = (x.transpose(1, 2).detach().requires_grad_(True) for x in (q, k, v, do))

        def fwd():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

        out = fwd()

        def bwd():
            return torch.autograd.grad(out, (qt, kt, vt), dot, retain_graph=True)
    step = fwd if a.pass_ == "fwd" else bwd
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("prof")
    step()
    torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    print(f"profiled {a.impl} {a.pass_} d={a.d} N={a.N} B={B} H={H} causal={causal}")


if __name__ == "__main__":
    main()
