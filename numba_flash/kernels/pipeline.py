"""The streaming protocol every kernel body uses: how a streamed tile gets into shared memory.

One stage (SIMT): a barrier (every thread is done with the previous tile), the synchronous load of the
current tile, a barrier (the tile is complete). Two stages (tensor cores): the current tile was copied
asynchronously while the previous one was computed; wait for this thread's copies, a barrier (everyone's
copies have landed, and everyone is done with the other buffer), then start copying the next tile into
the other buffer. Either way, one streamed tile is complete and no thread writes it while it is read.

Where one thread copies the streamed tiles by TMA (TileOps.landed: the wgmma backward with MmaTiles.tma),
each buffer has an mbarrier that completes when its tile's bytes have landed: every thread waits for the
current buffer's phase before the barrier. A body tracks that phase beside the buffer index: (stage, phase)
steps (0, 0), (1, 0), (0, 1), (1, 1), ... (`stage, phase = 1 - stage, phase ^ stage`).
"""
from functools import lru_cache

from numba import cuda

from .launch import inline_device


@inline_device
def _no_init(operands, tid):
    return


@inline_device
def _no_wait(operands, stage, phase):
    return


@lru_cache(maxsize=None)
def make_pipeline(ops):
    stages, stream, commit, wait_all = ops.stages, ops.stream, ops.commit, ops.wait_all
    init = ops.stream_init or _no_init
    landed = ops.landed or _no_wait
    assert stages in (1, 2)
    assert stages == 2 or ops.landed is None

    @inline_device
    def begin(smem, has_first, t0, n_other, operands, tid):
        """Before the loop: start copying the first tile (two stages). Always one commit, so the resident
        operands' copies are exactly the older group when `resident_ready` waits for them."""
        if stages == 2:
            init(operands, tid)
            if has_first:
                stream(smem, 0, t0, n_other, operands, tid)
            commit()
        return

    @inline_device
    def acquire(smem, stage, phase, t0, has_next, t_next, n_other, operands, tid):
        """Make tile t0 (in buffer `stage`, its copy's phase parity `phase`) complete; with two stages,
        start the next one (t_next)."""
        if stages == 2:
            wait_all()
            landed(operands, stage, phase)
            cuda.syncthreads()
            if has_next:
                stream(smem, 1 - stage, t_next, n_other, operands, tid)
            commit()
        else:
            cuda.syncthreads()
            stream(smem, 0, t0, n_other, operands, tid)
            cuda.syncthreads()
        return

    return begin, acquire
