"""What every experiment shares: the run context, timing and memory (numba_flash.bench's), the JSON and
PNG outputs, and the analytic FLOP and HBM-byte counts.

Timing, implementations and memory come from :mod:`numba_flash.bench` (one copy of those helpers for the
benchmark and the reproduction). Under the simulator there is no CUDA clock or allocator: runs time
with the host clock, report memory from the analytic count, and are labelled as not measurements.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
NOT_A_MEASUREMENT = ("SIMULATED: Numba's CUDA simulator on the CPU at toy sizes; the numbers check that "
                     "the scripts run and are not measurements")


@dataclasses.dataclass
class Context:
    """One run: quick or full sizes, simulator or GPU, where results go."""
    quick: bool
    simulate: bool
    out: Path
    argv: list

    @property
    def device(self) -> str:
        return "cpu" if self.simulate else "cuda"

    def progress(self, items, desc):
        from numba_flash.bench import progress
        return progress(list(items), desc)

    def timing(self):
        """numba_flash.bench.Timing, shorter in --quick runs."""
        from numba_flash.bench import Timing
        # a long warm-up: after a compile or an idle pause the GPU clock has dropped, and it takes ~100 ms
        # of work to come back (a 10 ms warm-up measured 3-6x slow runs right after compiles)
        return Timing(150.0, 40.0) if self.quick else Timing(200.0, 100.0)

    def time_ms(self, fn, grad_to_none=()):
        """Median milliseconds of fn: CUDA-event timing on a GPU, host seconds under the simulator."""
        if not self.simulate:
            return self.timing().median_ms(fn, grad_to_none)
        times = []
        for _ in range(1):          # the simulator is slow and its times mean nothing: one call
            for x in grad_to_none:
                x.grad = None
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def gpu_slug(simulate: bool) -> str:
    """Folder name of a GPU ("nvidia-h200"), or "simulator"."""
    if simulate:
        return "simulator"
    import torch
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def environment(ctx: Context) -> dict:
    from numba_flash.bench import environment as env
    meta = env()
    meta["command"] = " ".join(["python -m paper_repro", *ctx.argv])
    meta["quick"] = ctx.quick
    meta["simulated"] = ctx.simulate
    meta["numba_flash_paths"] = default_paths(ctx)
    if ctx.simulate:
        meta["note"] = NOT_A_MEASUREMENT
    return meta


def default_path(ctx: Context, d: int, pass_: str = "fwd") -> str:
    """The kernel path numba_flash's default dispatch takes here for float16 at head dim d."""
    from numba_flash.kernels import configs
    if ctx.simulate:
        cap = None
    else:
        import torch
        cap = torch.cuda.get_device_capability()
    return configs.resolve_backend("auto", "float16", cap, d, pass_)


def default_paths(ctx: Context) -> str:
    """default_path at the head dims the experiments use, e.g. "d=64: fwd wgmma, bwd wgmma; d=128: ..."."""
    from numba_flash.kernels import configs
    return "; ".join(f"d={d}: " + ", ".join(f"{p} {default_path(ctx, d, p)}" for p in configs.PASSES)
                     for d in (64, 128))


def save(ctx: Context, name: str, result: dict):
    """results/<gpu>/<name>.json with the environment; returns (path, the payload as saved)."""
    ctx.out.mkdir(parents=True, exist_ok=True)
    path = ctx.out / f"{name}.json"
    payload = {"experiment": name, "meta": environment(ctx), **result}
    text = json.dumps(payload, indent=1, default=_json_default) + "\n"
    path.write_text(text)
    return path, json.loads(text)


def simulated(result) -> bool:
    return bool(result.get("meta", {}).get("simulated"))


SIMULATED_RATIOS = ("Simulated run: the times above are the simulator's host seconds, so no ratio between "
                    "implementations is drawn from them.")


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return str(x)


def load(folder: Path, name: str):
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def figure(ncols=1, width=5.5, height=4.0):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, axes[0]


