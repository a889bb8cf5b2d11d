"""Compile a plan's kernels for a GPU architecture without a GPU; print ptxas' resource report and SASS facts.

    python tools/ptx_report.py [--path mma simt] [--headdim 64 128] [--dtype float16] [--causal 0 1]
                               [--arch sm_90] [--sass DIR] [--events]

For each kernel of the forward and backward plans: registers, spills, stack frame, shared memory, and
from the SASS (cuobjdump) the number of HMMA (tensor-core) and LDL/STL (local memory) instructions.
The kernels are built exactly as a launch would build them (kernels/forward.py, kernels/backward.py
`launches`, with the plan's launch bounds), from dummy arguments of the right types.

Needs, on a machine without a GPU, numba-cuda's NVVM and ptxas / cuobjdump / nvdisasm from the CUDA
13.5 wheels (checked 2026-12-01; ptxas 13.4 and older cannot assemble the PTX 9.x numba-cuda 0.30 emits,
and cuobjdump needs nvdisasm to print SASS):

    pip install "numba-cuda[cu13]" "nvidia-cuda-nvcc==13.5.*" "nvidia-cuda-cuobjdump==13.5.*" \
        "nvidia-cuda-nvdisasm==13.5.*"

The wheels' tools are preferred to the PATH's; ptxas' own error is printed when it fails. On the GPU
machine the system toolkit's tools are used where the wheels are absent.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

os.environ["NUMBA_ENABLE_CUDASIM"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def _pretend_device(cc):
    """Device functions compile for the current device: give numba one without a driver."""
    import numba.cuda.dispatcher as disp

    class _Device:
        compute_capability = cc

    disp.get_current_device = lambda: _Device()


def _tool(name):
    try:
        import nvidia
        for base in nvidia.__path__:
            p = os.path.join(base, "cu13", "bin", name)
            if os.path.exists(p):
                return p
    except ImportError:
        pass
    return shutil.which(name)


class _Lists:
    def lists(self, br, bc, transpose):
        z = np.zeros(1, np.int32)
        return z, z, 0, 1, 1, 1


def _view(shape, dtype):
    from numba_flash.interop import View
    from numba_flash.kernels.convert import storage_dtype
    strides = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
    return View(np.zeros(1, storage_dtype(dtype)), shape, strides, dtype, "numpy", 0, 0)


def kernels_of(path, headdim, dtype, causal, aligned=True, cc=(9, 0), deterministic=True):
    """[(name, Launchable, args)] of the forward and backward plans (NUMBA_FLASH_DQ_MODE picks the
    backward's dQ scheme as for a launch)."""
    from numba_flash.kernels import backward, configs, forward
    lse_dt = "float64" if dtype == "float64" else "float32"
    B, N, H, d = 1, 256, 1, headdim
    x = _view((B, N, H, d), dtype)
    lse = _view((B, H, N), lse_dt)
    out = []
    pf = configs.forward_plan(path, headdim, dtype, causal, aligned)
    for kern, _, _, args in forward.launches(pf, 0, x, x, x, x, lse, N, N, 0.125, 0, _Lists()):
        out.append(("fwd", kern, args, pf))
    pb = configs.backward_plan(path, headdim, dtype, causal, aligned, deterministic, cc)
    names = iter(("prep", "dkdv", "dq" if pb.dq_mode == "kernel" else "dqcvt"))
    for kern, _, _, args in backward.launches(pb, 0, x, x, x, x, x, lse, x, x, x, N, N, 0.125, 0, _Lists(),
                                              lambda shape, dt: _view(shape, dt)):
        out.append((next(names), kern, args, pb))
    return out


def sass_events(text):
    """The order of a SASS listing's synchronisation and softmax landmarks, runs collapsed: HGMMA (S: a
    score-shaped product, O: the others), DEPBAR<n> (WARPGROUP.DEPBAR.LE gsb0, n: wait until n wgmma
    groups remain), EX2 (MUFU.EX2, with the F2FP packs among them), SHFL, ARRIVE / WAIT (mbarrier), BAR
    (block or named barrier). Shows, e.g., whether a warpgroup's exponentials run before its wait for the
    P V product (FlashAttention-3's intra-warpgroup overlap) or after it."""
    events = []
    for line in text.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if not m:
            continue
        t = m.group(1)
        if "HGMMA" in t:
            k = "HGMMA"
        elif "WARPGROUP.DEPBAR" in t:
            k = "DEPBAR" + t.split("gsb0,")[-1].strip().replace("0x", "")
        elif "MUFU.EX2" in t or ("F2FP" in t and events and events[-1][0] == "EX2"):
            k = "EX2"
        elif "SYNCS.ARRIVE" in t:
            k = "ARRIVE"
        elif "SYNCS.PHASECHK" in t:
            k = "WAIT"
        elif re.search(r"\bBAR\.(SYNC|ARV)", t):
            k = "BAR"
        elif "SHFL" in t:
            k = "SHFL"
        else:
            continue
        if events and events[-1][0] == k:
            events[-1][1] += 1
        else:
            events.append([k, 1])
    return " ".join(f"{k}x{n}" if n > 1 else k for k, n in events)


def report(name, kern, args, plan, arch, sass_dir, events=False):
    from numba import cuda, typeof
    from numba_flash.kernels.launch import launch_bounds
    sig = tuple(typeof(a) for a in args)
    cc = (int(arch[3]), int(arch[4:]))
    lb = launch_bounds(kern.threads, kern.smem_bytes, kern.min_blocks, kern.min_regs)
    # sm_90a (wgmma, setmaxnreg) is what numba-cuda targets on a cc 9.0 device
    ptx, _ = cuda.compile_ptx(kern.kernel.py_func, sig, cc=(9, 0, "a") if cc == (9, 0) else cc, launch_bounds=lb)
    with tempfile.TemporaryDirectory() as tmp:
        pf = os.path.join(tmp, "k.ptx")
        with open(pf, "w") as f:
            f.write(ptx)
        target = "sm_90a" if cc == (9, 0) else arch
        cubin = os.path.join(sass_dir or tmp, f"{name}_{plan.path}_d{plan.headdim}_{plan.dtype}.cubin")
        r = subprocess.run([_tool("ptxas"), f"-arch={target}", "-v", pf, "-o", cubin], capture_output=True,
                           text=True)
        if r.returncode != 0:
            print(f"{name}: {_tool('ptxas')} -arch={target} failed:\n{r.stderr.strip() or r.stdout.strip()}")
            return
        info = " | ".join(l.split("info    : ")[-1] for l in r.stderr.splitlines()
                          if "Used" in l or "spill" in l)
        for line in r.stderr.splitlines():       # e.g. wgmma serialized for want of register fences
            if "warning" in line.lower():
                info += f"\n      ptxas {line.strip()}"
        sass = ""
        objdump = _tool("cuobjdump")
        if objdump:
            # cuobjdump prints SASS through nvdisasm, which it looks for beside itself or on PATH
            env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(objdump), os.environ.get("PATH", "")]))
            done = subprocess.run([objdump, "-sass", cubin], capture_output=True, text=True, env=env)
            if done.returncode != 0 or not re.search(r"/\*[0-9a-f]{4}\*/", done.stdout):
                print(f"{name}: {objdump} -sass printed no SASS: {done.stderr.strip()[:300]}")
            text = done.stdout
            ops = ("HMMA", "HGMMA", "LDSM", "LDGSTS", "UTMALDG", "LDL", "STL")
            counts = {op: len(re.findall(rf"\b{op}\b", text)) for op in ops}
            sass = " | SASS " + " ".join(f"{k}={v}" for k, v in counts.items())
            if events:
                sass += "\n      events: " + sass_events(text)
    mode = f" dq={plan.dq_mode}" if name == "dkdv" else ""
    print(f"{name:5s} {plan.path:4s} d={plan.headdim:3d} {plan.dtype:8s}{mode} threads={kern.threads:3d} "
          f"smem={kern.smem_bytes:6d}B bounds={lb} | {info}{sass}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", nargs="+", default=["mma", "simt"], choices=["mma", "wgmma", "tf32", "simt"])
    ap.add_argument("--headdim", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--dtype", nargs="+", default=None,
                    help="default: float16 for mma and wgmma, float32 for tf32, float32 and float16 for simt")
    ap.add_argument("--causal", type=int, nargs="+", default=[0])
    ap.add_argument("--arch", default="sm_90", help="sm_80, sm_90 (compiled as sm_90a), ...")
    ap.add_argument("--sass", default=None, help="keep the cubins in this folder")
    ap.add_argument("--unaligned", action="store_true", help="the plan for inputs without vector alignment")
    ap.add_argument("--events", action="store_true",
                    help="also print each kernel's order of wgmma issues and waits, exponentials, shuffles "
                         "and barriers (sass_events)")
    a = ap.parse_args(argv)
    m = re.fullmatch(r"sm_(\d)(\d+)a?", a.arch)
    if m is None:
        ap.error(f"--arch {a.arch!r}: expected sm_XY, e.g. sm_80 or sm_90 (sm_90a is the same here)")
    a.arch = f"sm_{m.group(1)}{m.group(2)}"
    _pretend_device((int(a.arch[3]), int(a.arch[4:])))
    if a.sass:
        os.makedirs(a.sass, exist_ok=True)
    if not _tool("ptxas"):
        print("no ptxas found: pip install nvidia-cuda-nvcc==13.5.* (see this file's docstring)")
        return 1
    for path in a.path:
        for d in a.headdim:
            for dt in a.dtype or {"mma": ["float16"], "wgmma": ["float16"], "tf32": ["float32"]}.get(
                    path, ["float32", "float16"]):
                for causal in a.causal:
                    for name, kern, args, plan in kernels_of(path, d, dt, bool(causal), not a.unaligned,
                                                             (int(a.arch[3]), int(a.arch[4:]))):
                        report(name, kern, args, plan, a.arch, a.sass, a.events)
    return 0


if __name__ == "__main__":
    sys.exit(main())
