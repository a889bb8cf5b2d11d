"""Warp-collective operations under Numba's CUDA simulator.

The simulator runs every CUDA thread of a block as a Python thread and has no notion of a warp, so the
warp-level instructions of `ptx` (shuffles, `mma.sync`, `ldmatrix`) are emulated here: each lane deposits
its operands, the lanes of the warp meet at a barrier, and then every lane computes its own result from
all the deposits (`exchange`). Warps are numbered as on the GPU: linear thread id // 32, lane = id % 32;
the last warp of a block whose size is not a multiple of 32 has fewer lanes, and its barrier waits for
exactly those.

Hopper's warpgroup-collective instructions (`hopper.wgmma_*`: 4 consecutive warps, linear thread id // 128)
meet the same way through `exchange_group(value, WARPGROUP_SIZE)`: the machinery is the same for any group
of consecutive threads, only the group size differs.

Nothing here is imported on a GPU.
"""
import os
import threading
import time

WARP_SIZE = 32
WARPGROUP_SIZE = 128

# A lane that never reaches a collective its warp waits at is a kernel bug (a warp-collective call in
# divergent code). The common cases are detected within a few polls (the lane exited) or about a second
# (it waits at syncthreads); this timeout is the last resort, so that a test run cannot hang.
TIMEOUT_S = float(os.environ.get("NUMBA_FLASH_SIMWARP_TIMEOUT", "120"))
_POLL_S = 0.05      # how often the watching lane looks at its abort flag and at the missing lanes
# How often the other waiting lanes look at their abort flag and the watcher's verdict. Long: with 128
# lanes polling every _POLL_S, their wake-ups alone (each a GIL hand-off) slowed a warpgroup collective
# several-fold.
_IDLE_POLL_S = 1.0

_ATTR = "_numba_flash_warps"
_ERROR = "_numba_flash_error"
_attach_lock = threading.Lock()


class _Warp:
    """The exchange of one warp of one block: two slot sets, a per-lane collective counter, a barrier.

    The same for any group of `size` consecutive threads (a warpgroup: size 128); "lane" is then the
    thread's rank in its group."""

    def __init__(self, manager, index, nlanes, size=WARP_SIZE):
        self.manager = manager
        self.size = size
        self.what = "warp" if size == WARP_SIZE else ("warpgroup" if size == WARPGROUP_SIZE
                                                      else f"{size}-thread group")
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
        self.failed = None          # (generation, message) of the collective the watching lane gave up on

    def barrier(self, thread, complete=None):
        """Wait until all lanes of the warp have called barrier (for the current collective). complete:
        run by the last lane to arrive, before any lane is released, with the collective's scratch."""
        with self.cond:
            gen = self.generation
            self.arrived += 1
            if self.arrived == self.nlanes:
                if complete is not None:
                    # Here rather than in the released lanes: woken together, every one of them would find
                    # no result yet, and making them queue for it costs a GIL hand-off per lane.
                    try:
                        complete(self.scratch[gen & 1])
                    except Exception as exc:     # every lane raises it once released
                        self.scratch[gen & 1][_ERROR] = exc
                # Last to arrive: every lane has finished with set (gen + 1) % 2's previous collective
                # (gen - 1), so its scratch can start afresh for collective gen + 1.
                self.arrived = 0
                self.generation = gen + 1
                self.scratch[(gen + 1) & 1] = {}
                self.cond.notify_all()
                return
            # The first lane to wait watches for the kernel bugs _check detects; the others wait for the
            # release, or for the watcher's verdict (notified, so they fail as fast as it does).
            watcher = self.arrived == 1
            watch = None
            while True:
                notified = self.cond.wait(_POLL_S if watcher else _IDLE_POLL_S)
                if self.generation != gen:
                    return
                if self.failed is not None and self.failed[0] == gen:
                    raise RuntimeError(self.failed[1])
                if notified:
                    continue
                if not watcher:
                    if thread.abort:
                        raise RuntimeError(f"abort flag set while waiting at a {self.what} collective")
                    continue
                watch = watch or _Watch()
                try:
                    self._check(thread, gen, watch)     # raises on abort too
                except Exception as exc:                # (a lane's own exception: _raise_lane_exception)
                    self.failed = (gen, str(exc))
                    self.cond.notify_all()
                    raise

    def _check(self, thread, gen, watch):
        """Slow path, after a poll interval without the barrier completing (called holding the lock)."""
        if thread.abort:
            raise RuntimeError(f"abort flag set while waiting at a {self.what} collective")
        where = f"{self.what} {self.index} of block {tuple(thread.blockIdx)}"
        # Every lane makes exactly one barrier call per collective, so collective number `gen` is
        # barrier generation `gen`: the lanes that have not entered it are those with count <= gen.
        base = self.index * self.size
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
        # Lanes started after every live thread (the upper lanes of the block's last warp or warpgroup)
        # cannot be told from lanes not started yet that way. The BlockManager starts all threads right
        # away, so one that stays absent for a while (the hold below) has exited too.
        now = time.monotonic()
        hold = 1.0 + 0.01 * self.nthreads
        absent = [lane for lane in missing if base + lane not in alive]
        watch.absent = {lane: watch.absent.get(lane, now) for lane in absent}
        exited = sorted(set(exited) | {lane for lane in absent if now - watch.absent[lane] > hold})
        # Reported from the second poll on: a lane that died of an exception is the BlockManager's to
        # report (it aborts the block as soon as it sees the exception), with the more useful message.
        seen, watch.exited = watch.exited, exited
        if exited:
            _raise_lane_exception(self.manager, [base + lane for lane in exited])
        if exited and seen:
            raise RuntimeError(f"{where}: lanes {exited} exited without reaching the {self.what} collective "
                               f"(a {self.what}-collective call in divergent code)")
        # A lane blocked in syncthreads cannot be released while lanes wait here (the block barrier needs
        # them too). The flag is cleared by the BlockManager some time after it releases a barrier, so a
        # lane counts only once seen blocked at every poll for a while (longer in larger blocks, whose
        # releases take longer under the GIL).
        blocked = [lane for lane in missing if base + lane in alive and alive[base + lane].syncthreads_blocked]
        watch.blocked = {lane: watch.blocked.get(lane, now) for lane in blocked}
        stuck = sorted(lane for lane, since in watch.blocked.items() if now - since > hold)
        if stuck:
            raise RuntimeError(f"{where}: lanes {stuck} wait at syncthreads while the others wait at a "
                               f"{self.what} collective (deadlock)")
        if now - watch.start > TIMEOUT_S:
            raise RuntimeError(f"{where}: lanes {missing} did not reach the {self.what} collective within "
                               f"{TIMEOUT_S:g} s (NUMBA_FLASH_SIMWARP_TIMEOUT)")

    def _start_order(self, tid):
        """Position of linear thread id `tid` in the BlockManager's start order (np.ndindex(x, y, z))."""
        bx, by, bz = self.block_dim
        x, y, z = tid % bx, tid // bx % by, tid // (bx * by)
        return (x * by + y) * bz + z


