"""One forward + backward of every tile configuration, small and ragged, for compute-sanitizer.

    compute-sanitizer --tool racecheck --racecheck-report hazard python tools/sanitize.py [CASE ...]
    compute-sanitizer --tool memcheck python tools/sanitize.py [CASE ...]
    compute-sanitizer --tool synccheck python tools/sanitize.py [CASE ...]

(tests/test_sanitizer.py runs every tool on every case, one process each, so they compile in parallel
under pytest -n.)

The simulator cannot see a missing barrier or an out-of-bounds shared access; these tools can. Covered:
every path, each head-dim class that has its own tiles (d <= 64, <= 128, > 128), float16 and bfloat16 on
tensor cores, rows that are 16-byte aligned (cp.async) and rows that are not (plain loads), causal with
seqlen_q != seqlen_k, a block-sparse mask, and every way the tensor-core backward computes dQ (the
separate "kernel" by default, and "atomic" and "bulk", fused into dK/dV; configs.DQ_MODES), the
warp-specialised wgmma forward (MmaTiles.ring: a producer warpgroup and mbarriers), the wgmma dK/dV
kernel's own dQ in both of its warpgroup splits, the persistent forward (work tiles in a fixed or a
dynamic order, causal ones in L2-sized sections of heads), three consumer warpgroups, the TMA producer and
the backward's TMA streams, and the split-TF32 forward (warp-specialised and not). Every result is checked
against the float64 reference, so a configuration that silently did nothing fails here too. Exit status 1
on a mismatch.
"""
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import numba_flash as nf  # noqa: E402
from numba_flash.kernels import walk  # noqa: E402

L2_SECTION = walk._L2_SECTION_BYTES
TOL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}