def finish(fig, path: Path, simulated: bool, title: str):
    fig.suptitle(title + ("\n(simulator: not a measurement)" if simulated else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)


def md_table(header, rows):
    from numba_flash.bench import md_table as table
    return "\n".join(table(header, rows))


def fmt(x, spec="{:.3g}"):
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    return spec.format(x)


# ---------------------------------------------------------------------------------------------
# analytic counts (B batch, H heads, N = seqlen, d head dim, e bytes per element)
# ---------------------------------------------------------------------------------------------

def matmul_flops(B, H, N, d, causal=False):
    """One N x N x d product of every head: 2 B H N^2 d (halved when causal)."""
    return 2.0 * B * H * N * N * d / (2 if causal else 1)


def flops(impl: str, B, H, N, d, passes="fwd+bwd", causal=False):
    """Matrix-product FLOPs actually executed. Standard attention: 2 products forward (S, O), 4 backward
    (dV, dP, dQ, dK). FlashAttention recomputes S in the backward pass: 5 there (the paper's count,
    numba_flash's deterministic=False); numba_flash's deterministic backward has a separate dQ kernel that
    recomputes S and dP too: 7."""
    fwd = 2
    bwd = {"standard": 4, "numba_flash_nd": 5, "numba_flash": 7}[impl]
    n = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[passes]
    return n * matmul_flops(B, H, N, d, causal)


def standard_hbm_bytes(B, H, N, d, e=2, passes="fwd+bwd"):
    """Bytes standard attention (PyTorch: matmul, scale, softmax, matmul; autograd) moves through HBM,
    each kernel reading its inputs and writing its outputs once: forward Q, K in / S out; S in / S' out
    (scale); S' in / P out (softmax); P, V in / O out. Backward: dO, V in / dP out; P, dO in / dV out;
    P, dP in / dS out (softmax); dS in / dS' out (scale); dS', K in / dQ out; dS', Q in / dK out."""
    nd, nn = B * H * N * d * e, B * H * N * N * e
    fwd = 4 * nd + 6 * nn
    bwd = 8 * nd + 10 * nn
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[passes]


def flash_hbm_bytes(B, H, N, d, br=128, bc=64, e=2, passes="fwd"):
    """Bytes numba_flash's kernels request from memory, with no cache between HBM and shared memory (the
    paper's model, Theorem 2): forward Q and O once, K and V once per query tile (N / Br times), lse.
    Backward (deterministic): D from O and dO; dK/dV reads K, V once and Q, dO, lse, D once per key
    tile; dQ reads Q, dO once and K, V once per query tile; dQ, dK, dV written once."""
    nd = B * H * N * d * e
    tr, tc = math.ceil(N / br), math.ceil(N / bc)
    fwd = 2 * nd + 2 * nd * tr + 4 * B * H * N
    bwd = 3 * nd + (2 * nd + tc * (2 * nd + 8 * B * H * N)) + (2 * nd + tr * 2 * nd) + 3 * nd
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[passes]


def minimal_hbm_bytes(B, H, N, d, e=2, passes="fwd"):
    """Each input read once and each output written once: forward Q, K, V, O; backward Q, K, V, O, dO,
    dQ, dK, dV (and lse)."""
    nd = B * H * N * d * e
    fwd, bwd = 4 * nd, 8 * nd
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[passes]



# ---------------------------------------------------------------------------------------------
# running an implementation
# ---------------------------------------------------------------------------------------------

def config(B, N, H, d, dtype="float16", causal=False):
    from numba_flash.bench import Config
    return Config(B, N, H, d, dtype, causal)


def run_impl(ctx: Context, impl: str, cfg, passes, block_mask=None, inputs=None) -> dict:
    """{pass: record} for one implementation (numba_flash.bench records: status, ms, tflops, mem_mib).
    On a GPU this is numba_flash.bench.measure_impl; under the simulator the same steps timed with the
    host clock (and no memory counter)."""
    from numba_flash import bench
    q, k, v, dout = inputs if inputs is not None else bench.make_inputs(cfg, device=ctx.device)
    if not ctx.simulate:
        recs = bench.measure_impl(impl, cfg, q, k, v, dout, passes, ctx.timing(), block_mask=block_mask)
        return {r["pass"]: r for r in recs}
    out = {}
    try:
        forward, context = bench.make_forward(impl, q, k, v, cfg.causal, block_mask=block_mask)
    except bench.Unavailable as e:
        return {p: bench.record(cfg, impl, p, "n/a", note=str(e)) for p in passes}
    for p in passes:
        try:
            with context():
                step = bench.pass_step(p, forward, q, k, v, dout)
                ms = ctx.time_ms(step, (q, k, v) if p == "fwd+bwd" else ())
            out[p] = bench.record(cfg, impl, p, "ok", ms)
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
            out[p] = bench.record(cfg, impl, p, "n/a", note=bench.first_line(e))
    return out


def hbm_or_error(ctx: Context, cases):
    """hbm.measure(cases) on a GPU; under the simulator (or where ncu fails) a list of None and why."""
    if ctx.simulate:
        return [None] * len(cases), "simulator: no hardware counters"
    from . import hbm
    try:
        return hbm.measure(cases), None
    except Exception as e:        # no ncu, or ncu refused: the analytic model stays, the reason is shown
        return [None] * len(cases), f"ncu: {str(e)[:300]}"


def lstsq(features, y):
    """Least-squares coefficients of y ~ features @ c, and the fit's relative RMS residual."""
    import numpy as np
    A, y = np.asarray(features, float), np.asarray(y, float)
    c, *_ = np.linalg.lstsq(A, y, rcond=None)
    resid = float(np.sqrt(np.mean(((A @ c - y) / y) ** 2)))
    return c.tolist(), resid
