"""Warp-collective operations under Numba's CUDA simulator.

The simulator runs every CUDA thread of a block as a Python thread and has no notion of a warp, so the
warp-level instructions of `ptx` (shuffles, `mma.sync`, `ldmatrix`) are emulated here: each lane deposits
its operands, the lanes of the warp meet at a barrier, and then every lane computes its own result from
all the deposits (`exchange`). Warps are numbered as on the GPU: linear thread id // 32, lane = id % 32;
the last warp of a block whose size is not a multiple of 32 has fewer lanes, and its barrier waits for
exactly those.

Nothing here is imported on a GPU.
"""
import os
import threading
import time

WARP_SIZE = 32

# A lane that never reaches a collective its warp waits at is a kernel bug (a warp-collective call in
# divergent code). The common cases are detected within a few polls (the lane exited) or about a second
# (it waits at syncthreads); this timeout is the last resort, so that a test run cannot hang.
TIMEOUT_S = float(os.environ.get("NUMBA_FLASH_SIMWARP_TIMEOUT", "120"))
_POLL_S = 0.05      # how often a waiting lane looks at its abort flag and at the missing lanes

_ATTR = "_numba_flash_warps"
_attach_lock = threading.Lock()


class _Warp:
    """The exchange of one warp of one block: two slot sets, a per-lane collective counter, a barrier."""

    def __init__(self, manager, index, nlanes):
        self.manager = manager
        self.block_dim = tuple(manager._block_dim)
        self.nthreads = self.block_dim[0] * self.block_dim[1] * self.block_dim[2]
        self.index = index
        self.nlanes = nlanes
        self.cond = threading.Condition(threading.Lock())
        self.arrived = 0
        self.generation = 0
        # Double buffering: collective number k of the warp uses slot set k % 2, so one barrier per
        # collective suffices. After barrier k a lane reads set k % 2; the next time any lane writes that
        # set is collective k + 2, and it can only get there by passing barrier k + 1, which every lane
        # must reach first, i.e. after it has finished reading set k % 2 (a lane reads collective k's
        # operands before it starts collective k + 1, in its own program order). Collective k + 1 writes
        # the other set, so a fast lane depositing for k + 1 never overwrites operands still being read.
        self.slots = ([None] * nlanes, [None] * nlanes)
        self.scratch = [{}, {}]     # per collective, for results derived once from all the operands
        self.count = [0] * nlanes   # collectives entered, per lane; each entry written by its lane only

    def barrier(self, thread):
        """Wait until all lanes of the warp have called barrier (for the current collective)."""
        with self.cond:
            gen = self.generation
            self.arrived += 1
            if self.arrived == self.nlanes:
                # Last to arrive: every lane has finished with set (gen + 1) % 2's previous collective
                # (gen - 1), so its scratch can start afresh for collective gen + 1.
                self.arrived = 0
                self.generation = gen + 1
                self.scratch[(gen + 1) & 1] = {}
                self.cond.notify_all()
                return
            watch = None
            while self.generation == gen:
                if not self.cond.wait(_POLL_S):     # woken by notify_all in the common path
                    watch = watch or _Watch()
                    self._check(thread, gen, watch)

    def _check(self, thread, gen, watch):
        """Slow path, after a poll interval without the barrier completing (called holding the lock)."""
        if thread.abort:
            raise RuntimeError("abort flag set while waiting at a warp collective")
        where = f"warp {self.index} of block {tuple(thread.blockIdx)}"
        # Every lane makes exactly one barrier call per collective, so collective number `gen` is
        # barrier generation `gen`: the lanes that have not entered it are those with count <= gen.
        base = self.index * WARP_SIZE
        missing = [lane for lane in range(self.nlanes) if self.count[lane] <= gen]
        alive = {t.thread_id: t for t in threading.enumerate()
                 if getattr(t, "_manager", None) is self.manager}
        # A missing lane that is not alive either exited or has not been started yet. The BlockManager
        # starts threads one at a time (Thread.start returns once the thread runs) in np.ndindex order of
        # threadIdx, so a lane started before any thread known to have started has exited.
        started = [self._start_order(tid) for tid in alive]
        started += [self._start_order(base + lane) for lane in range(self.nlanes) if self.count[lane] > gen]
        latest = max(started)
        exited = [lane for lane in missing
                  if base + lane not in alive and self._start_order(base + lane) < latest]
        # Reported from the second poll on: a lane that died of an exception is the BlockManager's to
        # report (it aborts the block as soon as it sees the exception), with the more useful message.
        seen, watch.exited = watch.exited, exited
        if exited and seen:
            raise RuntimeError(f"{where}: lanes {exited} exited without reaching the warp collective "
                               f"(a warp-collective call in divergent code)")
        # A lane blocked in syncthreads cannot be released while lanes wait here (the block barrier needs
        # them too). The flag is cleared by the BlockManager some time after it releases a barrier, so a
        # lane counts only once seen blocked at every poll for a while (longer in larger blocks, whose
        # releases take longer under the GIL).
        now = time.monotonic()
        blocked = [lane for lane in missing if base + lane in alive and alive[base + lane].syncthreads_blocked]
        watch.blocked = {lane: watch.blocked.get(lane, now) for lane in blocked}
        hold = 1.0 + 0.01 * self.nthreads
        stuck = sorted(lane for lane, since in watch.blocked.items() if now - since > hold)
        if stuck:
            raise RuntimeError(f"{where}: lanes {stuck} wait at syncthreads while the others wait at a "
                               f"warp collective (deadlock)")
        if now - watch.start > TIMEOUT_S:
            raise RuntimeError(f"{where}: lanes {missing} did not reach the warp collective within "
                               f"{TIMEOUT_S:g} s (NUMBA_FLASH_SIMWARP_TIMEOUT)")

    def _start_order(self, tid):
        """Position of linear thread id `tid` in the BlockManager's start order (np.ndindex(x, y, z))."""
        bx, by, bz = self.block_dim
        x, y, z = tid % bx, tid // bx % by, tid // (bx * by)
        return (x * by + y) * bz + z


