"""``python -m numba_flash.bench``: benchmark numba_flash against PyTorch attention on one GPU.

Columns are the implementations of :mod:`numba_flash.bench.impls` (numba_flash, naive attention, the
SDPA flash / memory-efficient / cuDNN backends; FlexAttention and numba_flash with deterministic=False
on request). A backend that refuses a configuration (flash with float32, ...) is reported as ``n/a``;
one that runs out of memory (naive attention at large N) as ``OOM``. TFLOP/s count ``4 B H N^2 d``
per forward (halved when causal), x2.5 for the backward pass, x3.5 for forward+backward. "Peak extra
memory" is torch's ``max_memory_allocated`` during one forward minus what was allocated before it.

Usage::

    python -m numba_flash.bench                       # the full sweep
    python -m numba_flash.bench --quick --check --out benchmarks/results/quick
    python -m numba_flash.bench --d 64 --seqlen 4096 --dtype float16 --causal 0 --pass fwd \\
        --impl numba_flash,sdpa_flash
    python -m numba_flash.bench --sparse              # block-sparse: time vs density
    python -m numba_flash.bench --simulate            # no GPU: tiny, under the simulator, timings meaningless

This module imports torch only once the arguments are parsed, so ``--help`` works without it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .problem import CHECK_SIZE, DEFAULT_IMPLS, DTYPE_ALIASES, DTYPE_NAMES, IMPLS, PASSES, Config

FULL_SWEEP = dict(d=(64, 128), seqlen=(512, 1024, 2048, 4096, 8192, 16384),
                  dtype=("float32", "float16"), causal=(False, True), passes=PASSES)
QUICK_SWEEP = dict(d=(64,), seqlen=(1024, 4096), dtype=("float32", "float16"),
                   causal=(False, True), passes=PASSES)
SPARSE_SWEEP = dict(d=(64,), seqlen=(4096, 8192), dtype=("float16",),
                    densities=(1.0, 0.5, 0.25, 0.125), passes=("fwd", "fwd+bwd"))
SIM_SWEEP = dict(batch=1, nheads=2, d=16, seqlen=(32, 64), dtype="float32")


def run_simulated(args) -> int:
    """Tiny numba_flash-only sweep on CPU torch tensors through Numba's CUDA simulator."""
    import dataclasses
    import statistics

    import torch

    import numba_flash

    from .impls import make_inputs, pass_step
    from .measure import reference_outputs, rel_err
    from .report import environment, format_header, md_table, progress, write_report
    from .timing import first_line

    print("SIMULATED: Numba's CUDA simulator, CPU torch tensors, tiny sizes; timings are host "
          "seconds of the simulator and mean nothing for GPU performance.")
    print(format_header(environment(), "numba_flash benchmark (simulated)"))
    s = SIM_SWEEP
    causals = args.causal if args.causal is not None else (False, True)
    seqlens = args.seqlen or s["seqlen"]
    passes = args.passes or ("fwd", "fwd+bwd")
    rows, payload, failed = [], [], False
    cases = [(causal, n) for causal in causals for n in seqlens]
    for causal, n in progress(cases, "simulated configurations"):
        cfg = Config(s["batch"], n, s["nheads"], s["d"], s["dtype"], causal)
        q, k, v, dout = make_inputs(cfg, device="cpu")
        ref = reference_outputs(q, k, v, dout, causal)
        errors = {}
        try:
            out = numba_flash.flash_attn_func(q, k, v, causal=causal)
            grads = torch.autograd.grad(out, (q, k, v), dout)
            errors = {name: rel_err(x, r)
                      for name, x, r in zip(("out", "dq", "dk", "dv"), (out, *grads), ref)}
        except Exception as e:
            print(f"{cfg.label()}: {first_line(e, 300)}")
            failed = True
            continue
        failed |= not max(errors.values()) <= 1e-5
        for pass_ in passes:
            step = pass_step(pass_, lambda: numba_flash.flash_attn_func(q, k, v, causal=causal),
                             q, k, v, dout)
            seconds = []
            for _ in range(args.sim_reps):
                q.grad = k.grad = v.grad = None
                t0 = time.perf_counter()
                step()
                seconds.append(time.perf_counter() - t0)
            ms = statistics.median(seconds) * 1e3
            rows.append([n, "causal" if causal else "non-causal", pass_, f"{ms:.0f}",
                         " ".join(f"{name}={e:.1e}" for name, e in errors.items())])
            payload.append({"seqlen": n, "causal": causal, "pass": pass_,
                            "simulated_ms": ms, "errors": errors, **dataclasses.asdict(cfg)})
    text = (f"B={s['batch']}, H={s['nheads']}, d={s['d']}, {s['dtype']}; median of "
            f"{args.sim_reps} runs; errors ‖x − ref‖/‖ref‖ against float64\n\n"
            + "\n".join(md_table(["N", "mask", "pass", "host ms (simulated)", "rel. errors"], rows))
            + "\n")
    print(text)
    if args.out:
        for f in write_report(args.out, text, {"simulated": True, "results": payload}):
            print(f"wrote {f}")
    if failed:
        print("FAILED: an error above exceeds 1e-5 or a call raised")
    return 1 if failed else 0


