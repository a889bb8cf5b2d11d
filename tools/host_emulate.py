"""The GPU host path without a GPU: time it, and record what it launches.

A call's host work (checks, plans, allocations, views, tensor maps, launch parameters) runs here on CPU
torch tensors standing in for CUDA ones, as it would on a GPU of the given compute capability; only what
needs the device is stubbed: the kernel launch itself (the parameters are still packed into the driver's
buffer layout), the tensor-map encoding and copies, the current stream and context. Kernels are not
compiled. So on a machine without a GPU:

    time      host microseconds per call: the API's forward and backward, the torch wrapper, autograd
              steps (this CPU's: compare two trees on one machine, never against a GPU host's numbers)
    record    every launch of a fixed set of calls (kernel, grid, block, shared memory, parameter layout
              and values with device addresses masked) as JSON
    compare   two records: a host-path change that must not change what runs shows no difference

    python tools/host_emulate.py time [--tree DIR] [--capability 9,0]
    python tools/host_emulate.py record OUT.json [--tree DIR] [--capability 9,0] [--quick]
    python tools/host_emulate.py compare A.json B.json

--tree: the numba_flash checkout to import (default: this one), e.g. the previous commit's
(`git worktree add /tmp/before HEAD~1`). Used on 2026-12-07 to cut host time per call and to show that
the cut changed no launch (docs/PERFORMANCE.md).
"""
import argparse
import json
import os
import re
import struct
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADDRESS = 1 << 40           # where the stubbed driver allocates (tensor maps); larger values are addresses too


