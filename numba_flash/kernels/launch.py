"""Compiling and launching kernels: the simulator switch, inlined device functions, launch bounds, launches
straight through the driver (driverlaunch.py), and launches with more than 48 KiB of dynamic shared memory.

Tiles for head dims >= 64 need more than the 48 KiB a block gets by default; Hopper allows 227 KiB once
the function's MAX_DYNAMIC_SHARED_SIZE_BYTES attribute is raised. numba-cuda exposes no setter for it,
so it is set here through the driver on the compiled function, once per (overload, device).
"""
import os
import threading
from dataclasses import dataclass, field

from numba import cuda

from ..runtime import simulator
from .driverlaunch import ArgPacker, DriverKernel, current_context, libcuda

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
    """A kernel with its launch shape. Called as `launchable(grid, stream, *args)`.

    On a GPU the arguments are `driverlaunch.DeviceBuffer`s and scalars, and the launch goes straight to
    the driver (driverlaunch.py says why): compiled once per signature through Numba, its CUfunction kept
    per context. Under the simulator (or without a loadable driver library) Numba's dispatcher launches.
    """
    kernel: object       # numba CUDA dispatcher
    threads: int         # threads per block
    smem_bytes: int      # dynamic shared memory per block
    min_blocks: int = 0  # the launch bounds it was compiled with (for tools/)
    min_regs: int = 96
    _direct: dict = field(default_factory=dict, repr=False)   # (context, signature key) -> DriverKernel
    _lock: object = field(default_factory=threading.Lock, repr=False)

    def __call__(self, grid, stream, *args):
        if SIMULATOR or libcuda() is None:
            self._dispatch(grid, stream, args)
            return
        key, values = ArgPacker.flatten(args)
        ctx = current_context()
        fast = self._direct.get((ctx, *key))
        if fast is None:
            fast = self._prepare(ctx, key, args)
        fast.launch(grid, self.threads, self.smem_bytes, stream_handle(stream), values)

    def _prepare(self, ctx, key, args):
        """Compile for these arguments' signature, raise the shared-memory limit, take the CUfunction."""
        with self._lock:
            fast = self._direct.get((ctx, *key))
            if fast is not None:
                return fast
            from numba.cuda.cudadrv.driver import driver
            compiled = self.kernel.compile(ArgPacker.signature(args))
            cufunc = compiled._codelibrary.get_cufunc()     # loads the module into the current context
            if self.smem_bytes > _DEFAULT_SMEM_LIMIT:
                self._raise_smem_limit(cufunc)
            fast = DriverKernel(driver.cuKernelGetFunction(cufunc.handle), ArgPacker.struct_format(args))
            self._direct[(ctx, *key)] = fast
            return fast

    def _dispatch(self, grid, stream, args):
        """Numba's own launch (the simulator; a GPU whose driver library ctypes cannot load)."""
        if not SIMULATOR:
            if type(stream) is int and stream:
                stream = cuda.external_stream(stream)
            if self.smem_bytes > _DEFAULT_SMEM_LIMIT:
                with self._lock:
                    compiled = self.kernel.compile(ArgPacker.signature(args))
                    self._raise_smem_limit(compiled._codelibrary.get_cufunc())
        self.kernel[grid, self.threads, stream, self.smem_bytes](*args)

    def _raise_smem_limit(self, cufunc):
        from cuda.bindings import driver as cu
        from numba.cuda.cudadrv.driver import driver

        limit = cuda.get_current_device().MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        if self.smem_bytes > limit:
            raise ValueError(
                f"this configuration needs {self.smem_bytes} bytes of shared memory per block; the device "
                f"allows {limit}")
        attr = cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        driver.cuKernelSetAttribute(attr, self.smem_bytes, cufunc.handle, cufunc.device.id)


SIM_RESIDENT_BLOCKS = 2    # a persistent grid under the simulator: few blocks, so each loops over several tiles
_FALLBACK_SMS = 132        # without a device (tools/ptx_report.py): an H100 SXM's


RESIDENT_BLOCKS_ENV = "NUMBA_FLASH_RESIDENT_BLOCKS"   # checks only: a smaller persistent grid


def resident_blocks(launchable):
    """How many blocks of `launchable` the current GPU runs at once (its SMs times the blocks per SM its
    launch bounds promise): a persistent kernel's grid. NUMBA_FLASH_RESIDENT_BLOCKS overrides it (the
    sanitizer runs small problems on a few blocks, so each one loops)."""
    forced = os.environ.get(RESIDENT_BLOCKS_ENV, "").strip()
    if forced:
        return int(forced)
    if SIMULATOR:
        return SIM_RESIDENT_BLOCKS
    per_sm = launch_bounds(launchable.threads, launchable.smem_bytes, launchable.min_blocks,
                           launchable.min_regs)[1]
    return _sm_count() * per_sm


_sms = {}


def _sm_count():
    """The current device's SM count, kept per context (Numba's device query costs driver calls on every
    call, and a persistent forward asks on every launch)."""
    try:
        ctx = current_context() if libcuda() is not None else None
    except RuntimeError:           # a driver library, no initialised driver: compiling only
        ctx = None
    sms = _sms.get(ctx)
    if sms is None:
        try:
            sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
        except Exception:          # no driver: compiling only
            sms = _FALLBACK_SMS
        if ctx:
            _sms[ctx] = sms
    return sms


def stream_handle(stream):
    """The CUstream of a launch's stream argument (0, an int handle, or a Numba stream object)."""
    if type(stream) is int:
        return stream
    return int(stream.handle) if stream else 0


def strides3(view):
    """(batch, seqlen, head) element strides of a (B, N, H, d) interop.View, as the kernels take them."""
    return (view.strides[0], view.strides[1], view.strides[2])
