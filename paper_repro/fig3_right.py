"""Figure 3 right: peak memory against sequence length, at a fixed batch (2 sequences, 16 heads, d 64).

For each implementation the peak of torch's allocator during one forward and during one forward +
backward, minus what was allocated before (the inputs). numba_flash allocates O and the log-sum-exp (and
in the backward its gradients and D): linear in N. Standard attention materialises N x N scores and
probabilities per head: quadratic. Under the simulator there is no GPU allocator, and the analytic sizes
stand in (labelled).
"""
from __future__ import annotations

from . import common

NAME = "fig3_right"
TITLE = "Figure 3 right: peak memory against sequence length"
PAPER = {"setting": "memory footprint against seq. length, A100: FlashAttention's grows linearly, up to "
                    "20x less than exact baselines (PyTorch standard attention, Megatron), the same as "
                    "approximate ones except Linformer"}
IMPLS = ("numba_flash", "naive", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn")


def seqlens(ctx):
    if ctx.simulate:
        return (32, 64)
    if ctx.quick:
        return (256, 1024, 4096, 16384, 65536)
    return (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


def _analytic_mib(impl, B, H, N, d, e=2):
    if impl == "naive":        # S, the scaled S and P: N x N each per head (the forward keeps P)
        return 3 * B * H * N * N * e / 2**20
    return (B * N * H * d * e + B * H * N * 4) / 2**20          # O and lse


def _peaks(forward, q, k, v, dout):
    import torch
    from numba_flash.bench import forward_peak_mib
    fwd = forward_peak_mib(forward)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    forward().backward(dout)
    torch.cuda.synchronize()
    both = (torch.cuda.max_memory_allocated() - before) / 2**20
    q.grad = k.grad = v.grad = None
    return fwd, both


def run(ctx):
    import torch
    from numba_flash import bench

    B, H, d = (1, 2, 16) if ctx.simulate else (2, 16, 64)
    impls = ("numba_flash", "naive") if ctx.simulate else IMPLS
    rows = []
    for n in ctx.progress(seqlens(ctx), NAME):
        cfg = common.config(B, n, H, d)
        if ctx.simulate:
            for impl in impls:
                rows.append({"impl": impl, "seqlen": n, "status": "ok", "fwd_mib": _analytic_mib(impl, B, H, n, d),
                             "fwd_bwd_mib": None, "analytic": True})
            continue
        try:
            q, k, v, dout = bench.make_inputs(cfg)
        except torch.cuda.OutOfMemoryError:
            rows += [{"impl": i, "seqlen": n, "status": "OOM", "fwd_mib": None, "fwd_bwd_mib": None} for i in impls]
            continue
        for impl in impls:
            rec = {"impl": impl, "seqlen": n, "status": "ok", "fwd_mib": None, "fwd_bwd_mib": None,
                   "analytic_mib": _analytic_mib(impl, B, H, n, d)}
            try:
                forward, context = bench.make_forward(impl, q, k, v, False)
                status, note = bench.probe(forward, context)
                if status != "ok":
                    rec.update(status=status, note=note)
                else:
                    with context():
                        rec["fwd_mib"], rec["fwd_bwd_mib"] = _peaks(forward, q, k, v, dout)
            except torch.cuda.OutOfMemoryError:
                rec["status"] = "OOM"
            except bench.Unavailable as e:
                rec.update(status="n/a", note=str(e))
            bench.free_memory()
            rows.append(rec)
        del q, k, v, dout
        bench.free_memory()
    return {"batch": B, "heads": H, "headdim": d, "rows": rows, "paper": PAPER,
            "analytic": ctx.simulate}


def plot(result, path, simulated):
    fig, (ax,) = common.figure(1)
    rows = result["rows"]
    for impl in dict.fromkeys(r["impl"] for r in rows):
        pts = [(r["seqlen"], r["fwd_mib"]) for r in rows if r["impl"] == impl and r["status"] == "ok"
               and r["fwd_mib"]]
        if pts:
            ax.plot(*zip(*pts), "o-" if impl == "numba_flash" else ".--", label=impl)
        oom = [r["seqlen"] for r in rows if r["impl"] == impl and r["status"] == "OOM"]
        if oom and pts:
            ax.plot(oom, [max(p[1] for p in pts)] * len(oom), "x", color="k")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("peak extra memory of a forward (MiB)")
    ax.legend(fontsize=7)
    common.finish(fig, path, simulated, TITLE + (" (analytic sizes)" if result.get("analytic") else " (x: OOM)"))


def summary(result):
    rows = result["rows"]
    by = {(r["impl"], r["seqlen"]): r for r in rows}
    ns = sorted({r["seqlen"] for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))

    def cell(r, key):
        if r is None:
            return "—"
        return common.fmt(r.get(key), "{:.4g}") if r["status"] == "ok" else r["status"]
    table = common.md_table(["N", *[f"{i} fwd MiB" for i in impls], "numba_flash fwd+bwd MiB",
                             "naive fwd+bwd MiB"],
                            [[n, *[cell(by.get((i, n)), "fwd_mib") for i in impls],
                              cell(by.get(("numba_flash", n)), "fwd_bwd_mib"), cell(by.get(("naive", n)),
                                                                                      "fwd_bwd_mib")]
                             for n in ns])
    lines = [f"batch {result['batch']}, {result['heads']} heads, head dim {result['headdim']}, float16"
             + (" (analytic sizes: simulator)" if result.get("analytic") else ""), "", table, ""]
    factors = []
    for n in ns:
        a, b = by.get(("numba_flash", n)), by.get(("naive", n))
        if a and b and a["status"] == b["status"] == "ok" and a["fwd_mib"] and b["fwd_mib"]:
            factors.append((n, b["fwd_mib"] / a["fwd_mib"]))
    if factors:
        lines.append("Standard attention's forward needs this many times numba_flash's memory: "
                     + ", ".join(f"N={n} {f:.0f}x" for n, f in factors)
                     + " (paper: up to 20x); the factor grows linearly with N because one is quadratic "
                       "and the other linear.")
    nf = [(n, by[("numba_flash", n)]["fwd_mib"]) for n in ns
          if by.get(("numba_flash", n), {}).get("status") == "ok" and by[("numba_flash", n)]["fwd_mib"]]
    if len(nf) >= 2:
        (n0, m0), (n1, m1) = nf[0], nf[-1]
        lines.append(f"numba_flash's own memory grows {m1 / m0:.0f}x from N={n0} to N={n1} "
                     f"({n1 / n0:.0f}x the length): linear.")
    return "\n".join(lines)
