"""The host side of a call: the answers it keeps between calls never go stale, and the shortcuts it takes
(the torch wrapper's checks reused by the API, one description per array) give the same results.

Every call on a GPU spends host time on checks, plans and launch parameters; at N <= 2k (and on sparse
masks) that time decides the speed. What is kept: tile choices per environment override, the views of a
mask's lists per list set, the framework of an array type. Each test here changes what a kept answer
depends on and checks that the next call sees the change.
"""
import numpy as np
import pytest

import numba_flash as nf
from numba_flash import api, interop
from numba_flash.kernels import configs
from numba_flash.kernels.driverlaunch import ArgPacker, DeviceBuffer
from conftest import SIMULATOR, assert_bitwise_equal, host_raw, make_qkv_arrays, torch

host_only = pytest.mark.skipif(not SIMULATOR, reason="host-side logic on host arrays: the simulator's")

INT64_MIN, INT64_MAX = -2**63, 2**63 - 1


def test_tiles_follow_the_environment_override_call_after_call(monkeypatch):
    monkeypatch.setattr(configs, "SIMULATOR", False)          # the GPU's tile table, kept per answer
    monkeypatch.delenv("NUMBA_FLASH_FWD_TILES", raising=False)
    default = configs.tiles("wgmma", "fwd", 64)
    assert configs.tiles("wgmma", "fwd", 64) is default        # kept
    before = configs.mask_tile("wgmma", 64)
    other = configs.MmaTiles(192, 64, 12, a_regs=False, ring=3)     # parsed only: nothing compiles it
    monkeypatch.setenv("NUMBA_FLASH_FWD_TILES", other.override())
    assert configs.tiles("wgmma", "fwd", 64) == other != default
    assert configs.mask_tile("wgmma", 64)[0] == 3 * before[0]  # the mask tile sees it too (lcm with 128)
    monkeypatch.delenv("NUMBA_FLASH_FWD_TILES")
    assert configs.tiles("wgmma", "fwd", 64) == default
    assert configs.mask_tile("wgmma", 64) == before
    # the backward's shared variable, and its own one taking precedence
    monkeypatch.setenv("NUMBA_FLASH_BWD_TILES", "64,64,4,0")
    assert configs.tiles("wgmma", "dq", 64) == configs.MmaTiles(64, 64, 4, a_regs=False)
    monkeypatch.setenv("NUMBA_FLASH_DQ_TILES", "64,128,4,0")
    assert configs.tiles("wgmma", "dq", 64) == configs.MmaTiles(64, 128, 4, a_regs=False)


@host_only
def test_mask_list_views_are_kept_per_list_set_and_bounded(rng, monkeypatch):
    monkeypatch.setattr(api, "_list_views_cache", {})
    monkeypatch.setattr(api, "_LIST_VIEWS_KEPT", 3)
    q, k, v = make_qkv_arrays(rng, 1, 64, 64, 2, 16, "float32", "numpy")
    p = api.check_qkv(q, k, v)
    masks = [nf.BlockMask.random(0.5, seed=int(rng.integers(1 << 30)), seqlen_q=64, seqlen_k=64,
                                 block_size=(32, 32)) for _ in range(5)]
    first = api.TileLists(p, masks[0]).views
    assert api.TileLists(p, masks[0]).views is first                 # the same lists: kept
    second = api.TileLists(p, masks[1]).views
    assert second is not first
    assert np.array_equal(host_raw(second[1].flat), masks[1].kv_index.reshape(-1))
    for m in masks[2:]:
        api.TileLists(p, m)
    assert len(api._list_views_cache) == 3                           # the oldest went
    # a MaskLists of other arrays (autograd's tensors, say) has views of its own
    ml = api.mask_lists_of(masks[4], p)
    copy = api.MaskLists(*(host_raw(a) for a in (ml.kv_count, ml.kv_index, ml.q_count, ml.q_index)),
                         ml.block_q, ml.block_k)
    views = api.TileLists(p, copy).views
    assert views is not api.TileLists(p, ml).views
    assert np.array_equal(host_raw(views[1].flat), host_raw(ml.kv_index).reshape(-1))


@pytest.mark.parametrize("framework", ["numpy", "torch"] if SIMULATOR else ["torch"])
def test_a_view_from_a_given_description_is_the_described_view(rng, framework):
    q = make_qkv_arrays(rng, 2, 24, 24, 3, 16, "float16", framework, layout="bhsd")[0]
    desc = interop.describe(q, "q")
    a, b = interop.flat_view(q, "q"), interop.flat_view(q, "q", desc)
    assert (a.shape, a.strides, a.dtype, a.framework, a.device, a.ptr) == \
        (b.shape, b.strides, b.dtype, b.framework, b.device, b.ptr)
    assert a.strides[1] != 3 * 16                    # a transposed view: not what a fresh array has


