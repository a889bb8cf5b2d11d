"""The warpgroup path (backend="wgmma": Hopper wgmma, float16 / bfloat16) against the float64 reference.

Its forward and backward kernels run on wgmma (past head dim 128 the backward runs the mma.sync kernels,
configs.backward_path). The tolerance is test_tensor_cores': at most twice the error of PyTorch's own
attention in the same dtype, plus 1e-5. Under the simulator every kernel has one warpgroup (64 resident
rows: queries, or keys in dK/dV) and 32 streamed rows (hopper.py's wgmma twin reads the swizzled
shared-memory image through the descriptors), so the lengths here give ragged query and key tiles; head
dims 16, 32, 48 and 64 take the 32-, 64-, 32- and 128-byte swizzles. Outputs and gradients are
NaN-poisoned.
"""
import numpy as np
import pytest

import numba_flash as nf
from numba_flash import BlockMask
from conftest import (SIMULATOR, as64, assert_bitwise_equal, assert_lse_close, block_sizes, copy,
                      gpu_capability, make_qkv_arrays, poison, random_array, rel_err)
from test_tensor_cores import FW, assert_within_budget, check_all, run_mma, torch_lowp

pytestmark = pytest.mark.skipif(not SIMULATOR and gpu_capability() != (9, 0),
                                reason=f"wgmma is an sm_90a instruction; this GPU is cc {gpu_capability()}")


def run_wgmma(q, k, v, dtype, **kw):
    B, Nq, H, d = q.shape
    out, lse = poison((B, Nq, H, d), dtype, FW), poison((B, H, Nq), "float32", FW)
    nf.flash_attn_forward(q, k, v, out=out, lse=lse, backend="wgmma", **kw)
    return out, lse


def check_sparse(q, k, v, dout, dtype, mask):
    """Forward and backward with a block mask against the references with its dense mask."""
    out, lse, grads = run_mma(q, k, v, dout, dtype, backend="wgmma", block_mask=mask)
    dense = mask.to_dense()
    ref_out, ref_lse = nf.attention_reference(q, k, v, mask=dense)
    ref_grads = nf.attention_reference_backward(dout, q, k, v, mask=dense)
    theirs = torch_lowp(q, k, v, dout, dtype, mask=dense)
    assert_lse_close(lse, ref_lse, dtype)
    for name, ours, ref, th in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads), theirs):
        assert_within_budget(name, ours, ref, th)


@pytest.mark.parametrize("dtype,causal,Nq,Nk,d", [
    ("float16", False, 96, 80, 32), ("bfloat16", True, 70, 100, 64), ("float16", True, 100, 40, 16),
    ("bfloat16", False, 65, 33, 48)])
def test_wgmma_forward_backward_within_twice_torch_error_ragged_unequal_seqlens_and_swizzles(rng, dtype, causal,
                                                                                            Nq, Nk, d):
    q, k, v = make_qkv_arrays(rng, 1, Nq, Nk, 1, d, dtype, FW)
    dout = random_array(rng, (1, Nq, 1, d), dtype, FW)
    out, lse, (dq, dk, dv) = check_all(q, k, v, dout, dtype, backend="wgmma", causal=causal)
    if causal and Nq > Nk:                 # bottom-right: rows r < Nq - Nk see no key
        assert (as64(out)[:, :Nq - Nk] == 0).all() and np.isneginf(as64(lse)[:, :, :Nq - Nk]).all()
        assert (as64(dq)[:, :Nq - Nk] == 0).all()


@pytest.mark.parametrize("layout", ["qkvpacked", "unaligned"])
def test_wgmma_strided_and_unaligned_views_match_contiguous_copies_bitwise_and_deterministically(rng, layout):
    """A packed view gives bitwise its contiguous copy's outputs and gradients; rows starting 2 elements
    into their buffer are not 16-byte aligned and take ordinary loads into the same swizzled image. The
    backward (one writer per dQ element) is bitwise reproducible."""
    if layout == "unaligned":
        bufs = [random_array(rng, (1, 70, 2, 32 + 8), "float16", FW) for _ in range(4)]
        q, k, v, dout = (b[..., 2:34] for b in bufs)
    else:
        q, k, v = make_qkv_arrays(rng, 1, 70, 70, 2, 32, "float16", FW, layout)
        dout = random_array(rng, (1, 70, 2, 32), "float16", FW)
    kw = dict(causal=True, softmax_scale=-0.4, backend="wgmma")
    a = run_mma(q, k, v, dout, "float16", **kw)
    b = run_mma(copy(q), copy(k), copy(v), copy(dout), "float16", **kw)
    c = run_mma(q, k, v, dout, "float16", **kw)
    for x, y, z, name in zip((a[0], a[1], *a[2]), (b[0], b[1], *b[2]), (c[0], c[1], *c[2]),
                             ("out", "lse", "dq", "dk", "dv")):
        assert_bitwise_equal(x, y, name)
        assert_bitwise_equal(x, z, name)
    ref, _ = nf.attention_reference(q, k, v, causal=True, softmax_scale=-0.4)
    assert rel_err(a[0], ref) < 2e-3
    ref_grads = nf.attention_reference_backward(dout, q, k, v, causal=True, softmax_scale=-0.4)
    for name, x, r in zip(("dq", "dk", "dv"), a[2], ref_grads):
        assert rel_err(x, r) < 4e-3, name


def test_wgmma_block_sparse_and_nan_row(rng):
    b1, b2 = block_sizes(32, "float16", "wgmma")
    nq, nk = 2 * b1 + 3, 2 * b2
    mask = BlockMask.random(0.5, nq, nk, (b1, b2), nheads=1, seed=int(rng.integers(1 << 31)))
    q, k, v = make_qkv_arrays(rng, 1, nq, nk, 1, 32, "float16", FW)
    dout = random_array(rng, (1, nq, 1, 32), "float16", FW)
    check_sparse(q, k, v, dout, "float16", mask)
    q[0, 7, 0, 3] = float("nan")
    out, lse = run_wgmma(q, k, v, "float16")
    o = as64(out)
    assert np.isnan(o[0, 7]).all() and np.isnan(as64(lse)[0, 0, 7])
    rows = np.arange(nq) != 7
    assert np.isfinite(o[0, rows]).all()


# --------------------------------------------------------------------------------------------------
# deterministic=False: the dK/dV kernel's own dQ (dS^T staged in shared memory, dQ_i += dS K_j by wgmma,
# float32 reductions into an accumulator; 5 products per tile pair instead of 7)
# --------------------------------------------------------------------------------------------------