def _list(convert):
    def parse(text):
        return tuple(convert(t.strip()) for t in text.split(",") if t.strip())
    return parse


def _dtype(name):
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_NAMES:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; choose from {', '.join(DTYPE_NAMES)}")
    return name


def _bool01(text):
    if text.lower() in ("0", "false", "no", "non-causal"):
        return False
    if text.lower() in ("1", "true", "yes", "causal"):
        return True
    raise argparse.ArgumentTypeError(f"causal must be 0 or 1, got {text!r}")


def _choice(options):
    def parse(text):
        if text not in options:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(options)}")
        return text
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m numba_flash.bench",
        description="Time numba_flash against PyTorch naive attention, SDPA backends and "
                    "FlexAttention (TFLOP/s, peak forward memory). Lists are comma-separated.")
    p.add_argument("--d", type=_list(int), help="head dims (default 64,128)")
    p.add_argument("--seqlen", "--N", type=_list(int),
                   help="sequence lengths (default 512,...,16384)")
    p.add_argument("--dtype", type=_list(_dtype), help="float32,float16 (default both)")
    p.add_argument("--causal", type=_list(_bool01), help="0,1 (default both)")
    p.add_argument("--pass", dest="passes", type=_list(_choice(PASSES)),
                   help="fwd,bwd,fwd+bwd (default all)")
    p.add_argument("--impl", type=_list(_choice(IMPLS)),
                   help=f"implementations (default {','.join(DEFAULT_IMPLS)}; also: "
                        f"{','.join(i for i in IMPLS if i not in DEFAULT_IMPLS)})")
    p.add_argument("--tokens", type=int, default=16384, help="batch × seqlen (default 16384)")
    p.add_argument("--hidden", type=int, default=2048, help="nheads × d (default 2048)")
    p.add_argument("--quick", action="store_true",
                   help="d=64, N=1024,4096, both dtypes, causal and not")
    p.add_argument("--check", action="store_true",
                   help="check each implementation against float64 at a small size first")
    p.add_argument("--out", help="write PATH.md and PATH.json")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--no-triton", action="store_true", help="time with the own CUDA-event loop")
    p.add_argument("--sparse", action="store_true",
                   help="block-sparse mode: time vs density (random, butterfly masks) "
                        "against dense numba_flash and FlexAttention")
    p.add_argument("--densities", type=_list(float),
                   help="random-mask densities for --sparse (default 1,0.5,0.25,0.125)")
    p.add_argument("--simulate", action="store_true",
                   help="without a GPU: tiny numba_flash-only run under Numba's CUDA simulator")
    p.add_argument("--sim-reps", type=int, default=3, help=argparse.SUPPRESS)
    return p


def _resolve(args, sweep) -> dict:
    return {"d": args.d or sweep["d"], "seqlen": args.seqlen or sweep["seqlen"],
            "dtype": args.dtype or sweep["dtype"],
            "causal": args.causal if args.causal is not None else sweep.get("causal", (False,)),
            "passes": args.passes or sweep["passes"]}


