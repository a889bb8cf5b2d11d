"""Numba CUDA kernels. `simt_*`: fp32-arithmetic shared-memory kernels that also run on the simulator."""
