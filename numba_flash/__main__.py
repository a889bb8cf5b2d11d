"""``python -m numba_flash`` / ``numba-flash``: check numba_flash against a reference, then time it.

On a GPU: forward and backward of ``flash_attn_func`` are compared with PyTorch (float64 SDPA math
on upcast inputs) at a small size, then a short table gives forward and forward+backward TFLOP/s and
the forward's peak extra memory for numba_flash, naive attention and the SDPA backends (d=64,
N=1024 and 4096, float16 and float32, non-causal), measured by :mod:`numba_flash.bench`.

Without a GPU: the same kernels run under Numba's CUDA simulator on small numpy inputs (B=1, N=48,
H=2, d=16, causal and not) through ``flash_attn_forward`` / ``flash_attn_backward`` and are
compared with ``attention_reference`` / ``attention_reference_backward``: the SIMT kernels in
float32 (tolerance 1e-5) and the tensor-core kernels in float16 (simulated mma.sync, tolerance
1e-2). Exit status 1 if a relative error exceeds its tolerance.

Whether there is a GPU is decided by :mod:`numba_flash.runtime` (shared with the benchmark and the
tests): if there is none and ``numba.cuda`` is not yet imported, the simulator is switched on here; if it
was already imported against the real driver, the command runs again in a child interpreter with the
simulator on.
"""

from __future__ import annotations

import sys
import time

from numba_flash import runtime

# (dtype, backend, tolerance): float16 outputs and gradients are rounded to float16 (2^-11 relative).
SIM_TOL = (("float32", "simt", 1e-5), ("float16", "mma", 1e-2))
SIM_SIZE = dict(batch=1, seqlen=48, nheads=2, headdim=16)  # 48: not a multiple of any tile
GPU_CHECK = dict(batch=2, nheads=4, headdim=64, seqlens=(256, 200))
GPU_TABLE = dict(headdim=64, seqlens=(1024, 4096), dtypes=("float16", "float32"))


# ---------------------------------------------------------------------------------------------
# no GPU: the simulator
# ---------------------------------------------------------------------------------------------