CASES = [
    # tensor cores: each head-dim class has its own tiles (d <= 64, <= 128, > 128); bf16, and rows that are
    # not 16-byte aligned (plain loads instead of cp.async); causal with seqlen_q != seqlen_k; block-sparse
    dict(path="mma", d=64, dtype="float16", causal=True, nq=200, nk=333, aligned=True, sparse=False),
    dict(path="mma", d=64, dtype="bfloat16", causal=False, nq=300, nk=150, aligned=False, sparse=False),
    dict(path="mma", d=128, dtype="float16", causal=True, nq=333, nk=200, aligned=True, sparse=False),
    dict(path="mma", d=256, dtype="bfloat16", causal=False, nq=200, nk=150, aligned=True, sparse=False),
    dict(path="mma", d=64, dtype="float16", causal=False, nq=384, nk=320, aligned=True, sparse=True),
    dict(path="mma", d=64, dtype="bfloat16", causal=True, nq=333, nk=333, aligned=True, sparse=False,
         dq="atomic"),
    dict(path="mma", d=128, dtype="float16", causal=False, nq=200, nk=333, aligned=False, sparse=True,
         dq="atomic"),
    dict(path="mma", d=256, dtype="float16", causal=True, nq=150, nk=200, aligned=True, sparse=False,
         dq="atomic"),
    # warpgroup MMA (Hopper): forward and backward (d = 256: the mma backward). Each head-dim class's tiles,
    # aligned and not, causal, and a mask of 128 x 128 blocks (the wgmma tiles are 128 x 128 at d <= 128)
    dict(path="wgmma", d=64, dtype="float16", causal=True, nq=200, nk=333, aligned=True, sparse=False),
    dict(path="wgmma", d=128, dtype="bfloat16", causal=False, nq=300, nk=150, aligned=False, sparse=False),
    dict(path="wgmma", d=256, dtype="float16", causal=True, nq=150, nk=200, aligned=True, sparse=False),
    dict(path="wgmma", d=64, dtype="bfloat16", causal=False, nq=384, nk=320, aligned=True, sparse=True,
         block=(128, 128)),
    # the warp-specialised wgmma forward (a producer warpgroup, an mbarrier ring of `ring` stages)
    dict(path="wgmma", d=128, dtype="float16", causal=True, nq=333, nk=500, aligned=True, sparse=False, ring=2),
    dict(path="wgmma", d=64, dtype="bfloat16", causal=False, nq=300, nk=700, aligned=False, sparse=True,
         block=(128, 128), ring=3),
    dict(path="wgmma", d=128, dtype="bfloat16", causal=True, nq=500, nk=333, aligned=True, sparse=False, ring=2,
         pingpong=True),
    dict(path="wgmma", d=128, dtype="float16", causal=True, nq=333, nk=500, aligned=True, sparse=False, ring=3,
         pingpong=True),
    # SIMT
    dict(path="simt", d=64, dtype="float32", causal=True, nq=200, nk=333, aligned=True, sparse=False),
    dict(path="simt", d=128, dtype="float16", causal=False, nq=300, nk=150, aligned=False, sparse=False),
    dict(path="simt", d=256, dtype="float32", causal=True, nq=150, nk=150, aligned=True, sparse=False),
    # the wgmma dK/dV kernel with its own dQ (deterministic=False): dS^T staged in shared memory for the
    # dQ and dK products; d=64 one 64-query block per warpgroup, d=128 the columns split between them,
    # and 64-query tiles at d=64 (columns split inside a swizzle atom)
    dict(path="wgmma", d=64, dtype="float16", causal=True, nq=333, nk=500, aligned=True, sparse=False,
         dq="atomic"),
    dict(path="wgmma", d=128, dtype="bfloat16", causal=False, nq=300, nk=260, aligned=False, sparse=True,
         block=(128, 128), dq="atomic"),
    dict(path="wgmma", d=64, dtype="bfloat16", causal=False, nq=200, nk=333, aligned=True, sparse=False,
         dq="atomic", dkdv_tiles="64,128,8,0"),
    # the persistent warp-specialised forward (MmaTiles.persistent) on a grid of 2 blocks, so each walks
    # several work tiles (ring, Q reload, ping-pong turns carried over); three consumer warpgroups
    dict(path="wgmma", d=64, dtype="float16", causal=True, nq=333, nk=200, aligned=True, sparse=False, ring=2,
         pingpong=True, persistent=True),
    dict(path="wgmma", d=128, dtype="bfloat16", causal=False, nq=300, nk=333, aligned=False, sparse=True,
         block=(128, 128), ring=3, pingpong=True, persistent=True),
    dict(path="wgmma", d=64, dtype="float16", causal=True, nq=400, nk=333, aligned=True, sparse=False, ring=2,
         consumers=3),
    # the producer copying by TMA (MmaTiles.tma: one thread, tensor maps, mbarrier transaction counts):
    # persistent on 2 blocks with the ping-pong, and a 3-stage ring on a block mask
    dict(path="wgmma", d=64, dtype="float16", causal=True, nq=333, nk=200, aligned=True, sparse=False, ring=2,
         pingpong=True, persistent=True, tma=True),
    dict(path="wgmma", d=128, dtype="bfloat16", causal=False, nq=300, nk=333, aligned=True, sparse=True,
         block=(128, 128), ring=3, pingpong=True, tma=True),
    # the backward's streamed tiles copied by TMA (MmaTiles.tma on the dK/dV and dQ tiles: one thread,
    # one mbarrier per buffer): both kernels, causal; the fused dQ's dK/dV kernel on a block mask
    dict(path="wgmma", d=64, dtype="float16", causal=True, nq=333, nk=500, aligned=True, sparse=False,
         bwd_tma=True),
    dict(path="wgmma", d=128, dtype="bfloat16", causal=False, nq=300, nk=333, aligned=True, sparse=True,
         block=(128, 128), dq="atomic", bwd_tma=True),
    # the fused dQ's bulk reductions (each warp's slab staged in shared memory, added by one
    # cp.reduce.async.bulk): d=64 one 64-query block per warpgroup, causal, TMA streams; d=128 the columns
    # split between the warpgroups (two column blocks of the accumulator), a block mask, rows not aligned
    dict(path="wgmma", d=64, dtype="float16", causal=True, nq=333, nk=500, aligned=True, sparse=False,
         dq="bulk"),
    dict(path="wgmma", d=128, dtype="bfloat16", causal=False, nq=300, nk=260, aligned=False, sparse=True,
         block=(128, 128), dq="bulk"),
    # the dynamic work order (MmaTiles.dynamic: the TMA producer draws work tiles from a counter and publishes
    # them in shared memory with each Q) on 2 blocks, causal with the ping-pong; and ring 3 on a block mask
    dict(path="wgmma", d=64, dtype="float16", causal=True, nq=700, nk=333, aligned=True, sparse=False, ring=2,
         pingpong=True, persistent=True, tma=True, dynamic=True),
    dict(path="wgmma", d=128, dtype="bfloat16", causal=False, nq=300, nk=333, aligned=True, sparse=True,
         block=(128, 128), ring=3, pingpong=True, persistent=True, tma=True, dynamic=True),
    # the causal persistent order in sections of one (batch, head) pair (walk.section_pairs with a 1-byte L2
    # budget), drawn from the counter and dealt round-robin (the d=64 causal default)
    dict(path="wgmma", d=64, dtype="float16", causal=True, nq=700, nk=700, aligned=True, sparse=False, ring=2,
         pingpong=True, persistent=True, tma=True, dynamic=True, l2_section=1),
    dict(path="wgmma", d=64, dtype="bfloat16", causal=True, nq=500, nk=640, aligned=True, sparse=False, ring=2,
         pingpong=True, persistent=True, tma=True, dynamic=False, l2_section=1),
    # split TF32 (float32 on tf32 wgmma; its backward runs the SIMT kernels): the default tiles at d = 64
    # and 128 (the synchronous body on pre-split images), aligned and not, causal and a block mask; the
    # synchronous body splitting in the block with the split of the next tile during the P V product
    # (MmaTiles.split_ahead); the warp-specialised forward whose producer warpgroup copies and splits into
    # a ring (2 and 4 stages, the ping-pong)
    dict(path="tf32", d=64, dtype="float32", causal=True, nq=333, nk=500, aligned=True, sparse=False),
    dict(path="tf32", d=128, dtype="float32", causal=False, nq=300, nk=260, aligned=False, sparse=True),
    dict(path="tf32", d=64, dtype="float32", causal=False, nq=300, nk=333, aligned=False, sparse=True,
         split_ahead=True),
    dict(path="tf32", d=128, dtype="float32", causal=True, nq=200, nk=333, aligned=True, sparse=False,
         split_ahead=True),
    dict(path="tf32", d=64, dtype="float32", causal=False, nq=300, nk=333, aligned=False, sparse=True,
         block=(128, 128), ring=2, pingpong=True),
    dict(path="tf32", d=32, dtype="float32", causal=True, nq=333, nk=200, aligned=True, sparse=False, ring=4),
    # tuning options measured faster at d = 64 (2026-12-07): the synchronous body on 64-key tiles (two
    # groups of 32 k-indices per V transpose, two column blocks of Vt), and a 4-stage ring
    dict(path="tf32", d=64, dtype="float32", causal=True, nq=333, nk=500, aligned=False, sparse=True,
         block=(128, 128), fwd_tiles="128,64,8,0,0,0,0,0,0,0,0,0"),
    dict(path="tf32", d=64, dtype="float32", causal=True, nq=500, nk=333, aligned=True, sparse=False, ring=4),
    # K and V split once into global images by a kernel of their own, which the synchronous body copies
    # (MmaTiles.presplit): 64-key tiles on a block mask with unaligned rows (Q by plain loads), three
    # warpgroups on 192-query tiles, d = 128, and two blocks per SM with a padded head dim (40 -> 48);
    dict(path="tf32", d=64, dtype="float32", causal=True, nq=333, nk=500, aligned=False, sparse=True,
         block=(128, 128), fwd_tiles="128,64,8,0,0,0,0,0,0,0,0,0,1"),
    dict(path="tf32", d=64, dtype="float32", causal=False, nq=400, nk=333, aligned=True, sparse=False,
         fwd_tiles="192,64,12,0,0,0,0,0,0,0,0,0,1"),
    dict(path="tf32", d=128, dtype="float32", causal=True, nq=200, nk=333, aligned=True, sparse=False,
         fwd_tiles="64,32,4,0,0,0,0,0,0,0,0,0,1"),
    dict(path="tf32", d=40, dtype="float32", causal=True, nq=300, nk=200, aligned=False, sparse=False,
         fwd_tiles="64,32,4,0,2,0,0,0,0,0,0,0,1"),
    # ... and the warp-specialised forward's producer copying them into a 3-stage ring, with the ping-pong,
    # on a block mask with unaligned rows
    dict(path="tf32", d=64, dtype="float32", causal=False, nq=300, nk=333, aligned=False, sparse=True,
         block=(128, 128), fwd_tiles="128,32,8,0,0,3,1,0,0,0,0,0,1"),
]