def test_wgmma_fused_dq_plan_where_the_tiles_allow_it_else_the_dq_kernel(monkeypatch):
    from numba_flash.kernels import configs
    from numba_flash.kernels.wgmma_tiles import fused_dq_split
    assert configs.backward_plan("wgmma", 32, "float16", True, True, deterministic=False).dq_mode == "atomic"
    assert configs.backward_plan("wgmma", 32, "float16", True, True, deterministic=True).dq_mode == "kernel"
    monkeypatch.setenv(configs.DQ_MODE_ENV, "bulk")      # bulk reductions on wgmma; "atomic" on mma.sync
    assert configs.backward_plan("wgmma", 32, "float16", True, True, deterministic=False).dq_mode == "bulk"
    assert configs.backward_plan("mma", 32, "float16", True, True, deterministic=False).dq_mode == "atomic"
    monkeypatch.delenv(configs.DQ_MODE_ENV)
    # the GPU's tiles: d=64 two 64-query blocks, one per warpgroup; d=128 one block, columns split in two;
    # d=96 (48 columns a warpgroup, across two 32-column blocks of K's 64B-swizzled image): the dQ kernel
    assert fused_dq_split(configs._wgmma_tiles("dkdv", 64), 64) == (2, 64)
    assert fused_dq_split(configs._wgmma_tiles("dkdv", 128), 128) == (1, 64)
    assert fused_dq_split(configs._wgmma_tiles("dkdv", 96), 96) is None
    assert fused_dq_split(configs.MmaTiles(32, 64, 4, a_regs=False), 32) is None     # a wgmma M is 64 queries


def use_dq_mode(monkeypatch, mode):
    from numba_flash.kernels import configs
    monkeypatch.setenv(configs.DQ_MODE_ENV, mode)


FUSED_MODES = pytest.mark.parametrize("mode", ["atomic", "bulk"])


@FUSED_MODES
@pytest.mark.parametrize("dtype,causal,Nq,Nk,d", [
    ("float16", False, 70, 100, 32), ("bfloat16", True, 100, 40, 16), ("float16", True, 65, 130, 48)])
def test_wgmma_fused_dq_within_twice_torch_error_ragged_unequal_seqlens_and_swizzles(rng, monkeypatch, dtype, causal,
                                                                                    Nq, Nk, d, mode):
    """mode "bulk": the slabs of a tile past the last query row land in the accumulator's padding rows."""
    use_dq_mode(monkeypatch, mode)
    q, k, v = make_qkv_arrays(rng, 1, Nq, Nk, 1, d, dtype, FW)
    dout = random_array(rng, (1, Nq, 1, d), dtype, FW)
    out, lse, (dq, dk, dv) = check_all(q, k, v, dout, dtype, deterministic=False, backend="wgmma", causal=causal)
    if causal and Nq > Nk:
        assert (as64(dq)[:, :Nq - Nk] == 0).all()


@FUSED_MODES
def test_wgmma_fused_dq_two_warpgroups_splitting_the_columns_block_sparse(rng, monkeypatch, mode):
    """Two warpgroups of 64 keys on a 64-query tile: each takes half of dQ's columns (16 of a 32-column
    block of K's image: the B descriptor starts inside the swizzle atom; "bulk": two column blocks of the
    accumulator); a block mask with empty rows."""
    from numba_flash.kernels import configs
    use_dq_mode(monkeypatch, mode)
    monkeypatch.setitem(configs._SIM["wgmma"], "dkdv_atomic", configs.MmaTiles(64, 128, 8, a_regs=False))
    q, k, v = make_qkv_arrays(rng, 1, 70, 130, 1, 32, "bfloat16", FW)
    dout = random_array(rng, (1, 70, 1, 32), "bfloat16", FW)
    check_all(q, k, v, dout, "bfloat16", deterministic=False, backend="wgmma", causal=True)
    b1, b2 = block_sizes(32, "bfloat16", "wgmma")
    nq, nk = 2 * b1 + 3, 2 * b2
    mask = BlockMask.random(0.5, nq, nk, (b1, b2), nheads=1, seed=int(rng.integers(1 << 31)))
    q, k, v = make_qkv_arrays(rng, 1, nq, nk, 1, 32, "bfloat16", FW)
    dout = random_array(rng, (1, nq, 1, 32), "bfloat16", FW)
    _, _, grads = run_mma(q, k, v, dout, "bfloat16", deterministic=False, backend="wgmma", block_mask=mask)
    dense = mask.to_dense()
    ref = nf.attention_reference_backward(dout, q, k, v, mask=dense)
    theirs = torch_lowp(q, k, v, dout, "bfloat16", mask=dense)[1:]
    for name, ours, r, th in zip(("dq", "dk", "dv"), grads, ref, theirs):
        assert_within_budget(name, ours, r, th)


def test_wgmma_backend_trains_through_autograd(rng):
    """backend="wgmma" through flash_attn_func: forward and backward on wgmma."""
    import torch
    q, k, v = make_qkv_arrays(rng, 1, 64, 64, 1, 16, "bfloat16", "torch")
    dout = random_array(rng, (1, 64, 1, 16), "bfloat16", "torch")
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = nf.flash_attn_func(*leaves, causal=True, backend="wgmma")
    out.backward(dout)
    ref = nf.attention_reference_backward(dout, q, k, v, causal=True)
    theirs = torch_lowp(q, k, v, dout, "bfloat16", causal=True)
    assert_within_budget("out", out.detach(), nf.attention_reference(q, k, v, causal=True)[0], theirs[0])
    for name, x, r, th in zip(("dq", "dk", "dv"), leaves, ref, theirs[1:]):
        assert x.grad is not None and torch.isfinite(x.grad).all()
        assert_within_budget(name, x.grad, r, th)


def test_wgmma_backend_is_validated():
    from numba_flash.kernels import configs
    assert configs.resolve_backend("wgmma", "float16", (9, 0)) == "wgmma"
    assert configs.resolve_backend("wgmma", "bfloat16", None) == "wgmma"
    with pytest.raises(ValueError, match="backend='wgmma'.*9.0.*8.9"):
        configs.resolve_backend("wgmma", "float16", (8, 9))
    with pytest.raises(ValueError, match="backend='wgmma'.*10.0"):
        configs.resolve_backend("wgmma", "float16", (10, 0))
    with pytest.raises(ValueError, match="backend='wgmma'.*float32"):
        configs.resolve_backend("wgmma", "float32", (9, 0))
    assert configs.backward_plan("wgmma", 128, "float16", False, True).path == "wgmma"
    assert configs.backward_plan("wgmma", 160, "float16", False, True).path == "mma"   # dK, dV too wide