def run_sweep(args) -> int:
    from .measure import check_config, measure_config
    from .report import format_checks, format_header, format_sweep, environment, write_report
    from .timing import Timing

    sweep = _resolve(args, QUICK_SWEEP if args.quick else FULL_SWEEP)
    impls = args.impl or DEFAULT_IMPLS
    timing = Timing(args.warmup_ms, args.rep_ms, use_triton=not args.no_triton)
    meta = environment(timing.describe())
    meta["sweep"] = {"tokens": args.tokens, "hidden": args.hidden, **sweep, "impls": impls}
    header = format_header(meta)
    print(header, flush=True)

    checks = []
    if args.check:
        for d in sweep["d"]:
            for dtype in sweep["dtype"]:
                for causal in sweep["causal"]:
                    cfg = Config(CHECK_SIZE["batch"], CHECK_SIZE["seqlen"], CHECK_SIZE["nheads"],
                                 d, dtype, causal)
                    checks += check_config(cfg, impls)
        print(format_checks(checks), flush=True)

    records, printed = [], 0
    for d in sweep["d"]:
        for dtype in sweep["dtype"]:
            for causal in sweep["causal"]:
                for n in sweep["seqlen"]:
                    cfg = Config.from_tokens(args.tokens, args.hidden, n, d, dtype, causal)
                    t0 = time.perf_counter()
                    records += measure_config(cfg, impls, sweep["passes"], timing)
                    print(f"[{cfg.label()}: {time.perf_counter() - t0:.1f} s]", file=sys.stderr,
                          flush=True)
                # Print (and save) each (d, dtype, causal) group as soon as it is complete.
                print(format_sweep(records[printed:], impls, sweep["passes"]), flush=True)
                printed = len(records)
                if args.out:
                    body = (header + "\n" + (format_checks(checks) + "\n" if checks else "")
                            + format_sweep(records, impls, sweep["passes"]))
                    write_report(args.out, body, {"meta": meta, "checks": checks,
                                                  "results": records})
    if args.out:
        print(f"wrote {Path(args.out).with_suffix('.md')} and {Path(args.out).with_suffix('.json')}")
    bad = [c for c in checks if c["status"] in ("FAIL", "error")]
    if bad:
        print(f"CHECK FAILED for: {', '.join(sorted({c['impl'] for c in bad}))}")
        return 1
    return 0


def run_sparse(args) -> int:
    from .measure import measure_sparse
    from .report import environment, format_header, format_sparse, write_report
    from .timing import Timing

    sweep = _resolve(args, dict(SPARSE_SWEEP, causal=(False,)))
    passes = tuple(p for p in sweep["passes"] if p in ("fwd", "fwd+bwd")) or ("fwd", "fwd+bwd")
    densities = args.densities or SPARSE_SWEEP["densities"]
    impls = tuple(i for i in (args.impl or ("numba_flash", "flex")) if i in ("numba_flash", "flex"))
    timing = Timing(args.warmup_ms, args.rep_ms, use_triton=not args.no_triton)
    meta = environment(timing.describe())
    meta["sweep"] = {"tokens": args.tokens, "hidden": args.hidden, "mode": "sparse",
                     "densities": densities, **sweep, "passes": passes}
    header = format_header(meta, "numba_flash block-sparse benchmark")
    print(header, flush=True)
    records = []
    for d in sweep["d"]:
        for dtype in sweep["dtype"]:
            for n in sweep["seqlen"]:
                cfg = Config.from_tokens(args.tokens, args.hidden, n, d, dtype, False)
                t0 = time.perf_counter()
                new = measure_sparse(cfg, densities, passes, timing, impls)
                print(f"[{cfg.label()}: {time.perf_counter() - t0:.1f} s]", file=sys.stderr,
                      flush=True)
                print(format_sparse(new), flush=True)
                records += new
                if args.out:
                    write_report(args.out, header + "\n" + format_sparse(records),
                                 {"meta": meta, "results": records})
    if args.out:
        print(f"wrote {Path(args.out).with_suffix('.md')} and {Path(args.out).with_suffix('.json')}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import torch
    except ImportError:
        print("numba_flash.bench needs torch: pip install -e \".[torch]\" (see the README)")
        return 1
    from numba_flash import runtime

    simulated = runtime.simulator_active()
    if not simulated and torch.cuda.is_available() and runtime.gpu_present():
        return run_sparse(args) if args.sparse else run_sweep(args)
    if not args.simulate:
        print("numba_flash.bench needs a CUDA GPU (torch.cuda and numba.cuda); "
              + ("Numba's CUDA simulator is on." if simulated else "none found.")
              + " Use --simulate for a tiny run under the simulator (timings meaningless).")
        return 0
    if args.sparse:
        print("--sparse needs a GPU (128×128 blocks are too large for the simulator); "
              "running the dense simulated sweep instead.")
    if not simulated:
        return runtime.rerun_under_simulator(["-m", "numba_flash.bench",
                                      *(sys.argv[1:] if argv is None else argv)])
    return run_simulated(args)
