"""``python -m numba_flash`` / ``numba-flash``: check numba_flash against a reference, then time it.

On a GPU: forward and backward of ``flash_attn_func`` are compared with PyTorch (float64 SDPA math
on upcast inputs) at a small size, then a short table gives forward and forward+backward TFLOP/s and
the forward's peak extra memory for numba_flash, naive attention and the SDPA backends (d=64,
N=1024 and 4096, float16 and float32, non-causal), measured by :mod:`numba_flash.bench`.

Without a GPU: the same kernels run under Numba's CUDA simulator on small numpy inputs (B=1, N=48,
H=2, d=16, causal and not) through ``flash_attn_forward`` / ``flash_attn_backward`` and are
compared with ``attention_reference`` / ``attention_reference_backward``. Exit status 1 if a
relative error exceeds the tolerance (1e-5 in the simulator).

How "no GPU" is decided. The simulator must be chosen before ``numba.cuda`` is imported (numba
reads ``NUMBA_ENABLE_CUDASIM`` when it loads its configuration), so the question has to be answered
without importing ``numba.cuda`` in this process, and by the same stack that will run the kernels:
looking for ``nvidia-smi`` or ``/dev/nvidia0`` is wrong both ways (containers without the device
nodes, WSL's ``/dev/dxg``, a driver without a usable CUDA). So:

1. ``NUMBA_ENABLE_CUDASIM=1`` already set, or the simulator already loaded: simulator.
2. ``numba.cuda`` already imported here for real (``import numba_flash`` does that): ask it,
   ``numba.cuda.is_available()``.
3. Otherwise a child interpreter runs ``numba.cuda.is_available()`` (one to two seconds), which
   leaves this process free to pick the simulator.

If there is no GPU and ``numba.cuda`` is not yet imported, the variable is set here and numba's
configuration reloaded; if it was already imported against the real driver, the command is run
again in a child interpreter with the variable set.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

SIM_ENV = "NUMBA_ENABLE_CUDASIM"
SIM_TOL = 1e-5
SIM_SIZE = dict(batch=1, seqlen=48, nheads=2, headdim=16)  # 48: not a multiple of any tile
GPU_CHECK = dict(batch=2, nheads=4, headdim=64, seqlens=(256, 200))
GPU_TABLE = dict(headdim=64, seqlens=(1024, 4096), dtypes=("float16", "float32"))
SIM_BANNER = ("Running under Numba's CUDA simulator (no GPU found): small sizes, "
              "timings meaningless")


def _env_requests_simulator() -> bool:
    return os.environ.get(SIM_ENV, "0").strip() not in ("", "0")


def simulator_active() -> bool:
    """True if ``numba.cuda`` in this process is (or, once imported, will be) the simulator."""
    if "numba.cuda" in sys.modules:
        try:
            from numba.cuda.core import config  # numba-cuda's own copy of the configuration
        except ImportError:
            from numba.core import config
        return bool(config.ENABLE_CUDASIM)
    if "numba" in sys.modules:  # importing numba.cuda here would fix the choice: read numba's
        from numba.core import config
        return bool(config.ENABLE_CUDASIM)
    return _env_requests_simulator()


def gpu_present(timeout_s: float = 120.0) -> bool:
    """Whether numba.cuda can use a real GPU here (see the module docstring for the method)."""
    if "numba.cuda" in sys.modules and not simulator_active():
        from numba import cuda
        return bool(cuda.is_available())
    env = {k: v for k, v in os.environ.items() if k != SIM_ENV}
    code = "import sys, numba.cuda as c; sys.exit(0 if c.is_available() else 1)"
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, timeout=timeout_s,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def rerun_under_simulator(python_args) -> int:
    """Run ``python *python_args`` with the simulator switched on; return its exit status."""
    env = dict(os.environ, **{SIM_ENV: "1"})
    # The child must import this very copy of numba_flash, installed or not.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return subprocess.call([sys.executable, *python_args], env=env)


def _use_simulator_here() -> bool:
    """Switch this process to the simulator if numba.cuda is not loaded yet; True on success."""
    if "numba.cuda" in sys.modules:
        return simulator_active()
    os.environ[SIM_ENV] = "1"
    if "numba" in sys.modules:
        from numba.core import config
        config.reload_config()  # numba read NUMBA_* at import; make it read them again
    return simulator_active()


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
    print(SIM_BANNER, flush=True)
    import numpy as np

    import numba
    import numba_flash as nf

    print(f"numba {numba.__version__}, numpy {np.__version__}; "
          f"B={SIM_SIZE['batch']} N={SIM_SIZE['seqlen']} H={SIM_SIZE['nheads']} "
          f"d={SIM_SIZE['headdim']} float32; relative error ‖x − ref‖/‖ref‖ against the float64 "
          f"numpy reference, tolerance {SIM_TOL:.0e}")
    rng = np.random.default_rng()  # fresh inputs every run (METHOD.md: any valid input)
    shape = (SIM_SIZE["batch"], SIM_SIZE["seqlen"], SIM_SIZE["nheads"], SIM_SIZE["headdim"])
    names = ("out", "lse", "dq", "dk", "dv")
    print("| mask | " + " | ".join(names) + " | seconds |")
    print("|---|" + "---:|" * (len(names) + 1))
    worst = 0.0
    for causal in (False, True):
        q, k, v, dout = (rng.standard_normal(shape, dtype=np.float32) for _ in range(4))
        t0 = time.perf_counter()
        try:
            out, lse = nf.flash_attn_forward(q, k, v, causal=causal)
            out, lse = _host(out), _host(lse)
            grads = nf.flash_attn_backward(dout, q, k, v, out, lse, causal=causal)
            got = (out, lse, *(_host(g) for g in grads))
        except Exception as e:
            print(f"| {'causal' if causal else 'non-causal'} | {type(e).__name__}: {e} |")
            worst = float("inf")
            continue
        seconds = time.perf_counter() - t0
        ref = (*nf.attention_reference(q, k, v, causal=causal),
               *nf.attention_reference_backward(dout, q, k, v, causal=causal))
        errors = [_rel_err(x, r) for x, r in zip(got, ref)]
        worst = max(worst, *errors)
        print(f"| {'causal' if causal else 'non-causal'} | "
              + " | ".join(f"{e:.1e}" for e in errors) + f" | {seconds:.1f} |", flush=True)
    ok = worst <= SIM_TOL
    print(f"max relative error {worst:.1e}: " + ("OK" if ok else f"FAILED (> {SIM_TOL:.0e})"))
    return 0 if ok else 1


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
                rows.append([dtype, n, impl, bench._cell(fwd), bench._cell(both),
                             bench._cell(fwd, "mem_mib", "{:.0f}")])
    print("\n".join(bench._md_table(["dtype", "N", "impl", "fwd", "fwd+bwd", "fwd MiB"], rows)))
    if failed:
        print("\nFAILED: numba_flash disagrees with the float64 reference (see the check above)")
    return 1 if failed else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if _env_requests_simulator() or simulator_active():
        return run_simulator()
    if gpu_present():
        return run_gpu()
    if _use_simulator_here():
        return run_simulator()
    # numba.cuda was loaded against the real driver: start again with the simulator on.
    return rerun_under_simulator(["-m", "numba_flash", *argv])


if __name__ == "__main__":
    sys.exit(main())