def test_auto_takes_wgmma_on_cc90_per_pass_for_its_head_dims_and_falls_back_for_narrow_mask_blocks(rng, monkeypatch):
    from numba_flash import api
    from numba_flash.kernels import configs
    for cap, d, want in [((9, 0), 128, "wgmma"), ((9, 0), 96, "wgmma"), ((9, 0), 64, "wgmma"), ((9, 0), 48, "mma"),
                         ((9, 0), 256, "mma"), ((8, 0), 128, "mma"), ((10, 0), 128, "mma"), (None, 128, "mma")]:
        assert configs.resolve_backend("auto", "float16", cap, d) == want, (cap, d)
    assert configs.resolve_backend("auto", "float32", (9, 0), 128) == "simt"
    # the backward's own choice: wgmma from d=64 as well
    for cap, d, want in [((9, 0), 64, "wgmma"), ((9, 0), 128, "wgmma"), ((9, 0), 32, "mma"), ((9, 0), 256, "mma"),
                         ((8, 0), 64, "mma"), (None, 64, "mma")]:
        assert configs.resolve_backend("auto", "bfloat16", cap, d, "bwd") == want, (cap, d)
    q, k, v = make_qkv_arrays(rng, 1, 64, 64, 1, 96, "float16", FW)
    p = api.check_qkv(q, k, v)
    monkeypatch.setattr(api, "capability_of", lambda p: (9, 0))
    assert api.path_of(p, None) == "wgmma"
    br, bc = configs.mask_tile("wgmma", 96)
    assert api.path_of(p, None, BlockMask.dense(64, 64, (br, bc))) == "wgmma"
    narrow = BlockMask.dense(64, 64, (16, 16))                # finer than the wgmma tiles
    assert api.path_of(p, None, narrow) == "mma"
    assert api.path_of(p, None, narrow, "bwd") == "mma"
    # the lists autograd hands the kernels (a MaskLists) decide the same (they raised AttributeError:
    # every block-sparse flash_attn_func on an H100/H200 failed, 2026-12-04)
    assert api.path_of(p, None, api.mask_lists_of(narrow, p), "bwd") == "mma"
    assert api.path_of(p, None, api.mask_lists_of(BlockMask.dense(64, 64, (br, bc)), p)) == "wgmma"
    assert api.path_of(p, "auto", None, "bwd") == "wgmma"
    assert api.path_of(p, "wgmma", narrow) == "wgmma"        # asked for: validate_block_mask says why not


def test_flash_attn_func_resolves_auto_per_pass(rng, monkeypatch):
    """On a cc 9.0 GPU (faked here), with tables that put d=64's forward on mma.sync and its backward on
    wgmma (as they did before the warp-specialised forward; both passes now take wgmma there):
    flash_attn_func hands autograd the choice, not the forward's path, and the gradients are right."""
    import torch
    from numba_flash import api
    from numba_flash.kernels import backward, configs, forward
    monkeypatch.setattr(api, "capability_of", lambda p: (9, 0))
    monkeypatch.setattr(configs, "WGMMA_AUTO_HEADDIMS", range(65, 129))
    assert 64 in configs.WGMMA_BWD_AUTO_HEADDIMS
    paths = []
    for mod in (forward, backward):
        real = mod.launch
        monkeypatch.setattr(mod, "launch", lambda plan, *a, _real=real: (paths.append(plan.path), _real(plan, *a)))
    q, k, v = make_qkv_arrays(rng, 1, 40, 40, 1, 64, "float16", "torch")
    dout = random_array(rng, (1, 40, 1, 64), "float16", "torch")
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    nf.flash_attn_func(*leaves, causal=True).backward(dout)
    assert paths == ["mma", "wgmma"]
    ref = nf.attention_reference_backward(dout, q, k, v, causal=True)
    theirs = torch_lowp(q, k, v, dout, "float16", causal=True)
    for name, x, r, th in zip(("dq", "dk", "dv"), leaves, ref, theirs[1:]):
        assert torch.isfinite(x.grad).all()
        assert_within_budget(name, x.grad, r, th)


# --------------------------------------------------------------------------------------------------
# The warp-specialised forward (tiles.ring > 0: a producer warpgroup and an mbarrier ring)
# --------------------------------------------------------------------------------------------------

def use_ring(monkeypatch, ring, d=32, pingpong=False, late_pv_wait=None, consumers=None, persistent=False,
             tma=False, dynamic=False):
    """Make the wgmma forward warp-specialised with a `ring`-stage ring (0: the kernel without warp
    specialisation): under the simulator one consumer warpgroup (64 queries; two with the ping-pong) and
    32-key tiles, on a GPU the default tiles' shape with two consumer warpgroups (tuning runs reach it the
    same way, through NUMBA_FLASH_FWD_TILES). late_pv_wait: MmaTiles.late_pv_wait (None: its default).
    consumers: that many computing warpgroups (64 query rows each) instead. persistent: MmaTiles.persistent
    (under the simulator the grid then has launch.SIM_RESIDENT_BLOCKS blocks). tma: MmaTiles.tma. dynamic:
    MmaTiles.dynamic."""
    import dataclasses
    from numba_flash.kernels import configs
    if late_pv_wait is None:
        late_pv_wait = configs.MmaTiles.late_pv_wait
    if SIMULATOR:
        warps = 4 * consumers if consumers else 8 if pingpong else 4
        monkeypatch.setitem(configs._SIM["wgmma"], "fwd",
                            configs.MmaTiles(16 * warps, 32, warps, a_regs=False, ring=ring, pingpong=pingpong,
                                             late_pv_wait=late_pv_wait, persistent=persistent, tma=tma,
                                             dynamic=dynamic))
    else:
        t = configs._wgmma_tiles("fwd", d)
        br, warps = (64 * consumers, 4 * consumers) if consumers else (t.br, t.warps)
        t = dataclasses.replace(t, br=br, warps=warps, a_regs=False, min_blocks=0, ring=ring, pingpong=pingpong,
                                late_pv_wait=late_pv_wait, persistent=persistent, tma=tma, dynamic=dynamic)
        monkeypatch.setenv("NUMBA_FLASH_FWD_TILES", t.override())


def check_ring_matches_default_bitwise(monkeypatch, q, k, v, dtype, ring, pingpong=False, consumers=None, **kw):
    """The warp-specialised forward does the two-warpgroup kernel's arithmetic in its order: the same bits;
    and within the error budget of the reference."""
    d = q.shape[-1]
    use_ring(monkeypatch, 0, d, pingpong, consumers=consumers)   # without warp specialisation, same tiles
    want = run_wgmma(q, k, v, dtype, **kw)
    use_ring(monkeypatch, ring, d, pingpong, consumers=consumers)
    got = run_wgmma(q, k, v, dtype, **kw)
    for name, x, y in zip(("out", "lse"), got, want):
        assert_bitwise_equal(x, y, name)
    mask = kw.get("block_mask")
    ref_kw = {key: val for key, val in kw.items() if key != "block_mask"}
    if mask is not None:
        ref_kw["mask"] = mask.to_dense()
    ref_out, ref_lse = nf.attention_reference(q, k, v, **ref_kw)
    theirs = torch_lowp(q, k, v, random_array(np.random.default_rng(0), q.shape, dtype, FW), dtype, **ref_kw)
    assert_lse_close(got[1], ref_lse, dtype)
    assert_within_budget("out", got[0], ref_out, theirs[0])
    return got


@pytest.mark.parametrize("ring,dtype,causal,Nq,Nk,d", [
    (2, "float16", False, 70, 100, 32), (3, "bfloat16", True, 100, 40, 16),
    (2, "float16", True, 65, 130, 64), (3, "bfloat16", False, 33, 65, 48)])
