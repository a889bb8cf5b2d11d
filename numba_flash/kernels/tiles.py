"""A plan's TileOps for one kernel role, from the plan's path."""
from .simt_tiles import make_simt_ops


def make_ops(plan, role):
    t = getattr(plan, role)
    if plan.path == "simt":
        return make_simt_ops(role, t, plan.headdim, plan.dtype, plan.aligned)
    if plan.path == "tf32":
        assert role == "fwd", ("the tf32 path is forward only (configs.backward_path)", role)
        from .tf32_tiles import make_tf32_fwd_ops
        return make_tf32_fwd_ops(t, plan.headdim, plan.aligned)
    fused = role == "dkdv" and plan.dq_mode != "kernel"
    if plan.path == "wgmma":
        from .wgmma_tiles import make_wgmma_ops
        return make_wgmma_ops(role, t, plan.headdim, plan.dtype, plan.aligned, plan.dq_mode if fused else False)
    from .tc_tiles import make_tc_ops
    return make_tc_ops(role, t, plan.headdim, plan.dtype, plan.aligned, fused, fused and plan.vector_red)
