"""HBM traffic from the GPU's counters: each case's step runs once under Nsight Compute in one child process.

``measure(cases)`` writes the cases to a JSON file and runs

    ncu --clock-control none --cache-control all --print-units base --metrics <METRICS> \\
        -o <report> python -m paper_repro.hbm <cases.json>

then exports the report as CSV (``ncu --import <report> --csv --page raw``) and sums each metric over
every kernel of each case. The child (``main`` below) runs, for case i, a marker kernel with 1000 + i
blocks, the case's step (one forward, or forward + backward), and a marker with 5000 + i blocks: the
kernels between the two markers are the case's, whatever torch or numba_flash launch. ``--cache-control
all`` flushes the caches before each kernel, so every kernel's DRAM bytes are counted from a cold L2:
what one kernel moves through HBM, not what an earlier kernel left in the 50-60 MB L2.

Metrics: dram__bytes_read.sum and dram__bytes_write.sum (HBM), and the L2 sectors that the SMs read and
write (lts__t_sectors_srcunit_tex_op_{read,write}.sum, 32 bytes each): the traffic between the SMs and
the cache level in front of HBM, which is what the paper's IO model counts when a tile is re-read.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum", "lts__t_sectors_srcunit_tex_op_read.sum",
           "lts__t_sectors_srcunit_tex_op_write.sum")
GRID = "launch__grid_size"        # requested too, so the markers are found whatever columns the CSV has
SECTOR = 32
MARK_START, MARK_END = 1000, 5000


def ncu_path():
    exe = shutil.which("ncu")
    if exe:
        return exe
    for pattern in ("/usr/local/cuda/bin/ncu", "/opt/nvidia/nsight-compute/*/ncu", "/usr/local/cuda-*/bin/ncu"):
        found = sorted(glob.glob(pattern))
        if found:
            return found[-1]
    return None


def measure(cases, timeout_s=1800):
    """[{status, dram_read, dram_write, l2_read, l2_write, kernels}] (bytes) for each case (dicts as
    `_step` takes: impl, B, H, N, d, dtype, causal, passes, and optional fwd_tiles / block_mask_density),
    or raises RuntimeError with ncu's own message."""
    exe = ncu_path()
    if exe is None:
        raise RuntimeError("Nsight Compute (ncu) not found")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        spec, status_path = os.path.join(tmp, "cases.json"), os.path.join(tmp, "status.json")
        with open(spec, "w") as f:
            json.dump(cases, f)
        report = os.path.join(tmp, "report")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        env.pop("NUMBA_ENABLE_CUDASIM", None)
        for metrics in (METRICS, METRICS[:2]):   # the L2 metrics are a bonus: fall back to HBM only
            cmd = [exe, "--clock-control", "none", "--cache-control", "all", "--target-processes", "all",
                   "--metrics", ",".join((*metrics, GRID)), "-f", "-o", report, sys.executable, "-m", "paper_repro.hbm",
                   spec, status_path]
            run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
            if run.returncode == 0 and os.path.exists(report + ".ncu-rep"):
                break
        else:
            raise RuntimeError(f"ncu failed ({run.returncode}): {(run.stderr or run.stdout)[-800:]}")
        exported = subprocess.run([exe, "--import", report + ".ncu-rep", "--csv", "--page", "raw",
                                   "--print-units", "base"], capture_output=True, text=True, timeout=600)
        if exported.returncode != 0:
            raise RuntimeError(f"ncu --import failed: {exported.stderr[-800:]}")
        with open(status_path) as f:
            status = json.load(f)
    out = _attribute(exported.stdout, len(cases))
    for rec, st in zip(out, status):
        rec["status"] = st
    return out


def _num(text):
    """A CSV number as ncu prints it: '1,234,567', '1234.5' or '' (n/a)."""
    text = text.replace(",", "").strip()
    return float(text) if text and text.lower() != "n/a" else 0.0


