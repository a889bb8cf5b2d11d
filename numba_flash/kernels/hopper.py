"""Hopper (sm_90a) PTX building blocks, each with a simulator implementation of the same semantics.

The foundation of the warpgroup tensor-core path: warpgroup MMA (`wgmma.mma_async`) with shared-memory matrix
descriptors, its fence / commit / wait protocol, `setmaxnreg`, `mbarrier` and the 1-D bulk copy
`cp.async.bulk` that completes on an mbarrier. On a GPU each name is an inline-PTX intrinsic (callable from a
@cuda.jit kernel compiled for sm_90a; numba-cuda targets sm_90a on a cc 9.0 device, and
`cuda.compile_ptx(..., cc=(9, 0, "a"))` without one). Under Numba's CUDA simulator each name is a Python
function of the same semantics; the warpgroup-collective one (wgmma) meets the other 127 threads of its
warpgroup through `simwarp.exchange_group`.

    shared_address(arr)                              -> u32: shared-window address of arr's first byte
    make_smem_desc(arr, byte_offset, lbo_bytes, sbo_bytes, swizzle)
                                                     -> u64: wgmma matrix descriptor of the operand starting
                                                        at byte `byte_offset` of shared array `arr`
    smem_desc_add(desc, byte_offset)                 -> u64: the same descriptor for the operand starting
                                                        `byte_offset` (>= 0, a multiple of 16) bytes later:
                                                        one integer add where make_smem_desc takes five
                                                        (make one descriptor per tile, step it per k16)
    wgmma_f16 / wgmma_bf16(desc_a, desc_b, acc, scale_d, trans_a, trans_b)
                                                     -> acc: D = A.B (+ C if scale_d), m64nNk16, f32 acc,
                                                        A and B from shared memory (descriptors)
    wgmma_f16_rs / wgmma_bf16_rs(a0, a1, a2, a3, desc_b, acc, scale_d, trans_b)
                                                     -> acc: the same with A from registers
    wgmma_tf32(desc_a, desc_b, acc, scale_d)         -> acc: D = A.B (+ C if scale_d), m64nNk8, tf32 inputs
                                                        (32-bit words, both operands K-major), f32 acc
    wgmma_tf32_rs(a0, a1, a2, a3, desc_b, acc, scale_d)
                                                     -> acc: the same with A from registers (tf32 words:
                                                        float32 values or their uint32 bits)
    wgmma_acc_zeros(n), wgmma_acc_load(arr, start, n), wgmma_acc_store(arr, start, acc)
                                                     the N/2 float32 accumulators of an m64nNk16 wgmma
    wgmma_fence_operand(acc)                         -> acc, pinned (see "Ordering" below)
    wgmma_fence_a(a0, a1, a2, a3)                    -> (a0, a1, a2, a3): u32 (or tf32's f32) A registers,
                                                        pinned likewise
    wgmma_fence(), wgmma_commit_group(), wgmma_wait_group(n), wgmma_wait_group_alt(n)
    fence_proxy_async_shared()                       generic-proxy shared stores -> visible to wgmma / bulk copy
    setmaxnreg_inc(n), setmaxnreg_dec(n)             warpgroup register reallocation (see below)
    mbarrier_init(bars, idx, count), fence_mbarrier_init(),
    mbarrier_arrive(bars, idx), mbarrier_expect_tx(bars, idx, tx_bytes),
    mbarrier_arrive_expect_tx(bars, idx, tx_bytes),
    mbarrier_try_wait_parity(bars, idx, parity) -> bool, mbarrier_wait_parity(bars, idx, parity)
    cp_async_bulk_g2s(sarr, s_byte_offset, garr, g_elem_index, nbytes, bars, bar_idx)
    tma_load_4d(sarr, s_byte_offset, maps, map_idx, garr, c0, c1, c2, c3, bars, bar_idx)
                                                     a box of a 4-D tensor by its tensor map (TMA, below)
    bulk_reduce_add_f32(garr, g_elem_index, sarr, s_byte_offset, nbytes)
                                                     garr[...] += a float32 span of shared memory, one
                                                     asynchronous bulk reduction (below)
    bulk_commit_group(), bulk_wait_group_read(n), bulk_wait_group(n)
                                                     its completion groups (below)
    named_barrier_sync(idx, nthreads), named_barrier_arrive(idx, nthreads)
                                                     a hardware barrier over some warps (see below)

Literal arguments (the PTX takes immediates): `n` of wgmma_wait_group, setmaxnreg_*, wgmma_acc_zeros and
wgmma_acc_load; trans_a / trans_b of the wgmmas. A literal is a constant in the call or a module-level /
closure integer name (Numba freezes those); an expression such as `N // 2` is typed as a plain integer and
fails to type: bind it to a name first.

wgmma (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate Instructions")
-------------------------------------------------------------------------------------
A warpgroup is 4 consecutive warps: threads with the same linear thread id // 128. All 128 threads execute
every wgmma_* call together (convergent, same arguments where the ISA says uniform: the descriptors,
scale_d, the literals); the warpgroup is complete (the block size is a multiple of 128).

Shape m64nNk16, N a multiple of 8 up to 256 (given by the accumulator count N/2), f16 or bf16 inputs, f32
accumulators: D (64 x N) = A (64 x 16) . B (16 x N) + (scale_d != 0 ? C : 0), scale_d a runtime integer.
B is always described as the N x 16 matrix Bt[n][k] = B[k][n] ("K-major" when trans_b = 0: K contiguous).

Fragments, per thread of rank q in its warpgroup (w = q // 32 its warp, g = (q % 32) // 4, t = q % 4):
  accumulators (N/2 f32):  acc[j] = D[16w + g + 8 * ((j >> 1) & 1)][8 * (j >> 2) + 2t + (j & 1)]
  A from registers (4 x b32, each two 16-bit elements, the lower-indexed one in bits 0-15):
                           a_i holds A[16w + g + 8 * (i & 1)][2t + 8 * (i >> 1) + {0, 1}]
(the m16n8k16 mma.sync layouts, one 16-row slab per warp).

tf32 (wgmma_tf32, wgmma_tf32_rs): shape m64nNk8, each element a 32-bit word of which the tensor cores read
the tf32 part (sign, 8 exponent bits, the 10 high mantissa bits; give values already rounded to tf32,
ptx.tf32_round, and it does not matter how the rest would be treated). Both operands must be K-major (the
ISA has no transpose for tf32). A from registers, one element per register:
                           a_i holds A[16w + g + 8 * (i & 1)][t + 4 * (i >> 1)]
(the m16n8k8 tf32 mma.sync layout). The accumulators are those of the 16-bit shapes.

Shared-memory operands (16-byte aligned start) are read through 64-bit matrix descriptors:
  bits 0-13  start address >> 4, bits 16-29 leading-dimension byte offset (LBO) >> 4,
  bits 32-45 stride-dimension byte offset (SBO) >> 4, bits 49-51 base offset (0 here),
  bits 62-63 swizzle: 0 none, 1 = 128B, 2 = 64B, 3 = 32B (SWIZZLE_* below).
Element (row, k) of an operand (row = m of A or n of B; k = 0..15; 16-bit elements; s = swizzle width in
bytes) sits at byte  start + offset, the offset given by the ISA's canonical layouts:
  K-major (trans 0),  no swizzle:  (row % 8) * 16 + (row // 8) * SBO + (k % 8) * 2 + (k // 8) * LBO
                                   (8 x 16-byte "core matrices"; LBO: next 8 k, SBO: next 8 rows)
  K-major,            swizzled:    (row % 8) * s  + (row // 8) * SBO + k * 2            (LBO unused)
  MN-major (trans 1), no swizzle:  (row % 8) * 2  + (row // 8) * SBO + (k % 8) * 16 + (k // 8) * LBO
  MN-major,           swizzled:    (row % (s/2)) * 2 + (row // (s/2)) * LBO + (k % 8) * s + (k // 8) * SBO
A tf32 operand (K-major, k = 0..7, 4-byte elements) uses the same core matrices of 8 rows x 16 bytes, each
row now 4 elements: no swizzle (row % 8) * 16 + (row // 8) * SBO + (k % 4) * 4 + (k // 4) * LBO; swizzled
(row % 8) * s + (row // 8) * SBO + k * 4. Either way a k-step is 32 bytes of a row, as for 16-bit inputs,
and a swizzled layout then XORs the 16-byte chunk bits of the *absolute* address with the bits above:
  128B: addr ^= ((addr >> 7) & 7) << 4,   64B: ((addr >> 7) & 3) << 4,   32B: ((addr >> 7) & 1) << 4
so a 128B-swizzled operand is made of 1024-byte-aligned atoms of 8 rows x 128 bytes in which 16-byte chunk c
of row r is stored at chunk c ^ (r % 8). Because the XOR uses absolute address bits, the atoms must start
at 1024-byte (64B: 512, 32B: 256) boundaries, and stepping K inside an atom is done by adding the byte step
to the start address (for K-major 128B: +32 bytes per k16 step) -- as a TMA load with the same swizzle
writes it. Shared arrays are not that aligned by themselves: align at run time from shared_address().

Ordering. wgmma is asynchronous: its accumulators are valid only after wgmma_wait_group has covered the
wgmma-group it was committed in. The ISA requires wgmma_fence() by the whole warpgroup before the first
wgmma and between any register access and a wgmma using those registers (accumulators or A), except
between wgmmas of the same shape accumulating into the same registers; shared memory written with ordinary
stores needs fence_proxy_async_shared() (then a barrier) before a wgmma or bulk copy reads it. LLVM knows
nothing of the asynchrony: the accumulators are ordinary values to it, and arithmetic on them may legally be
scheduled above the (volatile) wait. Pass them through wgmma_fence_operand() after the wait (and before the
fence, where they were just written), as CUTLASS does: that ties every later use to an asm ordered after the
wait. (NVVM was not seen hoisting such uses in small kernels; the pin makes it a guarantee.) The same holds
the other way for A registers computed just before a product (16-bit P packed from a score fragment):
LLVM sinks each conversion to its wgmma, past the fence, and ptxas then fences every wgmma of the
product separately (a WARPGROUP.ARRIVE before each, seen in the SASS); wgmma_fence_a() before the fence
keeps them all ahead of it.
Where ptxas puts the waits. ptxas schedules wgmma.wait_group as early in its basic block as the other
waits and wgmmas allow, not where the PTX has it: in a block "wait for group 1; softmax; wait for group 0",
the second wait lands right after the first, before the softmax (seen in the SASS of every wgmma forward
variant), so the softmax never overlaps the newest product. A wait in a block of its own stays after the
code before that block: wgmma_wait_group_alt(n) is the same instruction spelled differently, so that
`if flag: wgmma_wait_group(0) else: wgmma_wait_group_alt(0)` keeps a branch (no compiler merges the two
arms) and both ways wait. `flag` must be the same in every thread of the warpgroup (the waits are
.aligned) and unknown to the compilers (else they fold the branch); wgmma_tiles.wait_pv.
The simulator completes each wgmma at once, summing the exact products in float64 and rounding the result
to float32 toward zero (the tensor cores' accumulation truncates), but checks the protocol: a wgmma with no
wgmma_fence() since the thread's last wait (stricter than the ISA, which asks for it only after a register
access), and any read of accumulators whose group has not been waited for, raise.

setmaxnreg (PTX ISA, "setmaxnreg")
----------------------------------
setmaxnreg_dec(n) / setmaxnreg_inc(n): the calling warpgroup (all 128 threads, convergent) releases registers
down to / requests registers up to n per thread (n a literal multiple of 8 in [24, 256]); inc blocks until
the block's pool has them, so the kernel must free at least as many as it asks for. ptxas applies the
instruction only when it knows the register count at entry, i.e. for a kernel with launch bounds that
include a minimum block count (cuda.jit(launch_bounds=(threads, 1))); otherwise it drops it with an info
line ("'setmaxnreg' ignored; unable to determine register count at entry"). With (384, 1) the count at
entry is 168 = (40 + 2 x 232) / 3: one producer warpgroup at 40 and two consumers at 232 fit exactly.
The simulator checks n and does nothing else.

mbarrier and cp.async.bulk (PTX ISA, "mbarrier", "cp.async.bulk")
-------------------------------------------------------------
An mbarrier is one 8-byte-aligned 64-bit word of shared memory (element `idx` of a uint64 shared array).
mbarrier_init (one thread; then fence_mbarrier_init() and a barrier before other threads or the bulk-copy
engine use it) sets the expected arrival count (1 .. 2^20 - 1) and phase 0. A phase completes when its
pending arrivals and its transaction count are both zero; the mbarrier then flips to the next phase.
mbarrier_arrive counts one arrival; mbarrier_expect_tx adds bytes the phase must also wait for;
mbarrier_arrive_expect_tx does both (expect first); each cp.async.bulk completing on the mbarrier subtracts
its bytes when they have landed. mbarrier_try_wait_parity(bars, idx, parity) is true when the phase of that
parity has completed, i.e. the current phase's parity differs from `parity` (so right after init, parity 1
answers true: the "previous" phase counts as complete); it may also answer false after a time-out, so loop
on it, or use mbarrier_wait_parity, which does.

cp_async_bulk_g2s copies `nbytes` (a multiple of 16) from element `g_elem_index` of a global array to byte
`s_byte_offset` of a shared array (both 16-byte aligned) through the asynchronous proxy, and completes
`nbytes` of transactions on the mbarrier. The data may be read once a wait on the mbarrier phase it was
expected in has succeeded. The simulator copies at once and completes the transactions immediately.

Tensor copies (TMA; PTX ISA, "cp.async.bulk.tensor"; CUDA driver API, "Tensor Map Object Management")
-------------------------------------------------------------------------------------------------------
tma_load_4d copies one box of a 4-D tensor from global to shared memory through the asynchronous proxy
and completes the box's bytes of transactions on an mbarrier, as cp_async_bulk_g2s does. What is copied
is described by a tensor map (tma.py makes them on the host): the tensor's address, its dims d0..d3
(d0 contiguous), the byte strides of d1..d3 (multiples of 16), the box b0..b3 and a swizzle (none, 32,
64 or 128 bytes). The map is row `map_idx` (16 uint64 words, 128 bytes, 64-byte aligned) of the flat
uint64 array `maps` in global memory: Numba cannot pass a __grid_constant__ kernel parameter, and a map
written there before the launch needs no fence. The box at coordinates (c0..c3) (element indices, int32)
lands at byte `s_byte_offset` of `sarr` as b3 x b2 x b1 rows of b0 elements, consecutive, elements
outside the tensor read as zero bits; with a swizzle of S bytes, each 16-byte chunk of a row goes to
chunk (its index) XOR (address bits 7.. of its row) within the S-byte span, computed on the absolute
shared address: the swizzled K-major image wgmma reads (wgmma_tiles.py) when the destination is aligned
to the swizzle's 8-row atom. `garr` is the array the map describes: unused on a GPU (the map holds the
address), read by the simulator, which decodes its own map format (tma.py; the driver's is opaque),
checks that the map lies inside `garr`, copies at once and completes the transactions immediately.

Bulk reductions into global memory (PTX ISA, "cp.reduce.async.bulk", "cp.async.bulk.commit_group",
"cp.async.bulk.wait_group")
----------------------------------------------------------------------------------------------------
bulk_reduce_add_f32 adds `nbytes` (a positive multiple of 16) of float32 values from byte `s_byte_offset`
of a shared array to the float32 global array `garr` from element `g_elem_index` (both 16-byte aligned),
each element added atomically in L2 (`cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32`): one
instruction of one thread instead of a `red` per element. It is asynchronous and belongs to the issuing
thread's open bulk group: bulk_commit_group() closes that group; bulk_wait_group_read(n) returns once at
most n of the thread's committed groups may still be reading their shared source (which may then be
rewritten), bulk_wait_group(n) once at most n are still incomplete (their global writes included).
Shared stores made by ordinary instructions must be made visible to the asynchronous proxy first:
fence_proxy_async_shared() by the storing threads, then a barrier with the issuing thread. A thread must
wait for its groups before the block exits (its shared memory is then released). The simulator performs a
group's additions only when a wait covers it, reading shared memory at that moment: a source rewritten
before its wait, or a group never waited for, gives a wrong result there as it may on a GPU.

Named barriers (PTX ISA, "bar.sync", "bar.arrive"; sm_70 and later, here for warpgroup scheduling)
----------------------------------------------------------------------------------------------------
Barrier `idx` (1 .. 15: 0 is cuda.syncthreads') completes a phase when `nthreads` threads (a multiple
of 32; whole warps) have reached it: named_barrier_sync counts the calling thread and waits for the phase
to complete, named_barrier_arrive counts it and goes on. So a group syncing on idx with nthreads = its
size + another group's size waits until the other group has arrived: FlashAttention-3's ping-pong
between warpgroups. The simulator counts threads and raises on a deadlock, as for mbarriers.

Simulated shared addresses. Under the simulator shared arrays are numpy arrays without addresses, so the
first time a Hopper twin sees one (shared_address, make_smem_desc, an mbarrier or bulk-copy argument) it is
placed in a per-block simulated shared window: each allocation (a numpy base buffer; the views of one
dynamic shared buffer share it) gets a base address congruent to 128 modulo 1024 -- 128-byte aligned (what
bulk copies and TMA need), deliberately *not* 1024-byte aligned, so a kernel that assumes an aligned
swizzle atom without aligning it fails here as it can on a GPU. A descriptor's address bits are that
simulated address, and the wgmma twin reads the bytes back from the array that holds them (raising if the
operand leaves it). The matrix base offset field (bits 49-51) is not simulated (the twin raises when set).
"""
from .launch import SIMULATOR

