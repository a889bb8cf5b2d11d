"""Compiling and launching kernels: the simulator switch, inlined device functions, launch bounds, and
launches with more than 48 KiB of dynamic shared memory.

Tiles for head dims >= 64 need more than the 48 KiB a block gets by default; Hopper allows 227 KiB once
the function's MAX_DYNAMIC_SHARED_SIZE_BYTES attribute is raised. numba-cuda exposes no setter for it,
so it is set here through the driver on the compiled function, once per (overload, device).
"""
from dataclasses import dataclass, field

from numba import cuda, typeof

from ..runtime import simulator

SIMULATOR = simulator()

SMEM_PER_SM = 228 * 1024      # Hopper: 228 KiB per SM, of which up to 227 KiB for one block
SMEM_PER_BLOCK_RESERVED = 1024
_DEFAULT_SMEM_LIMIT = 48 * 1024


def inline_device(fn):
    """A device function NVVM must inline (local arrays passed to it then stay in registers)."""
    if SIMULATOR:  # the simulator's jit takes no inlining options
        return cuda.jit(device=True)(fn)
    return cuda.jit(device=True, forceinline=True)(fn)


def kernel(threads, smem_bytes, min_blocks=0, min_regs=96):
    """@cuda.jit for a kernel of `threads` threads and `smem_bytes` of dynamic shared memory.

    Shared memory decides how many blocks fit on an SM; telling ptxas that (launch bounds) makes it cap
    registers so that many fit too, instead of letting registers become the tighter limit.
    """
    if SIMULATOR:
        return cuda.jit
    return cuda.jit(launch_bounds=launch_bounds(threads, smem_bytes, min_blocks, min_regs))


def launch_bounds(threads, smem_bytes, min_blocks=0, min_regs=96):
    """(threads, blocks per SM) for ptxas. min_blocks <= 0: as many blocks as shared memory allows, but
    leave each thread >= min_regs registers (SIMT micro-tiles spill below 96; tensor-core fragments need
    more)."""
    if min_blocks <= 0:
        by_smem = SMEM_PER_SM // (smem_bytes + SMEM_PER_BLOCK_RESERVED)
        by_regs = 65536 // (threads * min_regs)
        min_blocks = max(1, min(4, by_smem, by_regs))
    return threads, min_blocks


@dataclass
class Launchable:
    kernel: object       # numba CUDA dispatcher
    threads: int         # threads per block
    smem_bytes: int      # dynamic shared memory per block
    min_blocks: int = 0  # the launch bounds it was compiled with (for tools/)
    min_regs: int = 96
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


def strides3(view):
    """(batch, seqlen, head) element strides of a (B, N, H, d) interop.View, as the kernels take them."""
    return (view.strides[0], view.strides[1], view.strides[2])
