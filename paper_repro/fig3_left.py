"""Figure 3 left: forward, backward and forward + backward runtime against sequence length, 128 ... 64k.

numba_flash (dense, and block-sparse with a butterfly mask of 128 x 128 blocks, as the paper's
block-sparse FlashAttention) against PyTorch's standard attention, the SDPA backends (FlashAttention-2,
memory-efficient, cuDNN) and FlexAttention, float16, head dim 64, 16 heads, batch x seqlen = 16k tokens
(one sequence past 16k). A baseline that runs out of memory is recorded as OOM and the sweep goes on.
"""
from __future__ import annotations

from . import common

NAME = "fig3_left"
TITLE = "Figure 3 left: runtime against sequence length"
PAPER = {"setting": "forward + backward runtime, seq. length 128 ... 64k, head dim 64, A100 (with dropout "
                    "and masking in the paper); FlashAttention up to 3x faster than PyTorch's standard "
                    "attention, and the only exact method (with block-sparse FlashAttention) to reach 64k "
                    "without running out of memory; block-sparse faster than every approximate method"}
IMPLS = ("numba_flash", "numba_flash_sparse", "naive", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "flex")
PASSES = ("fwd", "bwd", "fwd+bwd")


def seqlens(ctx):
    if ctx.simulate:
        return (32,)
    if ctx.quick:
        return (512, 2048, 8192)
    return (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


def impls(ctx):
    if ctx.simulate:
        return ("numba_flash", "numba_flash_sparse", "naive")
    return tuple(i for i in IMPLS if not (ctx.quick and i == "flex"))   # flex compiles per shape


def run(ctx):
    import numba_flash as nf
    from numba_flash import bench

    H, d = (2, 16) if ctx.simulate else (16, 64)
    tokens = 64 if ctx.simulate else 16384
    block = (32, 32) if ctx.simulate else (128, 128)
    records = []
    grid = [(n, impl) for n in seqlens(ctx) for impl in impls(ctx)]
    inputs = {}
    for n, impl in ctx.progress(grid, NAME):
        B = max(1, tokens // n)
        cfg = common.config(B, n, H, d)
        if n not in inputs:
            inputs.clear()
            if not ctx.simulate:
                bench.free_memory()
            inputs[n] = bench.make_inputs(cfg, device=ctx.device)
        mask = None
        name = impl
        if impl == "numba_flash_sparse":
            mask, name = nf.BlockMask.butterfly(n, n, block), "numba_flash"
        try:
            recs = common.run_impl(ctx, name, cfg, PASSES, block_mask=mask, inputs=inputs[n])
        except Exception as e:          # inputs that do not fit: OOM for every pass
            recs = {p: bench.record(cfg, name, p, "OOM" if "out of memory" in str(e) else "error",
                                    note=bench.first_line(e)) for p in PASSES}
        for p, r in recs.items():
            records.append({"impl": impl, "seqlen": n, "batch": B, "pass": p, "status": r["status"],
                            "ms": r["ms"], "tflops": r["tflops"], "note": r.get("note", ""),
                            "density": float(mask.density) if mask is not None else 1.0})
    return {"heads": H, "headdim": d, "tokens": tokens, "records": records, "paper": PAPER}


def plot(result, path, simulated):
    fig, axes = common.figure(3, width=4.4)
    recs = result["records"]
    for ax, p in zip(axes, PASSES):
        for impl in dict.fromkeys(r["impl"] for r in recs):
            pts = [(r["seqlen"], r["ms"]) for r in recs if r["impl"] == impl and r["pass"] == p
                   and r["status"] == "ok"]
            if pts:
                ax.plot(*zip(*pts), "o-" if impl.startswith("numba_flash") else ".--", label=impl)
            oom = [r["seqlen"] for r in recs if r["impl"] == impl and r["pass"] == p and r["status"] == "OOM"]
            if oom:
                ax.plot(oom, [ax.get_ylim()[1] if pts else 1] * len(oom), "x", color="k")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("ms")
        ax.set_title(p)
    axes[0].legend(fontsize=6)
    common.finish(fig, path, simulated, TITLE + " (x: out of memory)")


def summary(result):
    recs = result["records"]
    ns = sorted({r["seqlen"] for r in recs})
    impls_ = list(dict.fromkeys(r["impl"] for r in recs))
    by = {(r["impl"], r["seqlen"], r["pass"]): r for r in recs}
    lines = [f"float16, head dim {result['headdim']}, {result['heads']} heads, batch × N = {result['tokens']} "
             f"tokens (one sequence beyond); "
             f"forward + backward milliseconds (OOM: out of memory, n/a: the backend refuses)", ""]
    rows = []
    for n in ns:
        row = [n]
        for impl in impls_:
            r = by.get((impl, n, "fwd+bwd"))
            row.append(common.fmt(r["ms"], "{:.3f}") if r and r["status"] == "ok" else (r["status"] if r else "—"))
        rows.append(row)
    lines += [common.md_table(["N", *impls_], rows), ""]
    if common.simulated(result):
        return "\n".join(lines + [common.SIMULATED_RATIOS])
    sp = []
    for n in ns:
        a, b = by.get(("numba_flash", n, "fwd+bwd")), by.get(("naive", n, "fwd+bwd"))
        if a and b and a["status"] == b["status"] == "ok":
            sp.append((n, b["ms"] / a["ms"]))
    if sp:
        lines.append("numba_flash against standard attention, forward + backward: "
                     + ", ".join(f"N={n} {x:.1f}x" for n, x in sp)
                     + " (paper: up to 3x on the A100).")
    small = [by.get(("numba_flash", n, "fwd")) for n in ns[:2]]
    if len(small) == 2 and all(r and r["status"] == "ok" for r in small) and small[1]["ms"] < 1.3 * small[0]["ms"]:
        lines.append(f"Up to N = {ns[1]} numba_flash's time hardly follows the work (forward "
                     f"{small[0]['ms']:.2f} ms at N = {ns[0]}, {small[1]['ms']:.2f} ms at N = {ns[1]}, where "
                     f"SDPA's FlashAttention-2 needs {by[('sdpa_flash', ns[0], 'fwd')]['ms']:.2f} ms): a fixed "
                     f"cost per call: the host side of a call outrunning the GPU work (tools/host_overhead.py "
                     f"measures it; see docs/PERFORMANCE.md).")
    oom = sorted({r["seqlen"] for r in recs if r["impl"] == "naive" and r["status"] == "OOM"})
    if oom:
        lines.append(f"Standard attention runs out of memory from N = {oom[0]}; numba_flash "
                     + ("runs every length." if all(by.get(("numba_flash", n, "fwd+bwd"), {}).get("status") == "ok"
                                                    for n in ns) else "does not run every length either."))
    f2 = [(n, by[("numba_flash", n, "fwd+bwd")], by.get(("sdpa_flash", n, "fwd+bwd"))) for n in ns
          if by.get(("numba_flash", n, "fwd+bwd"), {}).get("status") == "ok"]
    f2 = [(n, a, b) for n, a, b in f2 if b and b["status"] == "ok"]
    if f2:
        lines.append("Against SDPA's FlashAttention-2 (today's hand-written CUDA): "
                     + ", ".join(f"N={n} {b['ms'] / a['ms']:.2f}x" for n, a, b in f2)
                     + " (> 1: numba_flash faster).")
    return "\n".join(lines)