def _raise_lane_exception(manager, tids=None):
    """Raise the exception that one of the block's threads `tids` (exited; None: any) died of, if one did.

    The BlockManager reports a thread's exception when its polling loop sees it, but a thread that dies
    between that check and the loop's liveness filter is dropped from the loop, and its exception waits
    until every other thread has finished: the lanes waiting here for it would then report it as a
    divergent exit, hiding the real error (a loaded machine makes that window common). The manager's
    threads, dead ones included, are a local of its run() frame, found through the interpreter's frames;
    where numba's simulator is laid out differently, nothing is raised here."""
    import sys
    for frame in list(sys._current_frames().values()):
        f = frame
        while f is not None and not (f.f_code.co_name == "run" and f.f_locals.get("self") is manager):
            f = f.f_back
        threads = f.f_locals.get("threads") if f is not None else None
        if not threads:
            continue
        for t in list(threads):
            exc = getattr(t, "exception", None)
            if exc and (tids is None or getattr(t, "thread_id", None) in tids):
                raise exc[0].with_traceback(exc[1])
        return


class _Watch:
    """What one waiting lane has seen so far, across its polls of one barrier."""

    def __init__(self):
        self.start = time.monotonic() - _POLL_S
        self.blocked = {}     # lane -> when first seen blocked in syncthreads (continuously since)
        self.exited = []      # lanes seen exited at the previous poll
        self.absent = {}      # lane -> when first seen neither alive nor in the collective (continuously since)


def _block_warps(thread, size=WARP_SIZE):
    """The groups of `size` consecutive threads (warps by default) of the calling thread's block."""
    manager = getattr(thread, "_manager", None)
    if manager is None:
        raise RuntimeError("warp-collective operations can only run inside a simulated CUDA kernel")
    attr = _ATTR if size == WARP_SIZE else f"{_ATTR}_{size}"
    warps = getattr(manager, attr, None)
    if warps is None:
        with _attach_lock:
            warps = getattr(manager, attr, None)
            if warps is None:
                dim = manager._block_dim
                nthreads = dim[0] * dim[1] * dim[2]
                warps = [_Warp(manager, w, min(size, nthreads - w * size), size)
                         for w in range((nthreads + size - 1) // size)]
                setattr(manager, attr, warps)
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
    return exchange_group(value, WARP_SIZE, full_warp)


def exchange_group(value, size, full=False, combine=None):
    """`exchange` among the group of `size` consecutive threads (linear id // size) the caller is in:
    returns (rank in the group, deposits indexed by rank, scratch). full: the instruction needs all
    `size` threads (a warpgroup MMA); a smaller last group is an error. Collectives of different group
    sizes are counted separately: a warp's shuffles and its warpgroup's wgmma do not pair up.
    combine: a function of the deposits computed once, by the last thread to arrive, before the others are
    released; its result is scratch["combined"]. An exception it raises is raised in every thread."""
    thread = threading.current_thread()
    warps = _block_warps(thread, size)
    tid = thread.thread_id
    warp = warps[tid // size]
    lane = tid % size
    if full and warp.nlanes != size:
        raise RuntimeError(f"this {warp.what}-collective instruction needs a full {warp.what}; "
                           f"{warp.what} {warp.index} has {warp.nlanes} threads")
    k = warp.count[lane]
    slots = warp.slots[k & 1]
    slots[lane] = value
    warp.count[lane] = k + 1
    if combine is None:
        warp.barrier(thread)
        return lane, slots, warp.scratch[k & 1]

    def complete(scratch):
        scratch["combined"] = combine(slots)

    warp.barrier(thread, complete)
    scratch = warp.scratch[k & 1]
    exc = scratch.get(_ERROR)
    if exc is not None:
        if lane == 0:
            raise exc
        # the others raise a copy, with the same message: one exception object raised in 128 threads at once
        # would have its traceback rewritten by each
        raise RuntimeError(f"{warp.what} {warp.index}: {type(exc).__name__}: {exc}") from None
    return lane, slots, scratch
