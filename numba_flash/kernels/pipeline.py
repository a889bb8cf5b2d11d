"""The streaming protocol every kernel body uses: how a streamed tile gets into shared memory.

One stage (SIMT): a barrier (every thread is done with the previous tile), the synchronous load of the
current tile, a barrier (the tile is complete). Two stages (tensor cores): the current tile was copied
asynchronously while the previous one was computed; wait for this thread's copies, a barrier (everyone's
copies have landed, and everyone is done with the other buffer), then start copying the next tile into
the other buffer. Either way, one streamed tile is complete and no thread writes it while it is read.
"""
from functools import lru_cache

from numba import cuda

from .launch import inline_device


@lru_cache(maxsize=None)
def make_pipeline(ops):
    stages, stream, commit, wait_all = ops.stages, ops.stream, ops.commit, ops.wait_all
    assert stages in (1, 2)

    @inline_device
    def begin(smem, has_first, t0, n_other, operands, tid):
        """Before the loop: start copying the first tile (two stages). Always one commit, so the resident
        operands' copies are exactly the older group when `resident_ready` waits for them."""
        if stages == 2:
            if has_first:
                stream(smem, 0, t0, n_other, operands, tid)
            commit()
        return

    @inline_device
    def acquire(smem, stage, t0, has_next, t_next, n_other, operands, tid):
        """Make tile t0 (in buffer `stage`) complete; with two stages, start the next one (t_next)."""
        if stages == 2:
            wait_all()
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
