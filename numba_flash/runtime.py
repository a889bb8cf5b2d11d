"""Simulator or GPU: the one place that decides, shared by the package, ``__main__``, the benchmark and the tests.

Numba reads ``NUMBA_ENABLE_CUDASIM`` when it loads its configuration, so the choice has to be made before
``numba.cuda`` is imported, and it must be made by the same stack that will run the kernels: looking for
``nvidia-smi`` or ``/dev/nvidia0`` is wrong both ways (containers without the device nodes, WSL's
``/dev/dxg``, a driver without a usable CUDA). So:

1. ``NUMBA_ENABLE_CUDASIM`` set to anything but ``0`` / empty, or the simulator already loaded: simulator.
2. ``numba.cuda`` already imported here for real: ask it, ``numba.cuda.is_available()``.
3. Otherwise a child interpreter runs ``numba.cuda.is_available()`` (one to two seconds), which leaves this
   process free to pick the simulator.

This module imports nothing from numba at import time (``import numba_flash.runtime`` does not load the
kernels either: the package's public names are loaded on first use), so a caller can ask, then choose.
"""
from __future__ import annotations

import os
import subprocess
import sys

SIM_ENV = "NUMBA_ENABLE_CUDASIM"
BANNER = "Running under Numba's CUDA simulator (no GPU found): small sizes, timings meaningless"


def simulator_requested() -> bool:
    """The environment asks for the simulator (NUMBA_ENABLE_CUDASIM set, and not to 0 or empty)."""
    return os.environ.get(SIM_ENV, "0").strip() not in ("", "0")


def simulator_active() -> bool:
    """True if ``numba.cuda`` in this process is (or, once imported, will be) the simulator."""
    if "numba.cuda" in sys.modules or "numba" in sys.modules:
        try:
            from numba.cuda.core import config  # numba-cuda's own copy of the configuration
        except ImportError:
            from numba.core import config
        return bool(config.ENABLE_CUDASIM)
    return simulator_requested()


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


def use_simulator_here() -> bool:
    """Switch this process to the simulator if ``numba.cuda`` is not loaded yet; True on success."""
    if "numba.cuda" in sys.modules:
        return simulator_active()
    os.environ[SIM_ENV] = "1"
    if "numba" in sys.modules:
        from numba.core import config
        config.reload_config()  # numba read NUMBA_* at import; make it read them again
    return simulator_active()


def select() -> bool:
    """Decide for this process, before ``numba.cuda`` is imported: the simulator unless the environment
    already decided or a GPU answers. Returns True if the simulator is (or will be) used."""
    if simulator_requested() or simulator_active():
        return True
    if SIM_ENV in os.environ or gpu_present():
        return False          # NUMBA_ENABLE_CUDASIM=0 asks for the GPU explicitly
    return use_simulator_here()


def rerun_under_simulator(python_args) -> int:
    """Run ``python *python_args`` with the simulator switched on; return its exit status."""
    env = dict(os.environ, **{SIM_ENV: "1"})
    # The child must import this very copy of numba_flash, installed or not.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return subprocess.call([sys.executable, *python_args], env=env)


def simulator() -> bool:
    """For kernel modules, at their import (numba.cuda is being loaded by then): the simulator or not."""
    from numba import config
    return bool(config.ENABLE_CUDASIM)