def _host(x):
    """numpy array from whatever the low-level API returned (numpy, simulator device array, torch)."""
    import numpy as np
    if hasattr(x, "copy_to_host"):
        return x.copy_to_host()
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _rel_err(x, ref) -> float:
    import numpy as np
    x, ref = np.asarray(x, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    finite = np.isfinite(ref)
    if not np.array_equal(finite, np.isfinite(x)) or not np.array_equal(x[~finite], ref[~finite]):
        return float("inf")  # lse: -inf exactly where the reference has it, nowhere else
    return float(np.linalg.norm(x[finite] - ref[finite]) / max(np.linalg.norm(ref[finite]), 1e-300))


def run_simulator() -> int:
    print(runtime.BANNER, flush=True)
    import numpy as np

    import numba
    import numba_flash as nf

    print(f"numba {numba.__version__}, numpy {np.__version__}; "
          f"B={SIM_SIZE['batch']} N={SIM_SIZE['seqlen']} H={SIM_SIZE['nheads']} "
          f"d={SIM_SIZE['headdim']}; relative error ‖x − ref‖/‖ref‖ against the float64 numpy "
          f"reference; tolerance {SIM_TOL[0][2]:.0e} (float32, SIMT kernels), "
          f"{SIM_TOL[1][2]:.0e} (float16, tensor-core kernels, simulated mma.sync)")
    rng = np.random.default_rng()  # fresh inputs every run (METHOD.md: any valid input)
    shape = (SIM_SIZE["batch"], SIM_SIZE["seqlen"], SIM_SIZE["nheads"], SIM_SIZE["headdim"])
    names = ("out", "lse", "dq", "dk", "dv")
    print("| path | mask | " + " | ".join(names) + " | seconds |")
    print("|---|---|" + "---:|" * (len(names) + 1))
    failed = False
    for dtype, backend, tol in SIM_TOL:
        for causal in (False, True):
            label = f"| {backend} {dtype} | {'causal' if causal else 'non-causal'} |"
            q, k, v, dout = (rng.standard_normal(shape).astype(dtype) for _ in range(4))
            t0 = time.perf_counter()
            try:
                out, lse = nf.flash_attn_forward(q, k, v, causal=causal, backend=backend)
                out, lse = _host(out), _host(lse)
                grads = nf.flash_attn_backward(dout, q, k, v, out, lse, causal=causal, backend=backend)
                got = (out, lse, *(_host(g) for g in grads))
            except Exception as e:
                print(f"{label} {type(e).__name__}: {e} |")
                failed = True
                continue
            seconds = time.perf_counter() - t0
            ref = (*nf.attention_reference(q, k, v, causal=causal),
                   *nf.attention_reference_backward(dout, q, k, v, causal=causal))
            errors = [_rel_err(x, r) for x, r in zip(got, ref)]
            failed |= not max(errors) <= tol
            print(f"{label} " + " | ".join(f"{e:.1e}" for e in errors) + f" | {seconds:.1f} |", flush=True)
    print("all errors within tolerance: OK" if not failed else "FAILED: an error exceeds its tolerance")
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

def run_gpu() -> int:
    import torch

    if not torch.cuda.is_available():
        print("numba sees a GPU but this torch has no CUDA: the check and the comparison need "
              "torch with CUDA (pip install numba_flash[torch] with a CUDA build).")
        return 1
    from numba_flash import bench

    timing = bench.Timing()
    print(bench.format_header(bench.environment(timing.describe()), "numba_flash self-check"),
          flush=True)

    checks = []
    for dtype in ("float16", "float32"):
        for causal in (False, True):
            for n in GPU_CHECK["seqlens"]:
                cfg = bench.Config(GPU_CHECK["batch"], n, GPU_CHECK["nheads"],
                                   GPU_CHECK["headdim"], dtype, causal)
                checks += bench.check_config(cfg, ("numba_flash",), seed=int(time.time()) % 2**31)
    print(bench.format_checks(checks), flush=True)
    worst = {}
    for c in checks:
        for name, e in c["errors"].items():
            worst[name] = max(worst.get(name, 0.0), e)
    print("max relative error per output: "
          + ", ".join(f"{name} {e:.1e}" for name, e in worst.items()), flush=True)
    failed = any(c["status"] != "ok" for c in checks)

    impls = bench.DEFAULT_IMPLS
    records = []
    for dtype in GPU_TABLE["dtypes"]:
        for n in GPU_TABLE["seqlens"]:
            cfg = bench.Config.from_tokens(16384, 2048, n, GPU_TABLE["headdim"], dtype, False)
            records += bench.measure_config(cfg, impls, ("fwd", "fwd+bwd"), timing)
    index = {(r["dtype"], r["seqlen"], r["impl"], r["pass"]): r for r in records}
    print(f"\nd={GPU_TABLE['headdim']}, non-causal, B·N = 16384, H = 32: TFLOP/s and peak extra "
          f"memory (MiB) of one forward\n")
    rows = []
    for dtype in GPU_TABLE["dtypes"]:
        for n in GPU_TABLE["seqlens"]:
            for impl in impls:
                fwd, both = index[(dtype, n, impl, "fwd")], index[(dtype, n, impl, "fwd+bwd")]
                rows.append([dtype, n, impl, bench.cell(fwd), bench.cell(both),
                             bench.cell(fwd, "mem_mib", "{:.0f}")])
    print("\n".join(bench.md_table(["dtype", "N", "impl", "fwd", "fwd+bwd", "fwd MiB"], rows)))
    if failed:
        print("\nFAILED: numba_flash disagrees with the float64 reference (see the check above)")
    return 1 if failed else 0


def build_parser():
    import argparse
    p = argparse.ArgumentParser(
        prog="python -m numba_flash",
        description="Check numba_flash against a float64 reference, then time it next to PyTorch's "
                    "attention backends. Without a GPU the kernels run under Numba's CUDA simulator at "
                    "a small size, checked but not timed.",
        epilog="The full benchmark is python -m numba_flash.bench (--help there); the paper's "
               "experiments, python -m paper_repro.")
    p.add_argument("--simulate", action="store_true",
                   help="use Numba's CUDA simulator even where a GPU is present (same as "
                        "NUMBA_ENABLE_CUDASIM=1)")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.simulate and not runtime.simulator_active():
        if not runtime.use_simulator_here():
            return runtime.rerun_under_simulator(["-m", "numba_flash"])
    if runtime.simulator_requested() or runtime.simulator_active():
        return run_simulator()
    if runtime.gpu_present():
        return run_gpu()
    if runtime.use_simulator_here():
        return run_simulator()
    # numba.cuda was loaded against the real driver: start again with the simulator on.
    return runtime.rerun_under_simulator(["-m", "numba_flash", *argv])


if __name__ == "__main__":
    sys.exit(main())