def emulate(tree, capability):
    """Import numba_flash from `tree` with its GPU host path running on CPU tensors; returns the modules."""
    os.environ["NUMBA_ENABLE_CUDASIM"] = "0"       # the GPU code path, not the simulator's
    sys.path.insert(0, tree)
    import numpy as np
    import torch  # noqa: F401
    import numba_flash as nf
    from numba_flash import api, interop
    from numba_flash.kernels import driverlaunch, launch, tma
    from numba_flash.kernels.driverlaunch import ArgPacker, DeviceBuffer
    assert os.path.abspath(nf.__file__).startswith(os.path.abspath(tree)), nf.__file__

    describe = interop.describe

    def on_device_zero(x, name):                   # CPU tensors pass for CUDA device 0's
        fw, shape, strides, dtype, dev = describe(x, name)
        return fw, shape, strides, dtype, 0 if dev == "cpu" else dev

    interop.describe = on_device_zero
    api._capabilities[0] = capability
    interop.launch_stream = lambda framework, device: 0
    empty = interop.empty_like_framework
    interop.empty_like_framework = lambda framework, device, shape, dtype: empty(framework, "cpu", shape, dtype)
    interop.to_device_like = lambda a, framework, device: torch.from_numpy(np.array(a))

    class NoContext:
        def __init__(self, p):
            pass

        def __enter__(self):
            return None

        def __exit__(self, *exc):
            return None

    api._on_device = NoContext
    launch._sm_count = lambda: 132                 # an H100 SXM's
    driverlaunch.current_context = lambda: 0

    class Driver:                                  # tma.MapSlots' driver calls
        next_address = ADDRESS

        def device_alloc(self, nbytes):
            Driver.next_address += nbytes + 4096
            return Driver.next_address

        def host_alloc(self, nbytes):
            return np.zeros(nbytes // 8, np.uint64)

        def event(self):
            return 1

        def copy_async(self, *a):
            pass

        record = wait_host = stream_wait = memset32_async = copy_async

    tma._driver = Driver()
    tma.encode = lambda ptr, itemsize, dims, strides, box, swizzle: np.zeros(hopper_words(tma), np.uint64)
    tma.placeholder = lambda device: DeviceBuffer(ADDRESS, hopper_words(tma), np.uint64)

    launches = []

    def launch_call(self, grid, stream, *args):     # Launchable.__call__ up to cuLaunchKernel
        key, values = ArgPacker.flatten(args)
        packer = self._direct.get((0, *key))
        if packer is None:
            packer = self._direct[(0, *key)] = struct.Struct("<" + ArgPacker.struct_format(args))
        buf = bytearray(packer.size)
        packer.pack_into(buf, 0, *values)
        if emulate.recording:
            launches.append([self.kernel.py_func.__name__, list(grid), self.threads, self.smem_bytes,
                             packer.format, [_masked(v, c) for v, c in zip(values, _codes(packer.format))]])

    launch.Launchable.__call__ = launch_call
    emulate.recording = False
    return nf, api, torch, launches


def hopper_words(tma):
    return tma.hopper.TMAP_WORDS


def _codes(fmt):
    """The struct code of each value a parameter format packs ("<QQqqQqqB7x..." -> Q, Q, q, q, Q, q, q, B)."""
    return [c for c in re.findall(r"\d*([a-zA-Z?])", fmt) if c != "x"]


def _masked(v, code):
    """A parameter value as recorded: addresses (the unsigned 64-bit slots of an array: its data pointer;
    meminfo and parent are 0) masked, wherever the allocator put them (a GPU host's torch allocates CPU
    tensors below 2**32), floats rounded."""
    if isinstance(v, float):
        return round(v, 7)
    v = int(v)
    return "address" if (code == "Q" and v != 0) or abs(v) >= ADDRESS else v


def per_call_us(fn, calls=500, rounds=7):
    """Best of `rounds` averages over `calls` calls (microseconds)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def cmd_time(args):
    nf, api, torch, _ = emulate(args.tree, args.capability)
    B, N, H, d = 2, 1024, 16, 64
    q, k, v = (torch.randn(B, N, H, d, dtype=torch.float16) for _ in range(3))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = api.flash_attn_forward(q, k, v)
    dout = torch.randn_like(out)
    mask = nf.BlockMask.random(0.25, seed=0, seqlen_q=N, seqlen_k=N)
    steps = {
        "api forward": lambda: api.flash_attn_forward(q, k, v),
        "api forward, causal": lambda: api.flash_attn_forward(q, k, v, causal=True),
        "api forward, block mask": lambda: api.flash_attn_forward(q, k, v, block_mask=mask),
        "api backward": lambda: api.flash_attn_backward(dout, q, k, v, out, lse),
        "flash_attn_func forward, no grad": lambda: nf.flash_attn_func(q, k, v),
        "flash_attn_func forward": lambda: nf.flash_attn_func(qg, kg, vg),
        "flash_attn_func forward, block mask": lambda: nf.flash_attn_func(qg, kg, vg, block_mask=mask),
        "flash_attn_func forward + backward": lambda: torch.autograd.grad(nf.flash_attn_func(qg, kg, vg),
                                                                          (qg, kg, vg), dout),
    }
    print(f"host microseconds per call (this CPU), B={B} N={N} H={H} d={d} float16, "
          f"capability {args.capability}, numba_flash from {args.tree}")
    for name, fn in steps.items():
        print(f"| {name} | {per_call_us(fn):.1f} |", flush=True)


def cmd_record(args):
    nf, api, torch, launches = emulate(args.tree, args.capability)
    torch.manual_seed(0)
    dtypes = (torch.float16,) if args.quick else (torch.float16, torch.bfloat16, torch.float32)
    dims = (64,) if args.quick else (32, 64, 128)
    B, N, H = 2, 512, 4
    emulate.recording = True
    record = {}
    for dtype in dtypes:
        for d in dims:
            for causal in (False, True):
                for masked in (False, True):
                    for deterministic in ((True,) if args.quick else (True, False)):
                        name = f"{str(dtype)[6:]} d={d} causal={causal} mask={masked} det={deterministic}"
                        launches.clear()
                        q, k, v = (torch.randn(B, N, H, d, dtype=dtype) for _ in range(3))
                        q_t = torch.randn(B, H, N, d, dtype=dtype).transpose(1, 2)      # strided
                        mask = nf.BlockMask.random(0.5, seed=1, seqlen_q=N, seqlen_k=N) if masked else None
                        out, lse = api.flash_attn_forward(q_t, k, v, causal=causal, block_mask=mask)
                        api.flash_attn_backward(torch.randn_like(out), q_t, k, v, out, lse, causal=causal,
                                                block_mask=mask, deterministic=deterministic)
                        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
                        y = nf.flash_attn_func(qg, kg, vg, causal=causal, block_mask=mask,
                                               deterministic=deterministic)
                        torch.autograd.grad(y, (qg, kg, vg), torch.randn_like(y))
                        nf.scaled_dot_product_attention(qg.transpose(1, 2), kg.transpose(1, 2),
                                                        vg.transpose(1, 2), is_causal=causal)
                        record[name] = list(launches)
    with open(args.out, "w") as f:
        json.dump({"capability": args.capability, "tree": args.tree, "calls": record}, f)
    print(f"{sum(len(x) for x in record.values())} launches of {len(record)} call sets -> {args.out}")


def cmd_compare(args):
    a, b = (json.load(open(p))["calls"] for p in (args.a, args.b))
    if a.keys() != b.keys():
        print(f"different call sets: {sorted(a.keys() ^ b.keys())[:5]}")
        return 1
    differ = [name for name in a if a[name] != b[name]]
    for name in differ[:5]:
        for i, (x, y) in enumerate(zip(a[name], b[name])):
            if x != y:
                print(f"{name}, launch {i} ({x[0]}): {x[:5]} / {y[:5]}")
                break
        else:
            print(f"{name}: {len(a[name])} against {len(b[name])} launches")
    print(f"{len(differ)} of {len(a)} call sets differ ({sum(len(x) for x in a.values())} launches)")
    return 1 if differ else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("time", "record"):
        p = sub.add_parser(name)
        if name == "record":
            p.add_argument("out")
            p.add_argument("--quick", action="store_true", help="float16, d=64, deterministic only")
        p.add_argument("--tree", default=HERE, help="numba_flash checkout to import (default: this one)")
        p.add_argument("--capability", default="9,0", help="compute capability to plan for (default 9,0)")
    p = sub.add_parser("compare")
    p.add_argument("a")
    p.add_argument("b")
    args = ap.parse_args(argv)
    if args.cmd != "compare":
        args.tree = os.path.abspath(args.tree)
        args.capability = tuple(int(x) for x in args.capability.split(","))
    return {"time": cmd_time, "record": cmd_record, "compare": cmd_compare}[args.cmd](args) or 0


if __name__ == "__main__":
    sys.exit(main())