SWIZZLE_NONE = 0
SWIZZLE_128B = 1
SWIZZLE_64B = 2
SWIZZLE_32B = 3

WARPGROUP = 128
MBARRIER_MAX_COUNT = (1 << 20) - 1

# The simulator's tensor maps (tma.py encodes them; on a GPU the driver's opaque format is used instead):
# 16 uint64 words: magic, address, item size, swizzle bytes, dims d0..d3, byte strides of d1..d3, box b0..b3
SIM_TMAP_MAGIC = 0x4E465F544D415031      # "NF_TMAP1"
TMAP_WORDS = 16


def _check_acc_n(n, what):
    """n of an m64nNk16 wgmma with f32 accumulators: a multiple of 8 in [8, 256] (PTX ISA matrix shapes)."""
    if not (isinstance(n, int) and 8 <= n <= 256 and n % 8 == 0):
        raise ValueError(f"{what}: N = {n!r}: m64nNk16 needs N a multiple of 8 in [8, 256]")


def _check_maxnreg(n, what):
    if not (isinstance(n, int) and 24 <= n <= 256 and n % 8 == 0):
        raise ValueError(f"{what}: {n!r} registers: setmaxnreg needs a multiple of 8 in [24, 256]")


NAMED_BARRIERS = 16


def _check_named(idx, nthreads, block_threads, what):
    if not 1 <= idx < NAMED_BARRIERS:
        raise ValueError(f"{what}: barrier {idx} outside [1, {NAMED_BARRIERS - 1}] (0 is syncthreads')")
    if nthreads <= 0 or nthreads % 32 or (block_threads is not None and nthreads > block_threads):
        raise ValueError(f"{what}: {nthreads} threads: a named barrier counts whole warps (a positive multiple "
                         f"of 32, at most the block's {block_threads})")


def _check_wait_n(n, what):
    if not (isinstance(n, int) and 0 <= n <= 7):
        raise ValueError(f"{what}: n = {n!r}: the pending-group count must be an integer in [0, 7]")