def _grid_x(text):
    """'(1001, 1, 1)' or '1001' (blocks) -> 1001."""
    text = text.strip()
    if text.startswith("("):
        return int(text.strip("() ").split(",")[0])
    return int(_num(text))


def _attribute(csv_text, ncases):
    lines = [line for line in csv_text.splitlines() if line.startswith('"')]
    rows = list(csv.reader(lines))
    header, body = rows[0], rows[2:]          # rows[1] holds the units
    col = {name: i for i, name in enumerate(header)}
    out = [dict(dram_read=0.0, dram_write=0.0, l2_read=None, l2_write=None, kernels=0) for _ in range(ncases)]
    current = None
    grid_col = col.get("Grid Size", col.get(GRID))
    for row in body:
        name, grid = row[col["Kernel Name"]], row[grid_col]
        if "paper_repro_marker" in name:
            g = _grid_x(grid)
            current = g - MARK_START if MARK_START <= g < MARK_END else None
            continue
        if current is None or not 0 <= current < ncases:
            continue
        rec = out[current]
        rec["kernels"] += 1
        for key, metric in (("dram_read", METRICS[0]), ("dram_write", METRICS[1])):
            rec[key] += _num(row[col[metric]])
        for key, metric in (("l2_read", METRICS[2]), ("l2_write", METRICS[3])):
            if metric in col:
                rec[key] = (rec[key] or 0.0) + _num(row[col[metric]]) * SECTOR
    return out


# ---------------------------------------------------------------------------------------------
# the child process
# ---------------------------------------------------------------------------------------------

def _marker():
    from numba import cuda

    @cuda.jit
    def paper_repro_marker(x):
        if cuda.grid(1) == 0:
            x[0] += 1
    return paper_repro_marker


def _step(case):
    """A callable doing the case's step once (inputs allocated first)."""
    import torch

    from numba_flash import bench
    import numba_flash

    if case.get("fwd_tiles"):
        os.environ["NUMBA_FLASH_FWD_TILES"] = case["fwd_tiles"]
    else:
        os.environ.pop("NUMBA_FLASH_FWD_TILES", None)
    cfg = bench.Config(case["B"], case["N"], case["H"], case["d"], case["dtype"], case["causal"])
    q, k, v, dout = bench.make_inputs(cfg)
    mask = None
    if case.get("block_mask_density") is not None:
        mask = numba_flash.BlockMask.random(case["block_mask_density"], cfg.seqlen, cfg.seqlen, seed=0)
    forward, context = bench.make_forward(case["impl"], q, k, v, cfg.causal, block_mask=mask)
    step = bench.pass_step(case["passes"], forward, q, k, v, dout)

    def run():
        q.grad = k.grad = v.grad = None
        with context():
            step()
        torch.cuda.synchronize()
    return run


def main(argv=None):
    """Run every case of the JSON file argv[0] between its markers; write each case's status ("ok",
    "OOM" or the error) as JSON to argv[1]. No warm-up: numba_flash compiles on the host before its
    first launch, and every launch is counted from a cold cache anyway (module docstring)."""
    import torch
    from numba import cuda

    spec, status_path = (argv or sys.argv[1:])[:2]
    with open(spec) as f:
        cases = json.load(f)
    marker = _marker()
    flag = cuda.to_device([0])
    status = []
    for i, case in enumerate(cases):
        marker[MARK_START + i, 32](flag)
        cuda.synchronize()
        try:
            _step(case)()
            status.append("ok")
        except torch.cuda.OutOfMemoryError:
            status.append("OOM")
        except Exception as e:          # a backend that refuses the case: recorded, the rest go on
            status.append(f"error: {type(e).__name__}: {str(e)[:200]}")
        torch.cuda.synchronize()
        marker[MARK_END + i, 32](flag)
        cuda.synchronize()
        torch.cuda.empty_cache()
    with open(status_path, "w") as f:
        json.dump(status, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