@host_only
def test_a_fresh_array_is_described_as_describe_would(rng):
    q, k, v = make_qkv_arrays(rng, 2, 16, 8, 3, 16, "float32", "numpy")
    p = api.check_qkv(q, k, v)
    for shape in ((2, 16, 3, 16), (2, 3, 16), (0, 3, 16)):
        x, desc = api._new_array(p, shape, "float32")
        if 0 in shape:      # no elements: strides are the framework's whim (numpy: 0), and never used
            assert desc[:2] + desc[3:] == interop.describe(x, "x")[:2] + interop.describe(x, "x")[3:]
        else:
            assert desc == interop.describe(x, "x")


def test_framework_of_decides_torch_and_numpy_by_type_and_still_refuses_others():
    assert interop.framework_of(np.zeros(2)) == "numpy"
    assert interop.framework_of(np.zeros(2)) == "numpy"
    if torch is not None:
        assert interop.framework_of(torch.zeros(2)) == "torch"
        assert interop.framework_of(torch.nn.Parameter(torch.zeros(2))) == "torch"
    assert interop.framework_of([1.0, 2.0]) is None
    assert interop.framework_of("q") is None


def test_flatten_takes_int64_extremes_at_top_level_and_in_tuples_and_refuses_beyond():
    buf = DeviceBuffer(0x7f0000000000, 10, np.float32)
    key, values = ArgPacker.flatten((INT64_MIN, (INT64_MAX, 3, (buf, 2)), INT64_MAX))
    assert values == [INT64_MIN, INT64_MAX, 3, 0, 0, 10, 4, buf.ptr, 10, 4, 2, INT64_MAX]
    assert key == [int, "(", int, int, "(", "f", int, ")", ")", int]
    for bad in (INT64_MAX + 1, INT64_MIN - 1):
        with pytest.raises(OverflowError):
            ArgPacker.flatten((bad,))
        with pytest.raises(OverflowError):
            ArgPacker.flatten(((1, bad),))
    with pytest.raises(TypeError, match="str"):
        ArgPacker.flatten(((1, "x"),))


@pytest.mark.skipif(torch is None, reason="needs torch")
@pytest.mark.parametrize("dtype,causal", [("float32", False), ("float16", True)])
def test_autograd_with_the_wrappers_checks_is_bitwise_the_api(rng, dtype, causal):
    """flash_attn_func hands its checks of q, k, v to the API's forward and, through autograd's context,
    to the backward: the same outputs and gradients, bit for bit, as the API checking for itself."""
    q, k, v = make_qkv_arrays(rng, 1, 24, 20, 2, 16, dtype, "torch")
    dout = make_qkv_arrays(rng, 1, 24, 24, 2, 16, dtype, "torch")[0]
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = nf.flash_attn_func(qg, kg, vg, causal=causal, return_lse=True)
    grads = torch.autograd.grad(out, (qg, kg, vg), dout)
    out_api, lse_api = api.flash_attn_forward(q, k, v, causal=causal)
    grads_api = api.flash_attn_backward(dout, q, k, v, out_api, lse_api, causal=causal)
    assert_bitwise_equal(out.detach(), out_api, "out")
    assert_bitwise_equal(lse.detach(), lse_api, "lse")
    for name, g, ga in zip("qkv", grads, grads_api):
        assert_bitwise_equal(g, ga, f"d{name}")


@pytest.mark.skipif(torch is None, reason="needs torch")
def test_host_emulation_records_the_gpu_launches_and_compare_tells_a_change(tmp_path):
    """tools/host_emulate.py runs the GPU host path on CPU tensors in a child process (it needs
    NUMBA_ENABLE_CUDASIM=0): what it records is the launch sequence of a wgmma plan (forward, then the
    backward's prepare, dK/dV and dQ kernels), and comparing a changed record fails."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tool = os.path.join(root, "tools", "host_emulate.py")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    done = subprocess.run([sys.executable, tool, "record", str(a), "--quick"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    calls = json.loads(a.read_text())["calls"]
    assert len(calls) == 4
    kernels = [launch[0] for launch in calls["float16 d=64 causal=False mask=False det=True"]]
    assert kernels[:4] == ["flash_fwd", "bwd_prepare", "flash_bwd_dkdv", "flash_bwd_dq"]
    masked = calls["float16 d=64 causal=True mask=True det=True"]
    no_address = [launch for launch in masked if "address" not in launch[5]]
    assert not no_address, f"launches with no (masked) device address: {no_address[:3]}"
    same = subprocess.run([sys.executable, tool, "compare", str(a), str(a)], capture_output=True, text=True)
    assert same.returncode == 0, same.stdout
    record = json.loads(a.read_text())
    record["calls"]["float16 d=64 causal=True mask=False det=True"][0][1][0] += 1       # one grid changed
    b.write_text(json.dumps(record))
    changed = subprocess.run([sys.executable, tool, "compare", str(a), str(b)], capture_output=True, text=True)
    assert changed.returncode == 1 and "1 of 4 call sets differ" in changed.stdout