class _Watch:
    """What one waiting lane has seen so far, across its polls of one barrier."""

    def __init__(self):
        self.start = time.monotonic() - _POLL_S
        self.blocked = {}     # lane -> when first seen blocked in syncthreads (continuously since)
        self.exited = []      # lanes seen exited at the previous poll


def _block_warps(thread):
    manager = getattr(thread, "_manager", None)
    if manager is None:
        raise RuntimeError("warp-collective operations can only run inside a simulated CUDA kernel")
    warps = getattr(manager, _ATTR, None)
    if warps is None:
        with _attach_lock:
            warps = getattr(manager, _ATTR, None)
            if warps is None:
                dim = manager._block_dim
                nthreads = dim[0] * dim[1] * dim[2]
                warps = [_Warp(manager, w, min(WARP_SIZE, nthreads - w * WARP_SIZE))
                         for w in range((nthreads + WARP_SIZE - 1) // WARP_SIZE)]
                setattr(manager, _ATTR, warps)
    return warps


def lane_id():
    """The calling simulated thread's lane (what cuda.laneid gives inside a kernel)."""
    return threading.current_thread().thread_id % WARP_SIZE


def exchange(value, full_warp=False):
    """Deposit this lane's `value`, wait for the whole warp; return (lane, deposits, scratch).

    deposits: everyone's values, indexed by lane. scratch: a dict the warp's lanes share for this
    collective only, to compute something from all the deposits once (dict.setdefault is atomic).
    Both are only valid until this lane's next collective (see _Warp).
    full_warp: the instruction needs 32 lanes (mma, ldmatrix); a smaller last warp is an error.
    """
    thread = threading.current_thread()
    warps = _block_warps(thread)
    tid = thread.thread_id
    warp = warps[tid // WARP_SIZE]
    lane = tid % WARP_SIZE
    if full_warp and warp.nlanes != WARP_SIZE:
        raise RuntimeError(f"this warp-collective instruction needs a full warp; warp {warp.index} has "
                           f"{warp.nlanes} threads")
    k = warp.count[lane]
    slots = warp.slots[k & 1]
    slots[lane] = value
    warp.count[lane] = k + 1
    warp.barrier(thread)
    return lane, slots, warp.scratch[k & 1]