def rel(a, b):
    a, b = a.double().cpu().numpy(), np.asarray(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def run(c):
    if c["path"] in ("wgmma", "tf32") and torch.cuda.get_device_capability() != (9, 0):
        print(f"skip {c}: {c['path']} needs a cc 9.0 GPU", flush=True)
        return True
    os.environ["NUMBA_FLASH_DQ_MODE"] = c.get("dq", "")     # "": the default of the path
    os.environ["NUMBA_FLASH_FWD_TILES"] = ""
    os.environ["NUMBA_FLASH_DKDV_TILES"] = c.get("dkdv_tiles", "")
    os.environ["NUMBA_FLASH_DQ_TILES"] = ""
    if c.get("bwd_tma"):
        from numba_flash.kernels import configs
        for role, var in (("dkdv", "NUMBA_FLASH_DKDV_TILES"), ("dq", "NUMBA_FLASH_DQ_TILES")):
            os.environ[var] = replace(configs.tiles(c["path"], role, c["d"]), tma=True).override()
    os.environ["NUMBA_FLASH_RESIDENT_BLOCKS"] = "2" if c.get("persistent") else ""
    walk._L2_SECTION_BYTES = c.get("l2_section", L2_SECTION)     # read by walk.section_pairs at each launch
    if c.get("ring"):
        from numba_flash.kernels import configs
        t = configs.tiles(c["path"], "fwd", c["d"])
        br, warps = (64 * c["consumers"], 4 * c["consumers"]) if c.get("consumers") else (t.br, t.warps)
        os.environ["NUMBA_FLASH_FWD_TILES"] = replace(
            t, br=br, bc=32 if c["path"] == "tf32" else t.bc, warps=warps, a_regs=False, min_blocks=0,
            ring=c["ring"], pingpong=c.get("pingpong", False),
            late_pv_wait=False, persistent=c.get("persistent", False), tma=c.get("tma", False),
            dynamic=c.get("dynamic", False), presplit=False).override()   # tf32: the splitting producer
    if c.get("fwd_tiles"):
        os.environ["NUMBA_FLASH_FWD_TILES"] = c["fwd_tiles"]             # MmaTiles.override's order
    if c.get("split_ahead"):
        from numba_flash.kernels import configs
        os.environ["NUMBA_FLASH_FWD_TILES"] = replace(configs.tiles(c["path"], "fwd", c["d"]), ring=0,
                                                      pingpong=False, split_ahead=True,
                                                      presplit=False).override()
    g = torch.Generator(device="cuda").manual_seed(0)
    dt = getattr(torch, c["dtype"])
    pad = 0 if c["aligned"] else 2          # views 2 elements into their rows: no 16-byte alignment

    def rnd(n):
        x = torch.randn(1, n, 2, c["d"] + pad, device="cuda", dtype=dt, generator=g)
        return x[..., pad:]

    q, k, v = rnd(c["nq"]), rnd(c["nk"]), rnd(c["nk"])
    dout = rnd(c["nq"])
    mask = None
    if c["sparse"]:
        mask = nf.BlockMask.random(0.5, c["nq"], c["nk"], c.get("block", (128, 64)), nheads=2, seed=1)
    kw = dict(causal=c["causal"], block_mask=mask, backend=c["path"])
    out, lse = nf.flash_attn_forward(q, k, v, **kw)
    grads = nf.flash_attn_backward(dout, q, k, v, out, lse, **kw)
    torch.cuda.synchronize()
    dense = mask.to_dense() if mask is not None else None
    ref = (nf.attention_reference(q, k, v, causal=c["causal"], mask=dense)[0],
           *nf.attention_reference_backward(dout, q, k, v, causal=c["causal"], mask=dense))
    errs = [rel(x, r) for x, r in zip((out, *grads), ref)]
    ok = max(errs) < TOL[c["dtype"]]
    print(f"{'ok  ' if ok else 'FAIL'} {c} errors out/dq/dk/dv " + " ".join(f"{e:.1e}" for e in errs),
          flush=True)
    return ok


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="*", type=int, help=f"indices into CASES (0..{len(CASES) - 1}); default all")
    a = ap.parse_args(argv)
    chosen = [CASES[i] for i in (a.cases or range(len(CASES)))]
    results = [run(c) for c in chosen]
    print(f"{sum(results)} of {len(results)} configurations ran and matched the reference")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
