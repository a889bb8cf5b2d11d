"""The benchmarks need a real GPU and torch with CUDA. Where there is none, every benchmark is still
collected and then skipped (the `gpu` fixture), so ``pytest benchmarks`` exits with status 0 instead of
5 ("no tests collected") and says why."""
import os

import pytest

_REASON = None


def _why_not():
    """None if the benchmarks can run here, else the reason (computed once)."""
    global _REASON
    if _REASON is None:
        if os.environ.get("NUMBA_ENABLE_CUDASIM", "0").strip() not in ("", "0"):
            _REASON = "benchmarks need a real GPU, not Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM is set)"
        else:
            try:
                import torch
            except ImportError:
                _REASON = "benchmarks need torch (pip install -e \".[torch]\")"
            else:
                from numba_flash import runtime
                if not torch.cuda.is_available():
                    _REASON = "benchmarks need a CUDA GPU (torch.cuda.is_available() is False)"
                elif not runtime.gpu_present():
                    _REASON = "benchmarks need a CUDA GPU that numba.cuda can use"
                else:
                    _REASON = ""
    return _REASON or None


@pytest.fixture
def gpu():
    reason = _why_not()
    if reason:
        pytest.skip(reason)
