"""Compile the kernels for sm_90 without a GPU and print ptxas' resource report (registers, spills, smem).

    python tools/ptx_report.py [--headdim 64] [--dtype float32] [--sass DIR]

Needs numba-cuda's NVVM (pip install numba-cuda[cu13]) and a ptxas matching its PTX version
(pip install nvidia-cuda-nvcc==13.4.*). Saves device time: spills and local memory show up here.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

os.environ["NUMBA_ENABLE_CUDASIM"] = "0"

import numba.cuda.dispatcher as _disp  # noqa: E402
from numba import typeof  # noqa: E402


class _Hopper:
    compute_capability = (9, 0)


_disp.get_current_device = lambda: _Hopper()  # device functions are compiled for the current device


def _ptxas():
    import nvidia
    for base in nvidia.__path__:
        p = os.path.join(base, "cu13", "bin", "ptxas")
        if os.path.exists(p):
            return p
    return shutil.which("ptxas")


def main():
    import numpy as np
    from numba import types
    from numba_flash.kernels import configs
    from numba_flash.kernels.simt_bwd import make_dkdv_kernel, make_dq_kernel
    from numba_flash.kernels.simt_fwd import make_forward_kernel
    from numba_flash.kernels.intrinsics import storage_dtype
    from numba import cuda

    ap = argparse.ArgumentParser()
    ap.add_argument("--headdim", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--dtype", nargs="+", default=["float32", "float16"])
    ap.add_argument("--causal", type=int, default=0)
    ap.add_argument("--sass", default=None, help="write cubins here")
    ap.add_argument("--vec", type=int, default=1, help="vectorised global loads (aligned inputs)")
    a = ap.parse_args()
    arr = lambda dt: types.Array(typeof(np.zeros(1, dt)).dtype, 1, "C")
    i64, f64 = types.int64, types.float64
    i32a = types.Array(types.int32, 1, "C")
    for d in a.headdim:
        for dt in a.dtype:
            st = storage_dtype(dt)
            acc = np.float64 if dt == "float64" else np.float32
            cf, cb = configs.forward_config(d, dt), configs.backward_config(d, dt)
            fwd = make_forward_kernel(cf, d, dt, bool(a.causal), bool(a.vec) and dt != 'float64')
            sig_f = (arr(st),) * 4 + (arr(acc),) + (i64,) * 16 + (f64, i64, i32a, i32a) + (i64,) * 4
            dkdv = make_dkdv_kernel(cb, d, dt, bool(a.causal), bool(a.vec) and dt != 'float64')
            sig_b = (arr(st),) * 4 + (arr(acc),) * 2 + (arr(st),) * 2 + (i64,) * 22 + (f64, f64, i64, i32a, i32a) + (i64,) * 4
            dq = make_dq_kernel(cb, d, dt, bool(a.causal), bool(a.vec) and dt != 'float64')
            sig_q = (arr(st),) * 4 + (arr(acc),) * 2 + (arr(st),) + (i64,) * 19 + (f64, f64, i64, i32a, i32a) + (i64,) * 4
            for name, k, sig in (("fwd", fwd, sig_f), ("dkdv", dkdv, sig_b), ("dq", dq, sig_q)):
                from numba_flash.kernels.intrinsics import launch_bounds
                ptx, _ = cuda.compile_ptx(k.kernel.py_func, sig, cc=(9, 0),
                                          launch_bounds=launch_bounds(k.threads, k.smem_bytes, (cf if name == 'fwd' else cb).min_blocks))
                with tempfile.TemporaryDirectory() as tmp:
                    pf = os.path.join(tmp, "k.ptx")
                    open(pf, "w").write(ptx)
                    out = os.path.join(a.sass or tmp, f"{name}_d{d}_{dt}.cubin")
                    r = subprocess.run([_ptxas(), "-arch=sm_90", "-v", pf, "-o", out],
                                       capture_output=True, text=True)
                    lines = [l for l in r.stderr.splitlines() if "Used" in l or "spill" in l or "error" in l]
                    print(f"{name:5s} d={d:3d} {dt:8s} smem={k.smem_bytes:6d}B  " + " | ".join(
                        l.split("info    : ")[-1] for l in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
