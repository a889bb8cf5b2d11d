"""A plan's TileOps for one kernel role, from the plan's path."""
import os

from .simt_tiles import make_simt_ops


def make_ops(plan, role):
    t = getattr(plan, role)
    if plan.path == "simt":
        return make_simt_ops(role, t, plan.headdim, plan.dtype, plan.aligned)
    if plan.path == "wgmma":
        from .wgmma_tiles import make_wgmma_ops
        # NUMBA_FLASH_WGMMA_SYNC=1 (tuning runs only): the synchronous products instead of the pipelined body
        sync = os.environ.get("NUMBA_FLASH_WGMMA_SYNC", "") == "1"
        return make_wgmma_ops(role, t, plan.headdim, plan.dtype, plan.aligned, not sync)
    from .tc_tiles import make_tc_ops
    fused = role == "dkdv" and plan.dq_mode == "atomic"
    return make_tc_ops(role, t, plan.headdim, plan.dtype, plan.aligned, fused, fused and plan.vector_red)