if SIMULATOR:
    import threading as _threading
    import time as _time

    import numpy as _np

    from . import simwarp as _simwarp
    from .ptx import _RED_LOCK, _bf16_to_f64, _bytes, _f16_to_f64, _ndarray
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray as _FakeArray
    from numba.cuda.simulator.cudadrv.devicearray import FakeWithinKernelCUDAArray as _FakeKernelArray

    _WINDOW = 1 << 18           # the 18 address bits a descriptor encodes
    _ALLOC_ALIGN = 1024
    _ALLOC_SKEW = 128           # base addresses are 128 (mod 1024): see the module docstring
    _POLL_S = 0.25
    _SWIZZLE_BYTES = {SWIZZLE_128B: 128, SWIZZLE_64B: 64, SWIZZLE_32B: 32}
    _SWIZZLE_BITS = {SWIZZLE_NONE: 0, SWIZZLE_128B: 3, SWIZZLE_64B: 2, SWIZZLE_32B: 1}

    _attach_lock = _threading.Lock()
    _ATTR = "_numba_flash_hopper"

    # ----------------------------------------------------------------------------------------------
    # per-block state: the simulated shared window and the mbarriers
    # ----------------------------------------------------------------------------------------------

    class _Region:
        def __init__(self, base, ptr, nbytes, buf, owner):
            self.base, self.ptr, self.nbytes, self.buf = base, ptr, nbytes, buf
            self.owner = owner   # keeps the memory alive, so its address cannot be reused meanwhile

    class _MBarrier:
        def __init__(self, count, lock):
            self.cond = _threading.Condition(lock)    # its waiters only (the block's lock)
            self.expected = count
            self.pending = count
            self.tx = 0
            self.phase = 0      # phases completed so far; the current phase's parity is phase & 1

    def _root(a):
        """The numpy array owning a's memory (views of one dynamic shared buffer share it)."""
        while True:
            b = a.base
            if isinstance(b, _np.ndarray):
                a = b
            elif isinstance(b, memoryview) and isinstance(b.obj, _np.ndarray):
                a = b.obj
            else:
                return a

    def _ptr(a):
        return a.__array_interface__["data"][0]

    class _Block:
        """A simulated block's Hopper state. Blocks of a simulated grid run one after another but share
        the launch's shared arrays, so the state belongs to the block (its BlockManager), not the array."""

        def __init__(self, manager):
            self.manager = manager
            dim = manager._block_dim
            self.nthreads = dim[0] * dim[1] * dim[2]
            self.lock = _threading.Lock()
            self.cond = _threading.Condition(self.lock)   # the block's state; each barrier has its own
            self.regions = []
            self.next_free = 0
            self.mbarriers = {}
            self.named = {}         # named barrier index -> [expected threads, arrived, phases completed,
                                    # its Condition]
            self.waiting = set()    # thread ids blocked in block_until (an mbarrier or named barrier)
            self.polling = {}       # thread id -> (first, last) time of its current run of false try_waits
            self.progress = _time.monotonic()   # when a barrier of the block last completed a phase
            self.hold = 1.0 + 0.01 * self.nthreads

        # --- address map ---

        def address(self, arr, what):
            """Simulated shared address of arr's first byte. (A local array cannot be told from a shared one
            here: both are plain numpy arrays under the simulator.)"""
            if isinstance(arr, (_FakeKernelArray, _FakeArray)):
                raise TypeError(f"{what}: needs a shared array (cuda.shared.array), got a kernel argument "
                                f"(global memory)")
            if not isinstance(arr, _np.ndarray):
                raise TypeError(f"{what}: needs a shared array, got {type(arr).__name__}")
            root = _root(arr)
            rptr = _ptr(root)
            with self.cond:
                for reg in self.regions:
                    if reg.ptr == rptr:
                        break
                else:
                    base = -(-self.next_free // _ALLOC_ALIGN) * _ALLOC_ALIGN + _ALLOC_SKEW
                    if base + root.nbytes > _WINDOW:
                        raise MemoryError(f"{what}: the block's shared arrays exceed the {_WINDOW}-byte "
                                          f"window a descriptor can address")
                    buf = root.reshape(-1).view(_np.uint8) if root.flags.c_contiguous else None
                    if buf is None:
                        raise ValueError(f"{what}: shared arrays must be C-contiguous")
                    reg = _Region(base, rptr, root.nbytes, buf, root)
                    self.next_free = base + root.nbytes
                    self.regions.append(reg)
            return reg.base + (_ptr(arr) - rptr)

        def locate(self, addr, nbytes, what):
            """(uint8 view of the array holding bytes [addr, addr + nbytes), offset of addr in it)."""
            for reg in self.regions:
                if reg.base <= addr and addr + nbytes <= reg.base + reg.nbytes:
                    return reg.buf, addr - reg.base
            known = ", ".join(f"[{r.base:#x}, {r.base + r.nbytes:#x})" for r in self.regions) or "none"
            raise IndexError(f"{what}: shared bytes [{addr:#x}, {addr + nbytes:#x}) are not inside one shared "
                             f"array (simulated shared arrays: {known})")

        # --- mbarriers ---

        def mbarrier_addr(self, bars, idx, what):
            addr = self.address(bars, what) + int(idx) * bars.itemsize
            if addr % 8:
                raise ValueError(f"{what}: mbarrier address {addr:#x} (element {int(idx)}) is not 8-byte aligned")
            self.locate(addr, 8, what)
            return addr

        def mbarrier(self, addr, what):
            m = self.mbarriers.get(addr)
            if m is None:
                raise RuntimeError(f"{what}: the mbarrier at shared address {addr:#x} was not initialised "
                                   f"(mbarrier_init) in this block")
            return m

        def settle(self, m):
            """Complete the current phase if nothing is pending (called holding the lock)."""
            if m.pending == 0 and m.tx == 0:
                m.phase += 1
                m.pending = m.expected
                self.progress = _time.monotonic()
                m.cond.notify_all()

        def stuck(self, now):
            """Every live thread of the block waits on an mbarrier (blocked, or polling it right now) or at
            syncthreads: none can move on."""
            alive = [t for t in _threading.enumerate() if getattr(t, "_manager", None) is self.manager]
            return all(t.thread_id in self.waiting or t.syncthreads_blocked
                       or now - self.polling.get(t.thread_id, (0, -1e9))[1] < 0.2 for t in alive)

        def block_until(self, thread, cond, done, deadlock, what):
            """Block the calling thread (holding the lock) until done(), waking on cond() (its barrier's
            Condition) or every _POLL_S. Raises deadlock() once every thread of the block has waited on a
            barrier or at syncthreads for a while (self.hold: the BlockManager clears a released thread's
            syncthreads flag late) with no wake-up, and a timeout once neither this wait nor any other of the
            block's barriers has completed for NUMBA_FLASH_SIMWARP_TIMEOUT seconds. (Measured from the
            block's last progress, not from the start of this wait: in a loaded test run one warpgroup may
            legitimately wait minutes while the other, many Python threads, computes a tile.)"""
            start = _time.monotonic()
            stuck_since = None
            self.waiting.add(thread.thread_id)
            try:
                while not done():
                    notified = cond().wait(_POLL_S)
                    if thread.abort:
                        raise RuntimeError(f"abort flag set while waiting: {what}")
                    if done():
                        break
                    if notified:
                        continue        # something happened: look for a deadlock only when nothing does
                    now = _time.monotonic()
                    if self.stuck(now):
                        stuck_since = stuck_since or now
                        if now - stuck_since > self.hold:
                            _simwarp._raise_lane_exception(self.manager)   # a thread that died of one
                            raise deadlock()
                    else:
                        stuck_since = None
                    if now - max(start, self.progress) > _simwarp.TIMEOUT_S:
                        raise RuntimeError(f"{what} did not complete, and no other barrier of the block "
                                           f"completed a phase, within {_simwarp.TIMEOUT_S:g} s "
                                           f"(NUMBA_FLASH_SIMWARP_TIMEOUT)")
            finally:
                self.waiting.discard(thread.thread_id)

        def deadlock(self, thread, p):
            return RuntimeError(f"block {tuple(thread.blockIdx)} deadlocked: every thread waits on an mbarrier "
                                f"or at syncthreads, and the awaited phase (parity {p}) cannot complete")

    def _block(thread=None):
        thread = thread or _threading.current_thread()
        manager = getattr(thread, "_manager", None)
        if manager is None:
            raise RuntimeError("Hopper intrinsics can only run inside a simulated CUDA kernel")
        blk = getattr(manager, _ATTR, None)
        if blk is None:
            with _attach_lock:
                blk = getattr(manager, _ATTR, None)
                if blk is None:
                    blk = _Block(manager)
                    setattr(manager, _ATTR, blk)
        return blk

    # ----------------------------------------------------------------------------------------------
    # addresses and descriptors
    # ----------------------------------------------------------------------------------------------

    def shared_address(arr):
        return _np.uint32(_block().address(arr, "shared_address"))

    def _encode(x):
        return (int(x) & 0x3FFFF) >> 4

    def make_smem_desc(arr, byte_offset, lbo_bytes, sbo_bytes, swizzle):
        addr = _block().address(arr, "make_smem_desc") + int(byte_offset)
        for name, v in (("start address", addr), ("LBO", lbo_bytes), ("SBO", sbo_bytes)):
            if int(v) % 16 or int(v) < 0:
                raise ValueError(f"make_smem_desc: {name} {int(v)} is not a non-negative multiple of 16 bytes")
        if int(swizzle) not in _SWIZZLE_BITS:
            raise ValueError(f"make_smem_desc: swizzle mode {int(swizzle)} is not 0 (none), 1 (128B), "
                             f"2 (64B) or 3 (32B)")
        return _np.uint64(_encode(addr) | _encode(lbo_bytes) << 16 | _encode(sbo_bytes) << 32
                          | int(swizzle) << 62)

    def smem_desc_add(desc, byte_offset):
        start, lbo, sbo, base_offset, swz = _decode(desc)
        off = int(byte_offset)
        if off % 16 or off < 0:
            raise ValueError(f"smem_desc_add: byte offset {off} is not a non-negative multiple of 16")
        if start + off >= 1 << 18:
            raise ValueError(f"smem_desc_add: start address {start} + {off} does not fit the descriptor's field")
        return _np.uint64(int(desc) + (off >> 4))

    def _decode(desc):
        d = int(desc) & 0xFFFFFFFFFFFFFFFF
        return ((d & 0x3FFF) << 4, ((d >> 16) & 0x3FFF) << 4, ((d >> 32) & 0x3FFF) << 4,
                (d >> 49) & 7, d >> 62)

    def _operand_addresses(desc, rows, mn_major, esize=2):
        """Shared addresses (rows x k) of an operand's elements, per the canonical layouts and the swizzle
        of the module docstring: 16-bit elements (esize 2, k = 16) or tf32 words (esize 4, k = 8,
        K-major only)."""
        start, lbo, sbo, base_offset, swz = _decode(desc)
        if base_offset:
            raise NotImplementedError("wgmma: the matrix base offset (descriptor bits 49-51) is not simulated; "
                                      "start swizzled operands on a swizzle-pattern boundary")
        r = _np.arange(rows, dtype=_np.int64).reshape(-1, 1)
        if esize == 4:
            assert not mn_major
            k = _np.arange(8, dtype=_np.int64).reshape(1, -1)
            if swz == SWIZZLE_NONE:
                off = (r % 8) * 16 + (r // 8) * sbo + (k % 4) * 4 + (k // 4) * lbo
            else:
                off = (r % 8) * _SWIZZLE_BYTES[swz] + (r // 8) * sbo + k * 4
            addr = start + off
            bits = _SWIZZLE_BITS[swz]
            if bits:
                addr = addr ^ (((addr >> 7) & ((1 << bits) - 1)) << 4)
            return addr
        k = _np.arange(16, dtype=_np.int64).reshape(1, -1)
        if swz == SWIZZLE_NONE:
            if mn_major:
                off = (r % 8) * 2 + (r // 8) * sbo + (k % 8) * 16 + (k // 8) * lbo
            else:
                off = (r % 8) * 16 + (r // 8) * sbo + (k % 8) * 2 + (k // 8) * lbo
        else:
            s = _SWIZZLE_BYTES[swz]
            e = s // 2      # 16-bit elements per swizzle row
            if mn_major:
                off = (r % e) * 2 + (r // e) * lbo + (k % 8) * s + (k // 8) * sbo
            else:
                off = (r % 8) * s + (r // 8) * sbo + k * 2
        addr = start + off
        bits = _SWIZZLE_BITS[swz]
        if bits:
            addr = addr ^ (((addr >> 7) & ((1 << bits) - 1)) << 4)
        return addr

    def _read_operand(blk, desc, rows, mn_major, to_f64, what):
        if to_f64 is _tf32_to_f64:
            addr = _operand_addresses(desc, rows, mn_major, 4)
            lo, hi = int(addr.min()), int(addr.max()) + 4
            buf, off = blk.locate(lo, hi - lo, what)
            rel = addr - lo + off
            bits = sum(buf[rel + i].astype(_np.uint32) << (8 * i) for i in range(4))
            return to_f64(bits)
        addr = _operand_addresses(desc, rows, mn_major)
        lo, hi = int(addr.min()), int(addr.max()) + 2
        buf, off = blk.locate(lo, hi - lo, what)
        rel = addr - lo + off
        bits = buf[rel].astype(_np.uint16) | (buf[rel + 1].astype(_np.uint16) << 8)
        return to_f64(bits)

    def _tf32_to_f64(bits):
        """32-bit words as the tensor cores read tf32: the 13 low mantissa bits are not used."""
        return (_np.asarray(bits, dtype=_np.uint32) & _np.uint32(0xFFFFE000)).view(_np.float32).astype(_np.float64)

    # ----------------------------------------------------------------------------------------------
    # wgmma
    # ----------------------------------------------------------------------------------------------

    def _frag_maps():
        q = _np.arange(WARPGROUP).reshape(-1, 1)
        w, g, t = q // 32, (q % 32) // 4, q % 4
        h = _np.arange(8).reshape(1, -1)        # A: element h of the thread = register h // 2, half h % 2
        i, half = h // 2, h % 2
        a = (16 * w + g + 8 * (i & 1), 2 * t + half + 8 * (i >> 1))
        return tuple(_np.broadcast_arrays(*a))

    _A_MAP = _frag_maps()

    def _frag_maps_tf32():
        q = _np.arange(WARPGROUP).reshape(-1, 1)
        w, g, t = q // 32, (q % 32) // 4, q % 4
        i = _np.arange(4).reshape(1, -1)        # A: register i holds one tf32 element
        return tuple(_np.broadcast_arrays(16 * w + g + 8 * (i & 1), t + 4 * (i >> 1)))

    _A_MAP_TF32 = _frag_maps_tf32()
    _D_MAPS = {}

    def _d_map(nacc):
        m = _D_MAPS.get(nacc)
        if m is None:
            q = _np.arange(WARPGROUP).reshape(-1, 1)
            j = _np.arange(nacc).reshape(1, -1)
            w, g, t = q // 32, (q % 32) // 4, q % 4
            m = _D_MAPS.setdefault(nacc, tuple(_np.broadcast_arrays(
                16 * w + g + 8 * ((j >> 1) & 1), 8 * (j >> 2) + 2 * t + (j & 1))))
        return m

    class _WgState:
        """A thread's wgmma protocol state: fenced since its last wait; the id of the group collecting
        new wgmmas (bumped by commit); groups with an id below `done` have been waited for."""

        def __init__(self):
            self.fenced = False
            self.open = 0
            self.done = 0

    def _wg_state(thread=None):
        thread = thread or _threading.current_thread()
        st = getattr(thread, "_numba_flash_wgmma", None)
        if st is None:
            st = _WgState()
            thread._numba_flash_wgmma = st
        return st

    class _Accumulators(tuple):
        """A thread's wgmma result. Reading it (indexing, unpacking, storing) before wgmma_wait_group has
        covered its group raises: on a GPU those registers are still being written."""

        def _check(self):
            if self._group >= _wg_state().done:
                raise RuntimeError("wgmma accumulators read before a wgmma_wait_group covering their "
                                   "wgmma: commit the group and wait for it first (on a GPU the registers "
                                   "are not written yet)")

        def __getitem__(self, i):
            self._check()
            return tuple.__getitem__(self, i)

        def __iter__(self):
            self._check()
            return tuple.__iter__(self)

    def _acc_values(acc, what):
        if not isinstance(acc, tuple):
            raise TypeError(f"{what}: the accumulators must be a tuple of float32, got {type(acc).__name__}")
        vals = tuple(_np.float32(x) for x in tuple.__iter__(acc))   # chaining a pending result is allowed
        _check_acc_n(2 * len(vals), what)
        return vals

    def _wgmma_product(blk, deps, key, to_f64):
        """D (64 x N float32) from the 128 deposits of one wgmma."""
        kind, nacc, trans_a, trans_b = key
        first = deps[0]
        for q, d in enumerate(deps):
            if d[0] != key:
                raise RuntimeError(f"wgmma: thread {q} of the warpgroup issued {d[0]}, thread 0 {key}: the "
                                   f"warpgroup must execute the same wgmma")
            if d[1:4] != first[1:4]:        # (desc_a is 0 throughout for A from registers)
                raise RuntimeError(f"wgmma: thread {q} of the warpgroup passed different descriptors or "
                                   f"scale_d than thread 0 (they must be warpgroup-uniform)")
        _, desc_a, desc_b, scale_d = first[:4]
        n = 2 * nacc
        B = _read_operand(blk, desc_b, n, trans_b, to_f64, "wgmma operand B")     # Bt[n][k]
        if kind == "ss":
            A = _read_operand(blk, desc_a, 64, trans_a, to_f64, "wgmma operand A")
        elif to_f64 is _tf32_to_f64:
            regs = _np.array([d[5] for d in deps], dtype=_np.uint32)
            A = _np.empty((64, 8))
            A[_A_MAP_TF32] = to_f64(regs)
        else:
            regs = _np.array([d[5] for d in deps], dtype=_np.uint32)
            A = _np.empty((64, 16))
            A[_A_MAP] = to_f64(regs.view(_np.uint16).reshape(WARPGROUP, 8))   # little-endian: low half first
        D = A @ B.T          # exact products, summed in float64
        if scale_d:
            C = _np.empty((64, n))
            C[_d_map(nacc)] = _np.array([d[4] for d in deps], dtype=_np.float32)
            D = D + C
        return _to_f32_toward_zero(D)

    def _to_f32_toward_zero(x):
        """float64 -> float32 truncated (rounded toward zero), as the tensor cores round their float32
        accumulation (H100: the error of a long accumulation grows by ~2e-8 relative per wgmma, one way;
        docs/PERFORMANCE.md, the tf32 path). Overflow saturates to inf as on the GPU."""
        with _np.errstate(over="ignore", invalid="ignore"):
            r = x.astype(_np.float32)
            up = _np.abs(r.astype(_np.float64)) > _np.abs(x)       # rounded away from zero: step back
            up &= _np.isfinite(r)                                   # (an overflow stays inf)
            r[up] = _np.nextafter(r[up], _np.float32(0))
        return r

    def _wgmma(kind, to_f64, desc_a, a_regs, desc_b, acc, scale_d, trans_a, trans_b, what):
        thread = _threading.current_thread()
        st = _wg_state(thread)
        if not st.fenced:
            raise RuntimeError(f"{what}: no wgmma_fence() since this thread's last wgmma_wait_group (the ISA "
                               f"requires one before the first wgmma and after touching its registers)")
        if trans_a not in (0, 1) or trans_b not in (0, 1):
            raise ValueError(f"{what}: trans flags must be 0 or 1, got {trans_a}, {trans_b}")
        vals = _acc_values(acc, what)
        key = (kind, len(vals), int(trans_a), int(trans_b))
        mine = (key, int(desc_a) & 0xFFFFFFFFFFFFFFFF, int(desc_b) & 0xFFFFFFFFFFFFFFFF, bool(scale_d),
                vals, a_regs)
        blk = _block(thread)
        rank, _, scratch = _simwarp.exchange_group(mine, WARPGROUP, full=True,
                                                   combine=lambda deps: _wgmma_product(blk, deps, key, to_f64))
        D = scratch["combined"]
        rows, cols = _d_map(len(vals))
        out = _Accumulators(D[rows[rank], cols[rank]])      # float32 scalars, as the registers hold
        out._group = st.open
        return out

    def _regs(a0, a1, a2, a3):
        return tuple(int(x) & 0xFFFFFFFF for x in (a0, a1, a2, a3))

    def wgmma_f16(desc_a, desc_b, acc, scale_d, trans_a, trans_b):
        return _wgmma("ss", _f16_to_f64, desc_a, None, desc_b, acc, scale_d, trans_a, trans_b, "wgmma_f16")

    def wgmma_bf16(desc_a, desc_b, acc, scale_d, trans_a, trans_b):
        return _wgmma("ss", _bf16_to_f64, desc_a, None, desc_b, acc, scale_d, trans_a, trans_b, "wgmma_bf16")

    def wgmma_f16_rs(a0, a1, a2, a3, desc_b, acc, scale_d, trans_b):
        return _wgmma("rs", _f16_to_f64, 0, _regs(a0, a1, a2, a3), desc_b, acc, scale_d, 0, trans_b,
                      "wgmma_f16_rs")

    def wgmma_bf16_rs(a0, a1, a2, a3, desc_b, acc, scale_d, trans_b):
        return _wgmma("rs", _bf16_to_f64, 0, _regs(a0, a1, a2, a3), desc_b, acc, scale_d, 0, trans_b,
                      "wgmma_bf16_rs")

    def wgmma_tf32(desc_a, desc_b, acc, scale_d):
        return _wgmma("ss", _tf32_to_f64, desc_a, None, desc_b, acc, scale_d, 0, 0, "wgmma_tf32")

    def _regs_f32(a0, a1, a2, a3):
        """The bits of four tf32 A registers, given as float32 values or as their uint32 bit patterns."""
        return tuple(int(x) if isinstance(x, (int, _np.integer)) else int(_np.float32(x).view(_np.uint32))
                     for x in (a0, a1, a2, a3))

    def wgmma_tf32_rs(a0, a1, a2, a3, desc_b, acc, scale_d):
        return _wgmma("rs", _tf32_to_f64, 0, _regs_f32(a0, a1, a2, a3), desc_b, acc, scale_d, 0, 0,
                      "wgmma_tf32_rs")

    def wgmma_fence():
        _wg_state().fenced = True

    def wgmma_commit_group():
        _wg_state().open += 1

    def wgmma_wait_group(n):
        _check_wait_n(n, "wgmma_wait_group")
        st = _wg_state()
        st.done = max(st.done, st.open - int(n))
        st.fenced = False

    def wgmma_fence_operand(acc):
        return acc

    wgmma_wait_group_alt = wgmma_wait_group

    def wgmma_fence_a(a0, a1, a2, a3):
        if isinstance(a0, (float, _np.floating)):
            return (_np.float32(a0), _np.float32(a1), _np.float32(a2), _np.float32(a3))
        return (_np.uint32(a0), _np.uint32(a1), _np.uint32(a2), _np.uint32(a3))

    def wgmma_acc_zeros(n):
        _check_acc_n(n, "wgmma_acc_zeros")
        return (_np.float32(0),) * (n // 2)

    def wgmma_acc_load(arr, start, n):
        _check_acc_n(n, "wgmma_acc_load")
        a = _ndarray(arr).reshape(-1)
        i = int(start)
        if i < 0 or i + n // 2 > a.size:
            raise IndexError(f"wgmma_acc_load: elements [{i}, {i + n // 2}) outside an array of {a.size}")
        return tuple(a[i:i + n // 2].astype(_np.float32))

    def wgmma_acc_store(arr, start, acc):
        vals = tuple(acc)          # a pending result raises here, as reading its registers would be wrong
        a = _ndarray(arr).reshape(-1)
        i = int(start)
        if i < 0 or i + len(vals) > a.size:
            raise IndexError(f"wgmma_acc_store: elements [{i}, {i + len(vals)}) outside an array of {a.size}")
        a[i:i + len(vals)] = vals

    def fence_proxy_async_shared():
        pass

    def setmaxnreg_inc(n):
        _check_maxnreg(n, "setmaxnreg_inc")

    def setmaxnreg_dec(n):
        _check_maxnreg(n, "setmaxnreg_dec")

    # ----------------------------------------------------------------------------------------------
    # mbarrier, cp.async.bulk
    # ----------------------------------------------------------------------------------------------

    def mbarrier_init(bars, idx, count):
        blk = _block()
        addr = blk.mbarrier_addr(bars, idx, "mbarrier_init")
        count = int(count)
        if not 1 <= count <= MBARRIER_MAX_COUNT:
            raise ValueError(f"mbarrier_init: count {count} outside [1, {MBARRIER_MAX_COUNT}]")
        with blk.cond:
            old = blk.mbarriers.get(addr)
            blk.mbarriers[addr] = _MBarrier(count, blk.lock)
            if old is not None:
                old.cond.notify_all()

    def fence_mbarrier_init():
        pass

    def _arrive(bars, idx, tx, arrive, what):
        blk = _block()
        addr = blk.mbarrier_addr(bars, idx, what)
        with blk.cond:
            m = blk.mbarrier(addr, what)
            m.tx += int(tx)
            if arrive:
                if m.pending == 0:
                    raise RuntimeError(f"{what}: more arrivals than the mbarrier's count ({m.expected}) in "
                                       f"one phase")
                m.pending -= 1
            blk.settle(m)

    def mbarrier_arrive(bars, idx):
        _arrive(bars, idx, 0, True, "mbarrier_arrive")

    def mbarrier_expect_tx(bars, idx, tx_bytes):
        _arrive(bars, idx, tx_bytes, False, "mbarrier_expect_tx")

    def mbarrier_arrive_expect_tx(bars, idx, tx_bytes):
        _arrive(bars, idx, tx_bytes, True, "mbarrier_arrive_expect_tx")

    def mbarrier_try_wait_parity(bars, idx, parity):
        thread = _threading.current_thread()
        blk = _block(thread)
        addr = blk.mbarrier_addr(bars, idx, "mbarrier_try_wait_parity")
        p = int(parity) & 1
        with blk.cond:
            if (blk.mbarrier(addr, "mbarrier_try_wait_parity").phase & 1) == p:
                # the hardware suspends the thread a while before answering false; so does this, which
                # also keeps a polling loop from starving the other simulated threads
                blk.mbarrier(addr, "mbarrier_try_wait_parity").cond.wait(0.001)
            if (blk.mbarrier(addr, "mbarrier_try_wait_parity").phase & 1) != p:
                blk.polling.pop(thread.thread_id, None)
                return True
            # A thread answered false again and again, while all others wait too, spins forever: the
            # deadlock mbarrier_wait_parity detects, in a polling loop.
            now = _time.monotonic()
            first = blk.polling.get(thread.thread_id, (now, now))[0]
            blk.polling[thread.thread_id] = (first, now)
            if now - first > blk.hold and blk.stuck(now):
                _simwarp._raise_lane_exception(blk.manager)   # a thread that died of an exception
                raise blk.deadlock(thread, p)
            if thread.abort:
                raise RuntimeError("abort flag set while polling an mbarrier")
            return False

    def mbarrier_wait_parity(bars, idx, parity):
        thread = _threading.current_thread()
        blk = _block(thread)
        addr = blk.mbarrier_addr(bars, idx, "mbarrier_wait_parity")
        p = int(parity) & 1
        with blk.cond:
            # the mbarrier is looked up at each wake-up: it may have been re-initialised meanwhile
            blk.block_until(thread, lambda: blk.mbarrier(addr, "mbarrier_wait_parity").cond,
                            lambda: (blk.mbarrier(addr, "mbarrier_wait_parity").phase & 1) != p,
                            lambda: blk.deadlock(thread, p),
                            f"mbarrier_wait_parity: the phase of parity {p}")

    def _named(idx, nthreads, what):
        """Count the calling thread at named barrier idx; (block, barrier state, the phase it arrived in).
        Called holding the block's lock."""
        blk = _block()
        idx, nthreads = int(idx), int(nthreads)
        _check_named(idx, nthreads, blk.nthreads, what)
        b = blk.named.get(idx)
        if b is None:
            b = blk.named[idx] = [nthreads, 0, 0, _threading.Condition(blk.lock)]
        if b[1] and b[0] != nthreads:
            raise RuntimeError(f"{what}: barrier {idx} awaits {b[0]} threads in this phase, this thread says "
                               f"{nthreads}")
        b[0] = nthreads
        b[1] += 1
        phase = b[2]
        if b[1] == nthreads:
            b[1] = 0
            b[2] += 1
            blk.progress = _time.monotonic()
            b[3].notify_all()
        return blk, b, phase

    def named_barrier_arrive(idx, nthreads):
        blk = _block()
        with blk.cond:
            _named(idx, nthreads, "named_barrier_arrive")

    def named_barrier_sync(idx, nthreads):
        thread = _threading.current_thread()
        blk = _block(thread)
        with blk.cond:
            _, b, phase = _named(idx, nthreads, "named_barrier_sync")
            blk.block_until(thread, lambda: b[3], lambda: b[2] != phase,
                            lambda: RuntimeError(f"block {tuple(thread.blockIdx)} deadlocked: every thread "
                                                 f"waits on a barrier, and named barrier {int(idx)} ({b[1]} "
                                                 f"of {b[0]} threads arrived) cannot complete"),
                            f"named_barrier_sync: barrier {int(idx)}")

    def _bulk_operands(blk, sarr, s_byte_offset, garr, g_elem_index, nbytes, what, shared_is, global_is):
        """(shared address, global bytes as uint8, global byte offset, size) of a bulk copy or reduction,
        checked as the GPU requires (a positive multiple of 16 bytes, both ends 16-byte aligned, inside
        their arrays; the shared end by the caller's blk.locate); shared_is / global_is name the two ends
        in the errors ("source", "destination")."""
        n = int(nbytes)
        if n <= 0 or n % 16:
            raise ValueError(f"{what}: size {n} is not a positive multiple of 16 bytes")
        saddr = blk.address(sarr, what) + int(s_byte_offset)
        if saddr % 16:
            raise ValueError(f"{what}: shared {shared_is} {saddr:#x} is not 16-byte aligned")
        gbuf = _bytes(garr)
        goff = int(g_elem_index) * _ndarray(garr).itemsize
        if goff % 16:
            raise ValueError(f"{what}: global {global_is} byte offset {goff} is not 16-byte aligned")
        if goff < 0 or goff + n > gbuf.size:
            raise IndexError(f"{what}: global bytes [{goff}, {goff + n}) outside an array of {gbuf.size} bytes")
        return saddr, gbuf, goff, n

    def cp_async_bulk_g2s(sarr, s_byte_offset, garr, g_elem_index, nbytes, bars, bar_idx):
        what = "cp_async_bulk_g2s"
        blk = _block()
        dst, src, soff, n = _bulk_operands(blk, sarr, s_byte_offset, garr, g_elem_index, nbytes, what,
                                           "destination", "source")
        buf, off = blk.locate(dst, n, f"{what} destination")
        bar = blk.mbarrier_addr(bars, bar_idx, what)
        buf[off:off + n] = src[soff:soff + n]
        with blk.cond:
            m = blk.mbarrier(bar, what)
            m.tx -= n
            blk.settle(m)

    def _bulk_groups(thread=None):
        """The calling thread's bulk reductions: [open group's operations, committed groups (oldest
        first)] (per thread, as on a GPU)."""
        thread = thread or _threading.current_thread()
        st = getattr(thread, "_numba_flash_bulk", None)
        if st is None:
            st = [[], []]
            thread._numba_flash_bulk = st
        return st

    def bulk_reduce_add_f32(garr, g_elem_index, sarr, s_byte_offset, nbytes):
        what = "bulk_reduce_add_f32"
        blk = _block()
        g = _ndarray(garr)
        if g.dtype != _np.float32:
            raise TypeError(f"{what}: needs a float32 global array, got {g.dtype}")
        src, _, goff, n = _bulk_operands(blk, sarr, s_byte_offset, garr, g_elem_index, nbytes, what, "source",
                                         "destination")
        blk.locate(src, n, f"{what} source")          # read at the wait that covers it; checked now
        _bulk_groups()[0].append((blk, src, g.reshape(-1), goff // 4, n // 4))

    def bulk_commit_group():
        st = _bulk_groups()
        st[1].append(st[0])
        st[0] = []

    def _bulk_wait(n, what):
        _check_wait_n(n, what)
        groups = _bulk_groups()[1]
        while len(groups) > int(n):
            for blk, src, g, i, count in groups.pop(0):
                buf, off = blk.locate(src, 4 * count, what)
                vals = buf[off:off + 4 * count].view(_np.float32)
                with _RED_LOCK:
                    g[i:i + count] += vals

    def bulk_wait_group_read(n):
        _bulk_wait(n, "bulk_wait_group_read")

    def bulk_wait_group(n):
        _bulk_wait(n, "bulk_wait_group")

    def tma_load_4d(sarr, s_byte_offset, maps, map_idx, garr, c0, c1, c2, c3, bars, bar_idx):
        what = "tma_load_4d"
        blk = _block()
        words = _ndarray(maps).reshape(-1)
        i = int(map_idx) * TMAP_WORDS
        if i < 0 or i + TMAP_WORDS > words.size:
            raise IndexError(f"{what}: map {int(map_idx)} outside an array of {words.size // TMAP_WORDS} maps")
        w = [int(x) for x in words[i:i + TMAP_WORDS]]
        if w[0] != SIM_TMAP_MAGIC:
            raise ValueError(f"{what}: map {int(map_idx)} is not a tensor map (tma.py encodes them)")
        addr, item, sw = w[1], w[2], w[3]
        dims, strides, box = w[4:8], [item] + w[8:11], w[11:15]
        g = _ndarray(garr)
        src = _bytes(garr)
        gptr = g.__array_interface__["data"][0]
        if not gptr <= addr < gptr + src.size:
            raise ValueError(f"{what}: the tensor map's address is not inside the array passed as garr")
        nbytes = box[0] * box[1] * box[2] * box[3] * item
        dst = blk.address(sarr, what) + int(s_byte_offset)
        atom = 8 * sw if sw else 128
        if dst % atom:
            raise ValueError(f"{what}: shared destination {dst:#x} is not {atom}-byte aligned")
        buf, off = blk.locate(dst, nbytes, f"{what} destination")
        row = box[0] * item
        if sw and row > sw or row % 16:
            raise ValueError(f"{what}: a box row of {row} bytes: a multiple of 16, at most the swizzle's {sw}")
        xmask = {0: 0, 32: 1, 64: 3, 128: 7}[sw]
        coords = (int(c0), int(c1), int(c2), int(c3))
        x0 = coords[0] + _np.arange(box[0])
        ok0 = (x0 >= 0) & (x0 < dims[0])
        img = _np.zeros(nbytes, _np.uint8)
        r = 0
        for i3 in range(box[3]):
            for i2 in range(box[2]):
                for i1 in range(box[1]):
                    x = (coords[1] + i1, coords[2] + i2, coords[3] + i3)
                    if all(0 <= x[k] < dims[k + 1] for k in range(3)):
                        base = addr - gptr + sum(x[k] * strides[k + 1] for k in range(3))
                        for e in _np.nonzero(ok0)[0]:
                            o = base + int(x0[e]) * item
                            img[r * row + e * item:r * row + (e + 1) * item] = src[o:o + item]
                    r += 1
        for ch in range(nbytes // 16):
            a = dst + 16 * ch
            a ^= ((a >> 7) & xmask) << 4
            buf[off + a - dst:off + a - dst + 16] = img[16 * ch:16 * ch + 16]
        bar = blk.mbarrier_addr(bars, bar_idx, what)
        with blk.cond:
            m = blk.mbarrier(bar, what)
            m.tx -= nbytes
            blk.settle(m)


else:
    from llvmlite import ir as _ir
    from numba.core import types as _types
    from numba.core.errors import TypingError as _TypingError
    from numba.cuda.extending import intrinsic as _intrinsic

    # the inline-asm and address helpers of the sm_80 intrinsics
    from .ptx import _asm, _elem_ptr, _global_ptr, _is_array, _is_int, _make_void_asm, _shared_addr

    _I32 = _ir.IntType(32)
    _I64 = _ir.IntType(64)
    _F32 = _ir.FloatType()
    # Warpgroup-collective instructions must not be moved into or out of divergent control flow.
    _COLLECTIVE = ("convergent",)

    def _literal(x):
        return x.literal_value if isinstance(x, _types.IntegerLiteral) else None

    def _to(context, builder, val, ty, dst):
        return context.cast(builder, val, ty, dst)

    def _void_op(text, collective=False):
        return _make_void_asm(text, _COLLECTIVE if collective else ())

    def _literal_op(name, text, check):
        """A no-result instruction whose one operand is an immediate, given as an integer literal."""
        @_intrinsic
        def op(typingctx, n):
            v = _literal(n)
            if v is None:
                return None     # Numba retries with the literal type where the argument is a constant
            try:
                check(v, name)
            except ValueError as e:
                raise _TypingError(str(e))

            def codegen(context, builder, signature, args):
                _asm(builder, _ir.VoidType(), [], text.format(v), "~{memory}", [], side_effect=True,
                     attrs=_COLLECTIVE)
                return context.get_dummy_value()

            return _types.void(n), codegen
        return op

    # --- addresses and descriptors ---

    @_intrinsic
    def shared_address(typingctx, arr):
        if not _is_array(arr):
            return None

        def codegen(context, builder, signature, args):
            return _shared_addr(context, builder, signature.args[0], args[0], _types.intp,
                                _ir.Constant(_I64, 0))

        return _types.uint32(arr), codegen

    @_intrinsic
    def make_smem_desc(typingctx, arr, byte_offset, lbo_bytes, sbo_bytes, swizzle):
        if not (_is_array(arr) and all(_is_int(x) for x in (byte_offset, lbo_bytes, sbo_bytes, swizzle))):
            return None

        def codegen(context, builder, signature, args):
            t = signature.args
            addr = _shared_addr(context, builder, t[0], args[0], _types.intp, _ir.Constant(_I64, 0))
            i32 = [builder.trunc(_to(context, builder, v, ty, _types.int64), _I32) for v, ty in zip(args[1:], t[1:])]
            off, lbo, sbo, swz = i32
            addr = builder.add(addr, off)

            def field(x, shift):    # matrix-descriptor-encode(x) = (x & 0x3FFFF) >> 4, at bit `shift`
                v = builder.lshr(builder.and_(x, _ir.Constant(_I32, 0x3FFFF)), _ir.Constant(_I32, 4))
                return builder.shl(builder.zext(v, _I64), _ir.Constant(_I64, shift))

            mode = builder.shl(builder.zext(builder.and_(swz, _ir.Constant(_I32, 3)), _I64),
                               _ir.Constant(_I64, 62))
            return builder.or_(builder.or_(field(addr, 0), field(lbo, 16)),
                               builder.or_(field(sbo, 32), mode))

        return _types.uint64(arr, byte_offset, lbo_bytes, sbo_bytes, swizzle), codegen

    @_intrinsic
    def smem_desc_add(typingctx, desc, byte_offset):
        if not (desc == _types.uint64 and _is_int(byte_offset)):
            return None

        def codegen(context, builder, signature, args):
            # start address (bits 0-13) and LBO (16-29) are in the low word, and a shared-window address
            # stays below 2^18, so the start field never carries: a 32-bit add on the low word is exact
            d, off = args
            off = builder.trunc(_to(context, builder, off, signature.args[1], _types.int64), _I32)
            lo = builder.add(builder.trunc(d, _I32), builder.lshr(off, _ir.Constant(_I32, 4)))
            hi = builder.and_(d, _ir.Constant(_I64, 0xFFFFFFFF00000000))
            return builder.or_(hi, builder.zext(lo, _I64))

        return _types.uint64(desc, byte_offset), codegen

    # --- wgmma ---

    def _nacc(acc):
        """The accumulator count of an m64nNk16 f32 wgmma, or None if `acc` is not a valid set."""
        if not (isinstance(acc, _types.UniTuple) and acc.dtype == _types.float32):
            return None
        n = 2 * acc.count
        return acc.count if (8 <= n <= 256 and n % 8 == 0) else None

    def _acc_asm(builder, nacc, ins, in_tys, in_cons, text):
        """Call `text` with the accumulators as tied in/out operands $0..$nacc-1, `ins` after them."""
        cons = ",".join(["=f"] * nacc + in_cons + [str(i) for i in range(nacc)] + ["~{memory}"])
        return _asm(builder, _ir.LiteralStructType([_F32] * nacc), in_tys + [_F32] * nacc, text, cons, ins,
                    side_effect=True, attrs=_COLLECTIVE)

    def _unpack(builder, tup, n):
        return [builder.extract_value(tup, i) for i in range(n)]

    def _ss_codegen(nacc, text):
        """codegen of an SS wgmma (desc_a, desc_b, acc, scale_d, ...): `text` takes the accumulators as
        $0..$nacc-1, then desc_a, desc_b and scale_d."""
        def codegen(context, builder, signature, args):
            t = signature.args
            da = _to(context, builder, args[0], t[0], _types.uint64)
            db = _to(context, builder, args[1], t[1], _types.uint64)
            sd = _to(context, builder, args[3], t[3], _types.int32)
            out = _acc_asm(builder, nacc, [da, db, sd] + _unpack(builder, args[2], nacc),
                           [_I64, _I64, _I32], ["l", "l", "r"], text)
            return context.make_tuple(builder, signature.return_type, _unpack(builder, out, nacc))
        return codegen

    def _rs_codegen(nacc, text, a_bits):
        """codegen of an RS wgmma (a0, a1, a2, a3, desc_b, acc, scale_d, ...): `text` takes the accumulators,
        then the four A registers (a_bits(context, builder, value, type) -> i32), desc_b and scale_d."""
        def codegen(context, builder, signature, args):
            t = signature.args
            ar = [a_bits(context, builder, v, ty) for v, ty in zip(args[:4], t[:4])]
            db = _to(context, builder, args[4], t[4], _types.uint64)
            sd = _to(context, builder, args[6], t[6], _types.int32)
            out = _acc_asm(builder, nacc, ar + [db, sd] + _unpack(builder, args[5], nacc),
                           [_I32] * 4 + [_I64, _I32], ["r"] * 4 + ["l", "r"], text)
            return context.make_tuple(builder, signature.return_type, _unpack(builder, out, nacc))
        return codegen

    def _u32_bits(context, builder, v, ty):
        return _to(context, builder, v, ty, _types.uint32)

    def _f32_bits(context, builder, v, ty):
        return builder.bitcast(_to(context, builder, v, ty, _types.float32), _I32)

    def _wgmma_text(nacc, shape, scale_d, operands, flags=""):
        """One wgmma with the accumulators $0..$nacc-1, `operands` (A, B) and scale-d from operand
        $scale_d as a predicate; `flags` follows the immediate scale-a, scale-b (the transposes)."""
        regs = ",".join(f"${i}" for i in range(nacc))
        return (f"{{ .reg .pred p; setp.ne.b32 p, ${scale_d}, 0; "
                f"wgmma.mma_async.sync.aligned.{shape} {{{regs}}}, {operands}, p, 1, 1{flags}; }}")

    def _make_wgmma_ss(ab):
        @_intrinsic
        def wgmma(typingctx, desc_a, desc_b, acc, scale_d, trans_a, trans_b):
            nacc = _nacc(acc)
            ta, tb = _literal(trans_a), _literal(trans_b)
            if nacc is None or not (_is_int(desc_a) and _is_int(desc_b) and _is_int(scale_d)):
                return None
            if ta is None or tb is None:
                return None
            if ta not in (0, 1) or tb not in (0, 1):
                raise _TypingError(f"wgmma_{ab}: trans_a, trans_b must be 0 or 1, got {ta}, {tb}")
            text = _wgmma_text(nacc, f"m64n{2 * nacc}k16.f32.{ab}.{ab}", nacc + 2, f"${nacc}, ${nacc + 1}",
                               f", {ta}, {tb}")
            return acc(desc_a, desc_b, acc, scale_d, trans_a, trans_b), _ss_codegen(nacc, text)
        return wgmma

    def _make_wgmma_rs(ab):
        @_intrinsic
        def wgmma(typingctx, a0, a1, a2, a3, desc_b, acc, scale_d, trans_b):
            nacc = _nacc(acc)
            tb = _literal(trans_b)
            if nacc is None or not all(_is_int(x) for x in (a0, a1, a2, a3, desc_b, scale_d)) or tb is None:
                return None
            if tb not in (0, 1):
                raise _TypingError(f"wgmma_{ab}_rs: trans_b must be 0 or 1, got {tb}")
            a = ",".join(f"${nacc + i}" for i in range(4))
            text = _wgmma_text(nacc, f"m64n{2 * nacc}k16.f32.{ab}.{ab}", nacc + 5, f"{{{a}}}, ${nacc + 4}",
                               f", {tb}")
            return acc(a0, a1, a2, a3, desc_b, acc, scale_d, trans_b), _rs_codegen(nacc, text, _u32_bits)
        return wgmma

    # tf32: k8, both operands K-major (no transpose flags), A registers hold float32 values or their bits
    # (uint32)
    @_intrinsic
    def wgmma_tf32(typingctx, desc_a, desc_b, acc, scale_d):
        nacc = _nacc(acc)
        if nacc is None or not (_is_int(desc_a) and _is_int(desc_b) and _is_int(scale_d)):
            return None
        text = _wgmma_text(nacc, f"m64n{2 * nacc}k8.f32.tf32.tf32", nacc + 2, f"${nacc}, ${nacc + 1}")
        return acc(desc_a, desc_b, acc, scale_d), _ss_codegen(nacc, text)

    @_intrinsic
    def wgmma_tf32_rs(typingctx, a0, a1, a2, a3, desc_b, acc, scale_d):
        nacc = _nacc(acc)
        f32 = all(isinstance(x, _types.Float) for x in (a0, a1, a2, a3))
        bits = all(isinstance(x, _types.Integer) and x.bitwidth == 32 for x in (a0, a1, a2, a3))
        if nacc is None or not ((f32 or bits) and _is_int(desc_b) and _is_int(scale_d)):
            return None
        a = ",".join(f"${nacc + i}" for i in range(4))
        text = _wgmma_text(nacc, f"m64n{2 * nacc}k8.f32.tf32.tf32", nacc + 5, f"{{{a}}}, ${nacc + 4}")
        return acc(a0, a1, a2, a3, desc_b, acc, scale_d), _rs_codegen(nacc, text, _f32_bits if f32 else _u32_bits)

    wgmma_f16 = _make_wgmma_ss("f16")
    wgmma_bf16 = _make_wgmma_ss("bf16")
    wgmma_f16_rs = _make_wgmma_rs("f16")
    wgmma_bf16_rs = _make_wgmma_rs("bf16")

    wgmma_fence = _void_op("wgmma.fence.sync.aligned;", collective=True)
    wgmma_commit_group = _void_op("wgmma.commit_group.sync.aligned;", collective=True)
    wgmma_wait_group = _literal_op("wgmma_wait_group", "wgmma.wait_group.sync.aligned {};", _check_wait_n)
    # the same instruction, spelled so that no compiler merges it with wgmma_wait_group (docstring)
    wgmma_wait_group_alt = _literal_op("wgmma_wait_group_alt", "wgmma.wait_group.sync.aligned {}; // alt",
                                       _check_wait_n)
    fence_proxy_async_shared = _void_op("fence.proxy.async.shared::cta;")
    setmaxnreg_inc = _literal_op("setmaxnreg_inc", "setmaxnreg.inc.sync.aligned.u32 {};", _check_maxnreg)
    setmaxnreg_dec = _literal_op("setmaxnreg_dec", "setmaxnreg.dec.sync.aligned.u32 {};", _check_maxnreg)

    @_intrinsic
    def wgmma_fence_operand(typingctx, acc):
        nacc = _nacc(acc)
        if nacc is None:
            return None

        def codegen(context, builder, signature, args):
            # an empty volatile asm that "rewrites" every accumulator: uses of the result stay after the
            # asms before it (the wait), and the values feeding it are computed before it
            out = _acc_asm(builder, nacc, _unpack(builder, args[0], nacc), [], [], "")
            return context.make_tuple(builder, signature.return_type, _unpack(builder, out, nacc))

        return acc(acc), codegen

    @_intrinsic
    def wgmma_fence_a(typingctx, a0, a1, a2, a3):
        f32 = all(isinstance(x, _types.Float) for x in (a0, a1, a2, a3))     # tf32 A registers
        if not f32 and not all(isinstance(x, _types.Integer) and x.bitwidth == 32 for x in (a0, a1, a2, a3)):
            return None
        ty, ir_ty, c = (_types.float32, _F32, "f") if f32 else (_types.uint32, _I32, "r")

        def codegen(context, builder, signature, args):
            # the same empty volatile asm for A registers: values computed before it, uses after it
            ins = [context.cast(builder, x, t, ty) for x, t in zip(args, signature.args)]
            out = _asm(builder, _ir.LiteralStructType([ir_ty] * 4), [ir_ty] * 4, "",
                       f"={c},={c},={c},={c},0,1,2,3", ins, side_effect=True)
            return context.make_tuple(builder, signature.return_type, _unpack(builder, out, 4))

        return _types.UniTuple(ty, 4)(a0, a1, a2, a3), codegen

    @_intrinsic
    def wgmma_acc_zeros(typingctx, n):
        v = _literal(n)
        if v is None:
            return None
        try:
            _check_acc_n(v, "wgmma_acc_zeros")
        except ValueError as e:
            raise _TypingError(str(e))
        ret = _types.UniTuple(_types.float32, v // 2)

        def codegen(context, builder, signature, args):
            return context.make_tuple(builder, ret, [_ir.Constant(_F32, 0.0)] * (v // 2))

        return ret(n), codegen

    @_intrinsic
    def wgmma_acc_load(typingctx, arr, start, n):
        v = _literal(n)
        if v is None or not (_is_array(arr) and _is_int(start) and isinstance(arr.dtype, _types.Number)):
            return None
        try:
            _check_acc_n(v, "wgmma_acc_load")
        except ValueError as e:
            raise _TypingError(str(e))
        ret = _types.UniTuple(_types.float32, v // 2)

        def codegen(context, builder, signature, args):
            t = signature.args
            ary = context.make_array(t[0])(context, builder, args[0])
            i0 = _to(context, builder, args[1], t[1], _types.intp)
            vals = [_to(context, builder, builder.load(builder.gep(ary.data, [builder.add(i0, _ir.Constant(_I64, j))])),
                        t[0].dtype, _types.float32) for j in range(v // 2)]
            return context.make_tuple(builder, ret, vals)

        return ret(arr, start, n), codegen

    @_intrinsic
    def wgmma_acc_store(typingctx, arr, start, acc):
        nacc = _nacc(acc)
        if nacc is None or not (_is_array(arr) and _is_int(start) and isinstance(arr.dtype, _types.Number)):
            return None

        def codegen(context, builder, signature, args):
            t = signature.args
            ary = context.make_array(t[0])(context, builder, args[0])
            i0 = _to(context, builder, args[1], t[1], _types.intp)
            for j, x in enumerate(_unpack(builder, args[2], nacc)):
                p = builder.gep(ary.data, [builder.add(i0, _ir.Constant(_I64, j))])
                builder.store(_to(context, builder, x, _types.float32, t[0].dtype), p)
            return context.get_dummy_value()

        return _types.void(arr, start, acc), codegen

    # --- mbarrier, cp.async.bulk ---

    def _bar_addr(context, builder, t, args):
        return _shared_addr(context, builder, t[0], args[0], t[1], args[1])

    @_intrinsic
    def mbarrier_init(typingctx, bars, idx, count):
        if not (_is_array(bars) and _is_int(idx) and _is_int(count)):
            return None

        def codegen(context, builder, signature, args):
            t = signature.args
            c = builder.trunc(_to(context, builder, args[2], t[2], _types.int64), _I32)
            _asm(builder, _ir.VoidType(), [_I32, _I32], "mbarrier.init.shared::cta.b64 [$0], $1;",
                 "r,r,~{memory}", [_bar_addr(context, builder, t, args), c], side_effect=True)
            return context.get_dummy_value()

        return _types.void(bars, idx, count), codegen

    fence_mbarrier_init = _void_op("fence.mbarrier_init.release.cluster;")

    @_intrinsic
    def mbarrier_arrive(typingctx, bars, idx):
        if not (_is_array(bars) and _is_int(idx)):
            return None

        def codegen(context, builder, signature, args):
            _asm(builder, _ir.VoidType(), [_I32],
                 "{ .reg .b64 st; mbarrier.arrive.shared::cta.b64 st, [$0]; }", "r,~{memory}",
                 [_bar_addr(context, builder, signature.args, args)], side_effect=True)
            return context.get_dummy_value()

        return _types.void(bars, idx), codegen

    def _make_tx_op(text):
        @_intrinsic
        def op(typingctx, bars, idx, tx_bytes):
            if not (_is_array(bars) and _is_int(idx) and _is_int(tx_bytes)):
                return None

            def codegen(context, builder, signature, args):
                t = signature.args
                tx = builder.trunc(_to(context, builder, args[2], t[2], _types.int64), _I32)
                _asm(builder, _ir.VoidType(), [_I32, _I32], text, "r,r,~{memory}",
                     [_bar_addr(context, builder, t, args), tx], side_effect=True)
                return context.get_dummy_value()

            return _types.void(bars, idx, tx_bytes), codegen
        return op

    mbarrier_arrive_expect_tx = _make_tx_op(
        "{ .reg .b64 st; mbarrier.arrive.expect_tx.shared::cta.b64 st, [$0], $1; }")
    mbarrier_expect_tx = _make_tx_op("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [$0], $1;")

    @_intrinsic
    def mbarrier_try_wait_parity(typingctx, bars, idx, parity):
        if not (_is_array(bars) and _is_int(idx) and _is_int(parity)):
            return None
        text = ("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [$1], $2; "
                "selp.u32 $0, 1, 0, p; }")

        def codegen(context, builder, signature, args):
            t = signature.args
            par = builder.trunc(_to(context, builder, args[2], t[2], _types.int64), _I32)
            r = _asm(builder, _I32, [_I32, _I32], text, "=r,r,r,~{memory}",
                     [_bar_addr(context, builder, t, args), par], side_effect=True)
            return builder.icmp_unsigned("!=", r, _ir.Constant(_I32, 0))

        return _types.boolean(bars, idx, parity), codegen

    @_intrinsic
    def mbarrier_wait_parity(typingctx, bars, idx, parity):
        if not (_is_array(bars) and _is_int(idx) and _is_int(parity)):
            return None
        # labels are local to the { } scope, so the loop can be inlined any number of times
        text = ("{ .reg .pred p; WAIT_PARITY: mbarrier.try_wait.parity.shared::cta.b64 p, [$0], $1; "
                "@!p bra WAIT_PARITY; }")

        def codegen(context, builder, signature, args):
            t = signature.args
            par = builder.trunc(_to(context, builder, args[2], t[2], _types.int64), _I32)
            _asm(builder, _ir.VoidType(), [_I32, _I32], text, "r,r,~{memory}",
                 [_bar_addr(context, builder, t, args), par], side_effect=True)
            return context.get_dummy_value()

        return _types.void(bars, idx, parity), codegen

    @_intrinsic
    def cp_async_bulk_g2s(typingctx, sarr, s_byte_offset, garr, g_elem_index, nbytes, bars, bar_idx):
        if not (_is_array(sarr) and _is_int(s_byte_offset) and _is_array(garr) and _is_int(g_elem_index)
                and _is_int(nbytes) and _is_array(bars) and _is_int(bar_idx)):
            return None
        # a CTA's own shared::cta addresses are valid shared::cluster addresses
        text = "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [$0], [$1], $2, [$3];"

        def codegen(context, builder, signature, args):
            t = signature.args
            dst = _shared_addr(context, builder, t[0], args[0], _types.intp, _ir.Constant(_I64, 0))
            dst = builder.add(dst, builder.trunc(_to(context, builder, args[1], t[1], _types.int64), _I32))
            src = _global_ptr(context, builder, t[2], args[2], t[3], args[3])
            size = builder.trunc(_to(context, builder, args[4], t[4], _types.int64), _I32)
            bar = _shared_addr(context, builder, t[5], args[5], t[6], args[6])
            _asm(builder, _ir.VoidType(), [_I32, src.type, _I32, _I32], text, "r,l,r,r,~{memory}",
                 [dst, src, size, bar], side_effect=True)
            return context.get_dummy_value()

        return _types.void(sarr, s_byte_offset, garr, g_elem_index, nbytes, bars, bar_idx), codegen

    @_intrinsic
    def tma_load_4d(typingctx, sarr, s_byte_offset, maps, map_idx, garr, c0, c1, c2, c3, bars, bar_idx):
        if not (_is_array(sarr) and _is_int(s_byte_offset) and _is_array(maps) and _is_int(map_idx)
                and _is_array(garr) and all(_is_int(c) for c in (c0, c1, c2, c3)) and _is_array(bars)
                and _is_int(bar_idx)):
            return None
        text = ("cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
                "[$0], [$1, {$2, $3, $4, $5}], [$6];")

        def codegen(context, builder, signature, args):
            t = signature.args
            dst = _shared_addr(context, builder, t[0], args[0], _types.intp, _ir.Constant(_I64, 0))
            dst = builder.add(dst, builder.trunc(_to(context, builder, args[1], t[1], _types.int64), _I32))
            word = builder.mul(_to(context, builder, args[3], t[3], _types.int64), _ir.Constant(_I64, TMAP_WORDS))
            tmap = builder.ptrtoint(_elem_ptr(context, builder, t[2], args[2], _types.int64, word), _I64)
            cs = [builder.trunc(_to(context, builder, args[k], t[k], _types.int64), _I32) for k in range(5, 9)]
            bar = _shared_addr(context, builder, t[9], args[9], t[10], args[10])
            _asm(builder, _ir.VoidType(), [_I32, _I64, _I32, _I32, _I32, _I32, _I32], text,
                 "r,l,r,r,r,r,r,~{memory}", [dst, tmap, *cs, bar], side_effect=True)
            return context.get_dummy_value()

        return _types.void(sarr, s_byte_offset, maps, map_idx, garr, c0, c1, c2, c3, bars, bar_idx), codegen

    @_intrinsic
    def bulk_reduce_add_f32(typingctx, garr, g_elem_index, sarr, s_byte_offset, nbytes):
        if not (_is_array(garr) and _is_int(g_elem_index) and _is_array(sarr) and _is_int(s_byte_offset)
                and _is_int(nbytes)):
            return None
        if garr.dtype != _types.float32:
            raise _TypingError(f"bulk_reduce_add_f32: needs a float32 global array, got {garr.dtype}")
        text = "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [$0], [$1], $2;"

        def codegen(context, builder, signature, args):
            t = signature.args
            dst = _global_ptr(context, builder, t[0], args[0], t[1], args[1])
            src = _shared_addr(context, builder, t[2], args[2], _types.intp, _ir.Constant(_I64, 0))
            src = builder.add(src, builder.trunc(_to(context, builder, args[3], t[3], _types.int64), _I32))
            size = builder.trunc(_to(context, builder, args[4], t[4], _types.int64), _I32)
            _asm(builder, _ir.VoidType(), [dst.type, _I32, _I32], text, "l,r,r,~{memory}", [dst, src, size],
                 side_effect=True)
            return context.get_dummy_value()

        return _types.void(garr, g_elem_index, sarr, s_byte_offset, nbytes), codegen

    bulk_commit_group = _void_op("cp.async.bulk.commit_group;")
    bulk_wait_group_read = _literal_op("bulk_wait_group_read", "cp.async.bulk.wait_group.read {};", _check_wait_n)
    bulk_wait_group = _literal_op("bulk_wait_group", "cp.async.bulk.wait_group {};", _check_wait_n)

    def _make_named(name, op):
        @_intrinsic
        def bar(typingctx, idx, nthreads):
            if not (_is_int(idx) and _is_int(nthreads)):
                return None
            lit_i, lit_n = _literal(idx), _literal(nthreads)
            try:
                if lit_i is not None:
                    _check_named(lit_i, 32, None, name)
                if lit_n is not None:
                    _check_named(1, lit_n, None, name)
            except ValueError as e:
                raise _TypingError(str(e))

            def codegen(context, builder, signature, args):
                t = signature.args
                i = builder.trunc(_to(context, builder, args[0], t[0], _types.int64), _I32)
                n = builder.trunc(_to(context, builder, args[1], t[1], _types.int64), _I32)
                _asm(builder, _ir.VoidType(), [_I32, _I32], f"{op} $0, $1;", "r,r,~{memory}", [i, n],
                     side_effect=True, attrs=_COLLECTIVE)
                return context.get_dummy_value()

            return _types.void(idx, nthreads), codegen
        return bar

    named_barrier_sync = _make_named("named_barrier_sync", "bar.sync")
    named_barrier_arrive = _make_named("named_barrier_arrive", "bar.arrive")
