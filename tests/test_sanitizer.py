"""compute-sanitizer over one forward + backward of every tile configuration (tools/sanitize.py).

The simulator cannot see a missing barrier: a deleted barrier once passed every simulator test and every
GPU correctness test, and only racecheck caught it. GPU only; skipped when compute-sanitizer is absent.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "sanitize.py")


def _sanitizer():
    exe = shutil.which("compute-sanitizer")
    for base in ("/usr/local/cuda/bin", "/opt/nvidia/nsight-compute"):
        if exe is None and os.path.exists(os.path.join(base, "compute-sanitizer")):
            exe = os.path.join(base, "compute-sanitizer")
    return exe


def _cases():
    import importlib.util
    spec = importlib.util.spec_from_file_location("sanitize", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.CASES


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(_cases())))
@pytest.mark.parametrize("tool", ["racecheck", "memcheck", "synccheck"])
def test_compute_sanitizer_finds_nothing_in_any_tile_configuration(tool, case):
    exe = _sanitizer()
    if exe is None:
        pytest.skip("compute-sanitizer not found")
    args = [exe, "--tool", tool, "--target-processes", "all"]
    if tool == "racecheck":
        args += ["--racecheck-report", "hazard"]
    r = subprocess.run(args + [sys.executable, SCRIPT, str(case)], capture_output=True, text=True, timeout=3000)
    out = r.stdout + r.stderr
    print(out[-3000:])
    assert "1 of 1 configurations ran and matched the reference" in out, out[-4000:]
    # memcheck also reports host-side CUDA_ERROR_INVALID_VALUE lines from the CUDA bindings probing the
    # driver (cuGetProcAddress); kernel errors name the memory space or the hazard.
    kernel_errors = [line for line in out.splitlines()
                     if re.search(r"Invalid __(global|shared|local)__|Misaligned|Out-of-range|Race reported|"
                                  r"hazard|Barrier error|divergent", line, re.I)
                     and not re.search(r"\b0 hazards", line)]
    assert not kernel_errors, "\n".join(kernel_errors[:20])
    assert r.returncode == 0, out[-4000:]