def test_wgmma_warp_specialised_forward_matches_default_bitwise_ragged_and_swizzles(rng, monkeypatch, ring, dtype,
                                                                                 causal, Nq, Nk, d):
    """Ragged query and key tiles, Nq != Nk, the four swizzles, rings deeper and shallower than the walk
    (1 to 5 key tiles), and (causal, Nq > Nk) query tiles that see no key, where the producer copies Q
    only and the consumers skip the loop."""
    q, k, v = make_qkv_arrays(rng, 1, Nq, Nk, 1, d, dtype, FW)
    out, lse = check_ring_matches_default_bitwise(monkeypatch, q, k, v, dtype, ring, causal=causal)
    if causal and Nq > Nk:
        assert (as64(out)[:, :Nq - Nk] == 0).all() and np.isneginf(as64(lse)[:, :, :Nq - Nk]).all()


def test_wgmma_warp_specialised_forward_with_ping_pong_matches_default_bitwise(rng, monkeypatch):
    """Two computing warpgroups taking turns (named barriers) on ragged causal tiles: query blocks with
    different numbers of key tiles, so a barrier left unbalanced would hang (the simulator raises)."""
    q, k, v = make_qkv_arrays(rng, 1, 150, 100, 1, 16, "bfloat16", FW)
    check_ring_matches_default_bitwise(monkeypatch, q, k, v, "bfloat16", 2, pingpong=True, causal=True)


def test_wgmma_forward_is_persistent_by_default_but_not_on_a_block_mask(rng, monkeypatch):
    """The GPU's default forward tiles: persistent on dense inputs (d=128 causal aside), never with a block
    mask (its fixed round-robin cannot balance query tiles of uneven work); the API tells the plan which."""
    from numba_flash.kernels import configs
    assert configs._wgmma_tiles("fwd", 64).persistent and configs._wgmma_tiles("fwd", 64, True).persistent
    assert configs._wgmma_tiles("fwd", 128).persistent and not configs._wgmma_tiles("fwd", 128, True).persistent
    for d in (64, 128):
        for causal in (False, True):
            t = configs._wgmma_tiles("fwd", d, causal, sparse=True)
            assert t.ring and t.pingpong and t.tma and not t.persistent, (d, causal, t)
    seen, real = [], configs.forward_plan
    monkeypatch.setattr(configs, "forward_plan", lambda *a, **kw: seen.append(kw.get("sparse")) or real(*a, **kw))
    b, _ = block_sizes(16, "float32", "simt")
    q, k, v = make_qkv_arrays(rng, 1, b, b, 1, 16, "float32", FW)
    nf.flash_attn_forward(q, k, v, backend="simt")
    nf.flash_attn_forward(q, k, v, backend="simt", block_mask=BlockMask.random(1.0, b, b, (b, b), nheads=1, seed=1))
    assert seen == [False, True]


@pytest.mark.parametrize("ring,pingpong,causal,Nq,Nk,H,d", [
    (2, True, True, 150, 100, 2, 16), (3, False, False, 100, 70, 3, 32), (2, False, True, 200, 50, 1, 16)])
def test_wgmma_persistent_forward_matches_default_bitwise_across_work_tiles(rng, monkeypatch, ring, pingpong,
                                                                           causal, Nq, Nk, H, d):
    """A persistent grid (MmaTiles.persistent): each block walks several work tiles (query tiles of several
    heads), the ring's stages and phases, Q's reload and the ping-pong's turns carried from one to the next,
    causal tiles longest first, and query tiles that see no key (the last case: two whole tiles); same bits
    as one block per tile. On the GPU at real sizes with the default tiles' shape."""
    B = 1
    if not SIMULATOR:
        B, Nq, Nk, H, d = 2, 10 * Nq, 10 * Nk, 16, 64
    q, k, v = make_qkv_arrays(rng, B, Nq, Nk, H, d, "float16", FW)
    use_ring(monkeypatch, ring, d, pingpong)
    want = run_wgmma(q, k, v, "float16", causal=causal)
    use_ring(monkeypatch, ring, d, pingpong, persistent=True)
    got = run_wgmma(q, k, v, "float16", causal=causal)
    for name, x, y in zip(("out", "lse"), got, want):
        assert_bitwise_equal(x, y, name)


@pytest.mark.parametrize("ring,pingpong,causal,Nq,Nk,H,d", [
    (2, True, True, 150, 100, 2, 16), (3, False, False, 100, 70, 3, 32), (2, False, True, 200, 50, 1, 16)])
def test_wgmma_dynamic_order_forward_matches_default_bitwise(rng, monkeypatch, ring, pingpong, causal, Nq, Nk, H,
                                                             d):
    """Work tiles drawn from a counter (MmaTiles.dynamic: a persistent TMA producer publishing each tile in
    shared memory with its Q, and the end as a Q phase without bytes): every work tile computed once, the
    same bits as one block per tile; tiles that see no key included (the last case). Run twice: each launch
    zeroes its own counter."""
    from numba_flash.kernels import forward
    B = 1
    if not SIMULATOR:
        B, Nq, Nk, H, d = 2, 10 * Nq, 10 * Nk, 16, 64
    q, k, v = make_qkv_arrays(rng, B, Nq, Nk, H, d, "float16", FW)
    use_ring(monkeypatch, ring, d, pingpong, tma=True)
    want = run_wgmma(q, k, v, "float16", causal=causal)
    counters = []
    real = forward.work_counter
    monkeypatch.setattr(forward, "work_counter", lambda like, stream: counters.append(1) or real(like, stream))
    use_ring(monkeypatch, ring, d, pingpong, persistent=True, tma=True, dynamic=True)
    for _ in range(2):
        got = run_wgmma(q, k, v, "float16", causal=causal)
        for name, x, y in zip(("out", "lse"), got, want):
            assert_bitwise_equal(x, y, name)
    assert len(counters) == 2, "the launch did not take its work tiles from a counter"


@pytest.mark.parametrize("dynamic", [False, True], ids=["round_robin", "dynamic"])
def test_wgmma_persistent_causal_forward_in_short_sections_matches_default_bitwise(rng, monkeypatch, dynamic):
    """A causal persistent forward whose L2 budget holds two (batch, head) pairs' K and V (walk.section_pairs),
    so it runs sections of two pairs and a short last one, longest first within each: every work tile
    computed once, the same bits as one block per tile."""
    from numba_flash.kernels import forward, walk
    B, Nq, Nk, H, d = 1, 70, 40, 3, 16        # simulator: 2 query tiles of 64, 2 key tiles of 32, one warpgroup
    pingpong = not SIMULATOR
    if not SIMULATOR:
        B, Nq, Nk, H, d = 2, 1500, 1000, 16, 64
    q, k, v = make_qkv_arrays(rng, B, Nq, Nk, H, d, "float16", FW)
    use_ring(monkeypatch, 2, d, pingpong, tma=True)
    want = run_wgmma(q, k, v, "float16", causal=True)
    monkeypatch.setattr(walk, "_L2_SECTION_BYTES", 2 * (2 * Nk * d * 2))
    sections = []
    real = forward.persistent_grid
    monkeypatch.setattr(forward, "persistent_grid", lambda *a: sections.append(a[-1]) or real(*a))
    use_ring(monkeypatch, 2, d, pingpong, persistent=True, tma=True, dynamic=dynamic)
    got = run_wgmma(q, k, v, "float16", causal=True)
    for name, x, y in zip(("out", "lse"), got, want):
        assert_bitwise_equal(x, y, name)
    assert sections == [2], sections


