"""Launching a compiled kernel with its dynamic shared memory.

Tiles of fp32 Q, K, V for head dims >= 64 need more than the 48 KiB a block gets by default; Hopper allows
227 KiB once the function's MAX_DYNAMIC_SHARED_SIZE_BYTES attribute is raised. numba-cuda exposes no
setter for it, so it is set here through the driver on the compiled function, once per (overload, device).
"""
from dataclasses import dataclass, field

from numba import cuda, typeof

from .intrinsics import SIMULATOR

_DEFAULT_SMEM_LIMIT = 48 * 1024


@dataclass
class Launchable:
    kernel: object       # numba CUDA dispatcher
    threads: int         # threads per block
    smem_bytes: int      # dynamic shared memory per block
    _raised: set = field(default_factory=set, repr=False)

    def __call__(self, grid, stream, *args):
        if not SIMULATOR and self.smem_bytes > _DEFAULT_SMEM_LIMIT:
            self._raise_smem_limit(args)
        self.kernel[grid, self.threads, stream, self.smem_bytes](*args)

    def _raise_smem_limit(self, args):
        # The dispatch layer always passes the same argument types to one Launchable, so it has one
        # overload: typing the arguments once per device is enough.
        key = cuda.get_current_device().id
        if key in self._raised:
            return
        sig = tuple(typeof(a) for a in args)
        from cuda.bindings import driver as cu
        from numba.cuda.cudadrv.driver import driver

        compiled = self.kernel.compile(sig)
        cufunc = compiled._codelibrary.get_cufunc()
        limit = cuda.get_current_device().MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        if self.smem_bytes > limit:
            raise ValueError(
                f"this configuration needs {self.smem_bytes} bytes of shared memory per block; the device "
                f"allows {limit}")
        attr = cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        driver.cuKernelSetAttribute(attr, self.smem_bytes, cufunc.handle, cufunc.device.id)
        self._raised.add(key)
