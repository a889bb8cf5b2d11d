"""``python -m paper_repro``: run the paper's experiments on this machine and regenerate REPORT.md."""
from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

from . import EXPERIMENTS


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m paper_repro",
        description="Re-run the FlashAttention paper's speed, memory, IO and sequence-length experiments "
                    "with numba_flash next to PyTorch's attention, write results/<gpu>/<name>.json and .png, "
                    "and regenerate paper_repro/REPORT.md. Without a GPU everything runs under Numba's CUDA "
                    "simulator at toy sizes into results/simulator/ (not a measurement).",
        epilog="experiments: " + ", ".join(EXPERIMENTS))
    p.add_argument("--quick", action="store_true",
                   help="shorter sweeps and fewer training steps (a few minutes on one GPU)")
    p.add_argument("--only", nargs="+", metavar="NAME", choices=EXPERIMENTS,
                   help="run these experiments only (the report still shows the others' last results)")
    p.add_argument("--out", type=Path, help="results folder (default paper_repro/results/<gpu>, with the "
                                            "report regenerated as paper_repro/REPORT.md); with --out the "
                                            "report of this run is written into it, as REPORT.md")
    p.add_argument("--simulate", action="store_true",
                   help="run under Numba's CUDA simulator even where a GPU is present")
    p.add_argument("--report-only", action="store_true", help="only regenerate REPORT.md from saved results")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    from numba_flash import runtime

    from . import common, report

    if args.report_only:
        print(f"wrote {report.write()}")
        return 0
    if args.simulate and not runtime.simulator_active() and not runtime.use_simulator_here():
        return runtime.rerun_under_simulator(["-m", "paper_repro", *argv])
    simulate = runtime.select()
    if simulate:
        print(common.NOT_A_MEASUREMENT + ".", flush=True)
    ctx = common.Context(quick=args.quick, simulate=simulate, argv=argv,
                         out=args.out or common.RESULTS / common.gpu_slug(simulate))
    failed = []
    for name in args.only or EXPERIMENTS:
        mod = importlib.import_module(f"paper_repro.{name}")
        t0 = time.perf_counter()
        print(f"== {mod.TITLE}", flush=True)
        try:
            result = mod.run(ctx)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        path, saved = common.save(ctx, name, result)
        try:
            mod.plot(saved, ctx.out / f"{name}.png", simulate)
            print(mod.summary(saved), flush=True)
        except Exception:
            traceback.print_exc()
            failed.append(f"{name} (plot or summary)")
        print(f"-> {path} ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"wrote {report.write_folder(ctx.out) if args.out else report.write(ctx.out.parent)}")
    if failed:
        print("FAILED: " + ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