def test_persistent_grid_is_at_most_the_resident_blocks_and_refuses_a_32_bit_overflow():
    from numba_flash.kernels.walk import persistent_grid
    assert persistent_grid(1000, 128, 16, 2, 132) == ((132, 1, 1), (8, 16, 2, 32))
    assert persistent_grid(1000, 128, 16, 2, 132, section=5) == ((132, 1, 1), (8, 16, 2, 5))
    assert persistent_grid(100, 128, 1, 1, 132, section=7) == ((1, 1, 1), (1, 1, 1, 1))
    with pytest.raises(ValueError, match="seqlen = 1048576"):
        persistent_grid(1 << 20, 1, 1 << 11, 1, 132)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("section", [0, 1, 3, 4, 6])
def test_persistent_work_order_takes_every_tile_once_longest_first_within_sections(causal, section):
    """walk.make_work_order (persistent): work tiles 0 .. T*H*B - 1 map to every (tile, head, batch) once;
    causal runs sections of `section` (batch, head) pairs, heads fastest, each section's tiles longest
    first, the last section short where the pairs do not divide (H * B = 6 here: 4 leaves 4 + 2)."""
    from numba import cuda

    from numba_flash.kernels.launch import kernel
    from numba_flash.kernels.walk import make_walk, make_work_order, persistent_grid

    T, H, B = 5, 3, 2
    order = make_work_order(make_walk(16, 16, causal, True), causal, True)
    more, coords = order.more, order.coords

    @kernel(1, 0)
    def record(out, work):
        w = 0
        while more(w, work):
            t, h, b = coords(w, work)
            out[w, 0] = t
            out[w, 1] = h
            out[w, 2] = b
            w += 1

    _, work = persistent_grid(16 * T - 3, 16, H, B, 132, section)
    d_out = cuda.to_device(np.full((T * H * B, 3), -1, np.int64))
    record[1, 1](d_out, work)
    got = [tuple(r) for r in d_out.copy_to_host()]
    assert sorted(got) == [(t, h, b) for t in range(T) for h in range(H) for b in range(B)]
    if not causal:
        assert got == [(t, h, b) for b in range(B) for h in range(H) for t in range(T)]
        return
    sec = section if 0 < section < H * B else H * B
    want = []
    for first in range(0, H * B, sec):
        pairs = range(first, min(first + sec, H * B))
        want += [(t, hb % H, hb // H) for t in range(T - 1, -1, -1) for hb in pairs]
    assert got == want


def test_section_pairs_keep_a_section_within_the_l2_budget(monkeypatch):
    from numba_flash.kernels import walk
    monkeypatch.setattr(walk, "_L2_SECTION_BYTES", 32 << 20)
    assert walk.section_pairs(512 << 10, 256) == 64        # N = 2k, d = 64, fp16: K and V 512 KB a pair
    assert walk.section_pairs(512 << 10, 16) == 16         # never more than there are
    assert walk.section_pairs(64 << 20, 4) == 1            # a pair beyond the budget: sections of one
    monkeypatch.setattr(walk, "_L2_SECTION_BYTES", 0)
    assert walk.section_pairs(512 << 10, 256) == 256       # 0: one section (the plain longest-first order)


def test_tile_override_reads_the_persistent_field(monkeypatch):
    from numba_flash.kernels import configs
    monkeypatch.setenv("NUMBA_FLASH_FWD_TILES", "128,128,8,0,0,2,1,0,1")
    assert configs._override("wgmma", "fwd") == configs.MmaTiles(128, 128, 8, a_regs=False, ring=2, pingpong=True,
                                                                   persistent=True)
    monkeypatch.setenv("NUMBA_FLASH_FWD_TILES", "128,128,8,0,0,3,1,0,0,1")
    assert configs._override("wgmma", "fwd") == configs.MmaTiles(128, 128, 8, a_regs=False, ring=3, pingpong=True,
                                                                   tma=True)
    t = configs.MmaTiles(64, 128, 4, a_regs=False, min_blocks=2, ring=2, late_pv_wait=True, persistent=True)
    monkeypatch.setenv("NUMBA_FLASH_FWD_TILES", t.override())      # what tests and tools/sanitize.py set
    assert configs._override("wgmma", "fwd") == t


@pytest.mark.parametrize("ring,causal", [(2, True), (3, False)])
def test_wgmma_warp_specialised_forward_with_three_consumer_warpgroups_matches_default_bitwise(rng, monkeypatch,
                                                                                            ring, causal):
    """Three computing warpgroups (192-query tiles, setmaxnreg's split for 512 threads): ragged query and key
    tiles, causal query tiles that see few or no keys."""
    nq, nk = (100, 70) if SIMULATOR else (1000, 1100)
    q, k, v = make_qkv_arrays(rng, 1, nq, nk, 1, 16 if SIMULATOR else 64, "float16", FW)
    out, lse = check_ring_matches_default_bitwise(monkeypatch, q, k, v, "float16", ring, consumers=3,
                                                  causal=causal)
    if causal and nq > nk:
        assert (as64(out)[:, :nq - nk] == 0).all() and np.isneginf(as64(lse)[:, :, :nq - nk]).all()


@pytest.mark.parametrize("ring", [0, 2])
def test_wgmma_forward_with_the_late_pv_wait_gives_the_same_bits(rng, monkeypatch, ring):
    """MmaTiles.late_pv_wait = True (the wait for P V after the softmax; measured slower than the default's
    plain wait, kept for A/B timing) runs the same arithmetic as the default: the same bits, with and
    without warp specialisation, causal and ragged."""
    n = 70 if SIMULATOR else 1000
    q, k, v = make_qkv_arrays(rng, 1, n, n + 30, 2, 16 if SIMULATOR else 64, "float16", FW)
    use_ring(monkeypatch, ring, q.shape[-1])
    want = run_wgmma(q, k, v, "float16", causal=True)
    use_ring(monkeypatch, ring, q.shape[-1], late_pv_wait=True)
    got = run_wgmma(q, k, v, "float16", causal=True)
    for name, x, y in zip(("out", "lse"), got, want):
        assert_bitwise_equal(x, y, name)


def test_tile_override_reads_every_field(monkeypatch):
    """NUMBA_FLASH_FWD_TILES "br,bc,warps,a_regs,min_blocks,ring,pingpong,late_pv_wait" (tuning runs)."""
    from numba_flash.kernels import configs
    monkeypatch.setenv("NUMBA_FLASH_FWD_TILES", "128,128,8,0,1,3,1,0")
    assert configs._override("wgmma", "fwd") == configs.MmaTiles(128, 128, 8, a_regs=False, min_blocks=1, ring=3,
                                                                   pingpong=True, late_pv_wait=False)
    monkeypatch.setenv("NUMBA_FLASH_FWD_TILES", "128,64,4,1")
    assert configs._override("mma", "fwd") == configs.MmaTiles(128, 64, 4, a_regs=True)


def test_wgmma_warp_specialised_forward_block_sparse_unaligned_and_negative_scale(rng, monkeypatch):
    """A block mask (empty rows of blocks included), rows that are not 16-byte aligned (the producer's
    ordinary loads into the swizzled image) and a negative scale, against the two-warpgroup kernel's bits."""
    b1, _ = block_sizes(32, "float16", "wgmma")
    nq, nk = b1 + 3, 2 * b1
    mask = BlockMask.random(0.5, nq, nk, (b1, b1), nheads=2, seed=int(rng.integers(1 << 31)))
    q, k, v = make_qkv_arrays(rng, 1, nq, nk, 2, 16, "float16", FW, "kvpacked")
    check_ring_matches_default_bitwise(monkeypatch, q, k, v, "float16", 2, block_mask=mask)
    bufs = [random_array(rng, (1, 70, 1, 32 + 8), "bfloat16", FW) for _ in range(3)]
    q, k, v = (b[..., 2:34] for b in bufs)
    check_ring_matches_default_bitwise(monkeypatch, q, k, v, "bfloat16", 2, causal=True, softmax_scale=-0.3)


def spy_tma_maps(monkeypatch):
    """Record what forward.tma_maps answers (None: the launch fell back to cp.async)."""
    from numba_flash.kernels import forward
    made, real = [], forward.tma_maps

    def spy(*a):
        made.append(real(*a))
        return made[-1]
    monkeypatch.setattr(forward, "tma_maps", spy)
    return made


def check_tma_matches_cp_async_bitwise(monkeypatch, q, k, v, dtype, ring, tma_expected, pingpong=False,
                                       persistent=False, **kw):
    """The TMA producer (MmaTiles.tma) fills the ring with the cp.async producer's images: the same bits.
    tma_expected: whether the launch can use TMA (aligned inputs whose maps the driver encodes)."""
    d = q.shape[-1]
    use_ring(monkeypatch, ring, d, pingpong, persistent=persistent)
    want = run_wgmma(q, k, v, dtype, **kw)
    made = spy_tma_maps(monkeypatch)
    use_ring(monkeypatch, ring, d, pingpong, persistent=persistent, tma=True)
    got = run_wgmma(q, k, v, dtype, **kw)
    if tma_expected:
        assert made and all(m is not None for m in made), "the launch did not copy by TMA"
    else:
        assert all(m is None for m in made), "maps were made for inputs TMA cannot express"
    for name, x, y in zip(("out", "lse"), got, want):
        assert_bitwise_equal(x, y, name)


@pytest.mark.parametrize("ring,causal,persistent,Nq,Nk,H,d", [
    (2, False, False, 70, 100, 1, 32), (3, True, True, 65, 90, 2, 64), (2, True, False, 33, 65, 1, 48)])
def test_wgmma_tma_producer_matches_cp_async_bitwise_ragged_swizzles_persistent(rng, monkeypatch, ring, causal,
                                                                                 persistent, Nq, Nk, H, d):
    """Ragged query and key tiles (zeros from the boxes past the last row), the 64-, 128- and 32-byte
    swizzles (d = 32, 64, 48: one, one and three boxes per tile), causal tiles that see no key, and a
    persistent grid (Q reloaded per work tile by TMA)."""
    q, k, v = make_qkv_arrays(rng, 1, Nq, Nk, H, d, "float16", FW)
    check_tma_matches_cp_async_bitwise(monkeypatch, q, k, v, "float16", ring, True, persistent=persistent,
                                       causal=causal)


def test_wgmma_tma_producer_falls_back_to_cp_async_where_tma_cannot_express_the_inputs(rng, monkeypatch):
    """Rows that are not 16-byte aligned: the plan is not aligned, no maps are made and the producer copies
    by ordinary loads; maps the driver refuses (encode answering None): cp.async. Same bits either way."""
    from numba_flash.kernels import tma
    bufs = [random_array(rng, (1, 40, 1, 32 + 8), "bfloat16", FW) for _ in range(3)]
    q, k, v = (b[..., 1:33] for b in bufs)
    check_tma_matches_cp_async_bitwise(monkeypatch, q, k, v, "bfloat16", 2, False, causal=True)
    q, k, v = make_qkv_arrays(rng, 1, 40, 40, 1, 16, "float16", FW)
    monkeypatch.setattr(tma, "encode", lambda *a, **kw: None)
    monkeypatch.setattr(tma, "_cache", type(tma._cache)())     # no maps kept from earlier calls
    check_tma_matches_cp_async_bitwise(monkeypatch, q, k, v, "float16", 2, False)


def use_bwd_tma(monkeypatch, d, on):
    """The wgmma backward kernels copy their streamed tiles by TMA (MmaTiles.tma) or by cp.async, tiles
    otherwise the default ones (under the simulator its small ones; on a GPU through the tile overrides,
    as tuning runs do)."""
    import dataclasses
    from numba_flash.kernels import configs
    if SIMULATOR:
        for role in ("dkdv", "dq", "dkdv_atomic"):
            monkeypatch.setitem(configs._SIM["wgmma"], role, dataclasses.replace(configs._SIM["wgmma"][role], tma=on))
    else:
        for role, var in (("dkdv", "NUMBA_FLASH_DKDV_TILES"), ("dq", "NUMBA_FLASH_DQ_TILES")):
            monkeypatch.setenv(var, dataclasses.replace(configs._wgmma_tiles(role, d), tma=on).override())


def spy_bwd_tma_maps(monkeypatch):
    """Record what backward.tma_maps answers per kernel role (None: that kernel fell back to cp.async)."""
    from numba_flash.kernels import backward
    made, real = [], backward.tma_maps

    def spy(plan, role, *a):
        made.append((role, real(plan, role, *a)))
        return made[-1][1]
    monkeypatch.setattr(backward, "tma_maps", spy)
    return made


def check_bwd_tma_matches_cp_async_bitwise(monkeypatch, q, k, v, dout, dtype, tma_expected, deterministic=True,
                                           **kw):
    """The backward's TMA streams land the cp.async copies' images: the same gradients, bitwise (the fused
    dQ's unordered additions aside: within the error budget). tma_expected: whether both kernels (the
    dK/dV kernel alone with the fused dQ) can copy by TMA."""
    d = q.shape[-1]
    use_bwd_tma(monkeypatch, d, False)
    _, _, want = run_mma(q, k, v, dout, dtype, deterministic=deterministic, backend="wgmma", **kw)
    made = spy_bwd_tma_maps(monkeypatch)
    use_bwd_tma(monkeypatch, d, True)
    out, _, got = run_mma(q, k, v, dout, dtype, deterministic=deterministic, backend="wgmma", **kw)
    roles = [role for role, _ in made]
    if tma_expected:
        assert roles == (["dkdv", "dq"] if deterministic else ["dkdv"]), roles
        assert all(m is not None for _, m in made), "a kernel did not copy by TMA"
    else:
        assert all(m is None for _, m in made), "maps were made for inputs TMA cannot express"
    for name, x, y in zip(("dq", "dk", "dv"), got, want):
        if name == "dq" and not deterministic:
            continue
        assert_bitwise_equal(x, y, name)
    mask = kw.pop("block_mask", None)
    if mask is not None:
        kw["mask"] = mask.to_dense()
    ref = nf.attention_reference_backward(dout, q, k, v, **kw)
    theirs = torch_lowp(q, k, v, dout, dtype, **kw)[1:]
    for name, ours, r, th in zip(("dq", "dk", "dv"), got, ref, theirs):
        assert_within_budget(name, ours, r, th)


@pytest.mark.parametrize("dtype,causal,Nq,Nk,H,d", [
    ("float16", False, 70, 100, 1, 32), ("bfloat16", True, 100, 70, 2, 64), ("float16", True, 65, 40, 1, 48)])
def test_wgmma_backward_tma_streams_match_cp_async_bitwise_ragged_and_swizzles(rng, monkeypatch, dtype, causal,
                                                                                Nq, Nk, H, d):
    """Ragged streamed tiles (zeros from the boxes past the last row), the 64-, 128- and 32-byte swizzles
    (one, one and three boxes per tile), several heads, causal key tiles that see no query, and enough
    streamed tiles per block (up to 4) that both buffers' mbarriers go through more than one phase."""
    q, k, v = make_qkv_arrays(rng, 1, Nq, Nk, H, d, dtype, FW)
    dout = random_array(rng, (1, Nq, H, d), dtype, FW)
    check_bwd_tma_matches_cp_async_bitwise(monkeypatch, q, k, v, dout, dtype, True, causal=causal)


@FUSED_MODES
def test_wgmma_backward_tma_streams_with_the_fused_dq_and_a_block_mask(rng, monkeypatch, mode):
    """The fused dQ's dK/dV kernel (it reads the streamed Q tile twice) and block-sparse walks with
    skipped tiles: the buffers' phases follow the tiles walked, not the tile indices."""
    use_dq_mode(monkeypatch, mode)
    q, k, v = make_qkv_arrays(rng, 1, 70, 100, 1, 32, "float16", FW)
    dout = random_array(rng, (1, 70, 1, 32), "float16", FW)
    check_bwd_tma_matches_cp_async_bitwise(monkeypatch, q, k, v, dout, "float16", True, deterministic=False,
                                           causal=True)
    if mode == "bulk":
        return                                          # the rest runs the dQ kernel: the same in both
    monkeypatch.delenv("NUMBA_FLASH_DQ_MODE")           # the block mask: the dQ kernel's walk too
    b1, b2 = block_sizes(32, "bfloat16", "wgmma")
    nq, nk = 3 * b1, 3 * b2
    mask = BlockMask.random(0.5, nq, nk, (b1, b2), nheads=1, seed=int(rng.integers(1 << 31)))
    q, k, v = make_qkv_arrays(rng, 1, nq, nk, 1, 32, "bfloat16", FW)
    dout = random_array(rng, (1, nq, 1, 32), "bfloat16", FW)
    check_bwd_tma_matches_cp_async_bitwise(monkeypatch, q, k, v, dout, "bfloat16", True, block_mask=mask)


def test_wgmma_backward_tma_falls_back_to_cp_async_where_tma_cannot_express_the_inputs(rng, monkeypatch):
    """Rows that are not 16-byte aligned (no maps made: ordinary loads) and maps the driver refuses
    (cp.async): the same gradients either way."""
    from numba_flash.kernels import tma
    bufs = [random_array(rng, (1, 40, 1, 32 + 8), "bfloat16", FW) for _ in range(4)]
    q, k, v, dout = (b[..., 1:33] for b in bufs)
    check_bwd_tma_matches_cp_async_bitwise(monkeypatch, q, k, v, dout, "bfloat16", False, causal=True)
    q, k, v = make_qkv_arrays(rng, 1, 40, 40, 1, 16, "float16", FW)
    dout = random_array(rng, (1, 40, 1, 16), "float16", FW)
    monkeypatch.setattr(tma, "encode", lambda *a, **kw: None)
    monkeypatch.setattr(tma, "_cache", type(tma._cache)())     # no maps kept from earlier calls
    check_bwd_tma_matches_cp_async_bitwise(monkeypatch, q, k, v, dout, "float16", False)


# GPU: real sizes
# --------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d", [32, 64, 96, 128, 256])
def test_gpu_wgmma_large_within_twice_torch_error(rng, d, dtype, causal):
    q, k, v = make_qkv_arrays(rng, 2, 1000, 777, 2, d, dtype, "torch")
    dout = random_array(rng, (2, 1000, 2, d), dtype, "torch")
    check_all(q, k, v, dout, dtype, backend="wgmma", causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_tma_map_slots_reused_across_streams_keep_every_launch_exact(rng, monkeypatch, d):
    """Three map slots for four (q, k, v) sets whose forward + backward alternate between two streams,
    each stream held back by a sleep: every call's maps are new, and each copy rewrites a slot that the
    other stream's pending kernels were given (tma.MapSlots' hazards). Every gradient and output must
    equal, bitwise, those of the same calls made one at a time."""
    import torch
    from numba_flash.kernels import tma
    sets = [make_qkv_arrays(rng, 2, 700, 700, 3, d, "float16", "torch") for _ in range(4)]
    douts = [random_array(rng, (2, 700, 3, d), "float16", "torch") for _ in range(4)]

    def step(i):
        q, k, v = sets[i]
        out, lse = nf.flash_attn_forward(q, k, v, causal=True)
        return (out, lse) + nf.flash_attn_backward(douts[i], q, k, v, out, lse, causal=True)
    want = [step(i) for i in range(4)]
    torch.cuda.synchronize()
    monkeypatch.setattr(tma, "CACHE_SIZE", 3)
    monkeypatch.setattr(tma, "_slots", {})
    monkeypatch.setattr(tma, "_cache", {})
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    got = []
    for r in range(3):
        for i in range(4):
            with torch.cuda.stream(streams[(i + r) % 2]):
                torch.cuda._sleep(100_000 * (1 + (i + r) % 3))
                got.append((i, step(i)))
    torch.cuda.synchronize()
    assert len(tma._slots) == 1 and tma._slots[next(iter(tma._slots))].n == 3
    for i, outs in got:
        for name, x, y in zip(("out", "lse", "dq", "dk", "dv"), outs, want[i]):
            assert_bitwise_equal(x, y, f"{name} of set {i}")


@pytest.mark.gpu
def test_gpu_cuda_graph_of_forward_and_backward_replays_exactly_after_the_map_ring_moved_on(rng, monkeypatch):
    """A forward + backward captured in a torch CUDA graph (its tensor maps in slots of their own,
    tma.MapSlots.captured), replayed on new input values after eager calls on other tensors have cycled
    the map ring (three slots) twice: the same outputs and gradients, bitwise, as eager calls on those
    values."""
    import torch
    from numba_flash.kernels import tma
    monkeypatch.setattr(tma, "CACHE_SIZE", 3)
    monkeypatch.setattr(tma, "_slots", {})
    monkeypatch.setattr(tma, "_cache", {})
    shape = (2, 700, 3, 64)

    def fresh():
        return make_qkv_arrays(rng, 2, 700, 700, 3, 64, "float16", "torch") + (
            random_array(rng, shape, "float16", "torch"),)

    def step(q, k, v, dout):
        out, lse = nf.flash_attn_forward(q, k, v, causal=True)
        return (out, lse) + nf.flash_attn_backward(dout, q, k, v, out, lse, causal=True)
    static_in = [x.contiguous() for x in fresh()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                  # warm-up: compiles, and makes the map slots
        step(*static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(*static_in)
    for _ in range(2):
        for _ in range(2):
            step(*fresh())                         # new maps: every ring slot rewritten
        values = fresh()
        for dst, src in zip(static_in, values):
            dst.copy_(src)
        graph.replay()
        want = step(*values)
        torch.cuda.synchronize()
        for name, x, y in zip(("out", "lse", "dq", "dk", "dv"), static_out, want):
            assert_bitwise_equal(x, y, name)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_wgmma_block_sparse_strides_and_unaligned(rng):
    b1, b2 = block_sizes(64, "float16", "wgmma")
    nq, nk = 3 * b1 + 5, 2 * b2 + 77
    mask = BlockMask.random(0.5, nq, nk, (b1, b2), nheads=3, seed=int(rng.integers(1 << 31)))
    q, k, v = make_qkv_arrays(rng, 2, nq, nk, 3, 64, "bfloat16", "torch", "kvpacked")
    dout = random_array(rng, (2, nq, 3, 64), "bfloat16", "torch")
    check_sparse(q, k, v, dout, "bfloat16", mask)
    bufs = [random_array(rng, (1, 1500, 2, 128 + 8), "float16", "torch") for _ in range(4)]
    q, k, v, dout = (b[..., 2:130] for b in bufs)
    check_all(q, k, v, dout, "float16", backend="wgmma", causal=True)


@pytest.mark.gpu
@pytest.mark.slow
@FUSED_MODES
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d", [32, 64, 96, 128])
def test_gpu_wgmma_fused_dq_large_within_twice_torch_error(rng, monkeypatch, d, dtype, causal, mode):
    use_dq_mode(monkeypatch, mode)
    q, k, v = make_qkv_arrays(rng, 2, 1000, 777, 2, d, dtype, "torch")
    dout = random_array(rng, (2, 1000, 2, d), dtype, "torch")
    check_all(q, k, v, dout, dtype, deterministic=False, backend="wgmma", causal=causal)


@pytest.mark.gpu
@pytest.mark.slow
@FUSED_MODES
def test_gpu_wgmma_fused_dq_columns_split_inside_a_swizzle_atom_strides_and_block_sparse(rng, monkeypatch, mode):
    """64-query dK/dV tiles at d=64: the two warpgroups take 32 columns each, inside one 64-column block
    of K's 128B-swizzled image; then the default tiles on a block mask and unaligned rows."""
    use_dq_mode(monkeypatch, mode)
    monkeypatch.setenv("NUMBA_FLASH_DKDV_TILES", "64,128,8,0")
    q, k, v = make_qkv_arrays(rng, 2, 1000, 777, 2, 64, "float16", "torch")
    dout = random_array(rng, (2, 1000, 2, 64), "float16", "torch")
    check_all(q, k, v, dout, "float16", deterministic=False, backend="wgmma", causal=True)
    monkeypatch.delenv("NUMBA_FLASH_DKDV_TILES")
    b1, b2 = block_sizes(64, "bfloat16", "wgmma")
    nq, nk = 3 * b1 + 5, 2 * b2 + 77
    mask = BlockMask.random(0.5, nq, nk, (b1, b2), nheads=3, seed=int(rng.integers(1 << 31)))
    q, k, v = make_qkv_arrays(rng, 2, nq, nk, 3, 64, "bfloat16", "torch", "kvpacked")
    dout = random_array(rng, (2, nq, 3, 64), "bfloat16", "torch")
    _, _, grads = run_mma(q, k, v, dout, "bfloat16", deterministic=False, backend="wgmma", block_mask=mask)
    dense = mask.to_dense()
    ref = nf.attention_reference_backward(dout, q, k, v, mask=dense)
    theirs = torch_lowp(q, k, v, dout, "bfloat16", mask=dense)[1:]
    for name, ours, r, th in zip(("dq", "dk", "dv"), grads, ref, theirs):
        assert_within_budget(name, ours, r, th)
    bufs = [random_array(rng, (1, 1500, 2, 128 + 8), "float16", "torch") for _ in range(4)]
    q, k, v, dout = (b[..., 2:130] for b in bufs)
    check_all(q, k, v, dout, "float16", deterministic=False, backend="wgmma", causal=True)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("ring,pingpong", [(2, False), (3, False), (2, True), (3, True)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype,d", [("float16", 64), ("bfloat16", 128), ("float16", 128)])
def test_gpu_wgmma_warp_specialised_forward_matches_default_bitwise(rng, monkeypatch, d, dtype, causal, ring,
                                                                    pingpong):
    q, k, v = make_qkv_arrays(rng, 2, 1000, 777, 2, d, dtype, "torch")
    check_ring_matches_default_bitwise(monkeypatch, q, k, v, dtype, ring, pingpong, causal=causal)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("ring,pingpong,persistent", [(2, True, True), (3, True, False), (3, False, True)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype,d", [("float16", 64), ("bfloat16", 128)])
def test_gpu_wgmma_tma_producer_matches_cp_async_bitwise(rng, monkeypatch, d, dtype, causal, ring, pingpong,
                                                         persistent):
    q, k, v = make_qkv_arrays(rng, 2, 1000, 777, 2, d, dtype, "torch")
    check_tma_matches_cp_async_bitwise(monkeypatch, q, k, v, dtype, ring, True, pingpong, persistent,
                                       causal=causal)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("deterministic", [True, False], ids=["dq-kernel", "fused-dq"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype,d", [("float16", 64), ("bfloat16", 128)])
def test_gpu_wgmma_backward_tma_streams_match_cp_async_bitwise(rng, monkeypatch, d, dtype, causal, deterministic):
    q, k, v = make_qkv_arrays(rng, 2, 1000, 777, 2, d, dtype, "torch")
    dout = random_array(rng, (2, 1000, 2, d), dtype, "torch")
    check_bwd_tma_matches_cp_async_bitwise(monkeypatch, q, k, v, dout, dtype, True, deterministic, causal=causal)
