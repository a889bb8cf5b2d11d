"""Reports: the environment header, Markdown tables of a sweep, of checks and of the block-sparse mode,
and the .md + .json pair a run writes.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import statistics
import sys
from pathlib import Path

from .problem import PASSES


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(timing: dict | None = None) -> dict:
    """GPU, versions and UTC date, for the report header."""
    import numba
    import numpy as np
    import torch

    import numba_flash

    meta = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "numba_cuda": _version("numba-cuda"),
        "numpy": np.__version__,
        "triton": _version("triton"),
        "numba_flash": getattr(numba_flash, "__version__", _version("numba_flash")),
        "python": sys.version.split()[0],
    }
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        meta["gpu"] = f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
        meta["cuda_runtime"] = torch.version.cuda
    else:
        meta["gpu"] = "none"
    if timing is not None:
        meta["timing"] = timing
    return meta


def format_header(meta: dict, title: str = "numba_flash attention benchmark") -> str:
    lines = [f"# {title}", "",
             f"- GPU: {meta['gpu']}" + (f", CUDA runtime {meta['cuda_runtime']}"
                                        if meta.get("cuda_runtime") else ""),
             f"- torch {meta['torch']}, numba {meta['numba']}, numba-cuda {meta['numba_cuda']}, "
             f"triton {meta['triton']}, numpy {meta['numpy']}, numba_flash {meta['numba_flash']}, "
             f"Python {meta['python']}",
             f"- date: {meta['date_utc']}"]
    timing = meta.get("timing")
    if timing:
        lines.append(f"- timing: {timing['method']}, median, warm-up {timing['warmup_ms']} ms, "
                     f"repeat {timing['rep_ms']} ms, L2 flushed between repetitions; the forward "
                     f"pass records autograd (as in training)")
    lines.append("- TFLOP/s: 4·B·H·N²·d per forward (halved when causal), ×2.5 backward, "
                 "×3.5 forward+backward; a ratio line `a / b` divides a's TFLOP/s by b's "
                 "(> 1: a faster)")
    if meta.get("sweep"):
        s = meta["sweep"]
        lines.append(f"- shapes: B·N = {s['tokens']} tokens, hidden {s['hidden']} → H = hidden // d; "
                     f"numba_flash gets (B, N, H, d), PyTorch the (B, H, N, d) transpose views")
    return "\n".join(lines) + "\n"




def progress(items, desc):
    """``items`` with a progress bar on stderr (tqdm), so a long sweep shows that it is alive."""
    try:
        from tqdm.auto import tqdm
    except ImportError:            # tqdm is a dependency; a bare interpreter still runs, without a bar
        return items
    return tqdm(items, desc=desc, file=sys.stderr, dynamic_ncols=True)


def cell(rec, key="tflops", fmt="{:.1f}") -> str:
    if rec is None:
        return "—"
    if rec["status"] != "ok":
        return rec["status"]
    value = rec.get(key)
    return "—" if value is None else fmt.format(value)


def md_table(header, rows) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def format_sweep(records, impls, passes, reference_impl="numba_flash") -> str:
    """Markdown: per (d, dtype, causal, pass) a TFLOP/s table (rows N, columns impls), ratio lines
    ``numba_flash / other`` and, for the forward pass, a peak-memory table."""
    index = {(r["d"], r["dtype"], r["causal"], r["seqlen"], r["impl"], r["pass"]): r
             for r in records}
    groups = sorted({(r["d"], r["dtype"], r["causal"]) for r in records},
                    key=lambda g: (g[0], g[1] != "float32", g[2]))
    out, notes = [], {}
    for d, dtype, causal in groups:
        rows_n = sorted({r["seqlen"] for r in records
                         if (r["d"], r["dtype"], r["causal"]) == (d, dtype, causal)})
        first = next(r for r in records if (r["d"], r["dtype"], r["causal"]) == (d, dtype, causal))
        for pass_ in [p for p in PASSES if p in passes]:
            get = lambda n, impl: index.get((d, dtype, causal, n, impl, pass_))  # noqa: E731
            out.append(f"### d={d}, {dtype}, {'causal' if causal else 'non-causal'}, {pass_}: "
                       f"TFLOP/s (H={first['nheads']})")
            out.append("")
            rows = [[n, get(n, impls[0])["batch"] if get(n, impls[0]) else "—"]
                    + [cell(get(n, impl)) for impl in impls] for n in rows_n]
            out += md_table(["N", "B", *impls], rows)
            out.append("")
            if reference_impl in impls:
                for other in impls:
                    if other == reference_impl:
                        continue
                    parts, ratios = [], []
                    for n in rows_n:
                        a, b = get(n, reference_impl), get(n, other)
                        if a and b and a["status"] == b["status"] == "ok":
                            ratios.append(a["tflops"] / b["tflops"])
                            parts.append(f"N={n} {ratios[-1]:.2f}")
                        else:
                            parts.append(f"N={n} —")
                    geo = (f" (geomean {math.exp(statistics.fmean(map(math.log, ratios))):.2f})"
                           if ratios else "")
                    out.append(f"- {reference_impl} / {other}: " + ", ".join(parts) + geo)
                out.append("")
            if pass_ == "fwd":
                out.append(f"Peak extra memory of one forward, MiB (d={d}, {dtype}, "
                           f"{'causal' if causal else 'non-causal'})")
                out.append("")
                rows = [[n] + [cell(get(n, impl), "mem_mib", "{:.0f}") for impl in impls]
                        for n in rows_n]
                out += md_table(["N", *impls], rows)
                out.append("")
            for n in rows_n:
                for impl in impls:
                    r = get(n, impl)
                    if r and r.get("note"):
                        notes.setdefault((impl, r["status"], r["note"]), []).append(
                            f"d={d} {dtype} {'causal' if causal else 'non-causal'} N={n} {pass_}")
    if notes:
        out.append("Notes:")
        for (impl, status, note), where in notes.items():
            more = f" (+{len(where) - 1} more)" if len(where) > 1 else ""
            out.append(f"- {impl} {status} at {where[0]}{more}: {note}")
        out.append("")
    return "\n".join(out)


def format_checks(checks) -> str:
    rows = []
    for c in checks:
        e = c["errors"]
        rows.append([c["impl"], c["d"], c["dtype"], "causal" if c["causal"] else "non-causal",
                     c["seqlen"]] + [f"{e[k]:.1e}" if k in e else "—" for k in ("out", "dq", "dk", "dv")]
                    + [f"{c['tol']:.0e}", c["status"] + (f" ({c['note']})" if c["note"] else "")])
    lines = [f"Check against float64 SDPA math on upcast inputs, ‖x − ref‖/‖ref‖ "
             f"(B={checks[0]['batch']}, H={checks[0]['nheads']})", ""] if checks else []
    lines += md_table(["impl", "d", "dtype", "mask", "N", "out", "dq", "dk", "dv", "tol", "status"],
                       rows)
    return "\n".join(lines) + "\n"


def write_report(path, markdown: str, payload: dict):
    """Write ``path`` with suffix .md (the report) and .json (``payload``) beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    md, js = path.with_suffix(".md"), path.with_suffix(".json")
    md.write_text(markdown)
    js.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return md, js


def format_sparse(records) -> str:
    out = []
    keys = sorted({(r["d"], r["dtype"], r["seqlen"], r["pass"]) for r in records},
                  key=lambda t: (t[0], t[1], t[2], PASSES.index(t[3])))
    for d, dtype, n, pass_ in keys:
        rs = [r for r in records if (r["d"], r["dtype"], r["seqlen"], r["pass"]) == (d, dtype, n, pass_)]
        by = {(r["impl"], r["pattern"], r["density"]): r for r in rs}
        dense = {impl: by.get((impl, "dense", 1.0)) for impl in ("numba_flash", "flex")}
        cases = []
        for r in rs:
            if (r["pattern"], r["density"]) not in cases:
                cases.append((r["pattern"], r["density"]))
        b, h = rs[0]["batch"], rs[0]["nheads"]
        out.append(f"### block-sparse, N={n}, d={d}, {dtype}, {pass_} (B={b}, H={h}, "
                   f"128×128 blocks): time in ms, ratio = time / dense time, target ρ + 0.1")
        out.append("")
        rows = []
        for pattern, density in cases:
            nf, fx = by.get(("numba_flash", pattern, density)), by.get(("flex", pattern, density))

            def ms_ratio(rec, base):
                if rec is None or rec["status"] != "ok":
                    return (rec["status"] if rec else "—"), "—"
                if base is None or base["status"] != "ok":
                    return f"{rec['ms']:.3f}", "—"
                return f"{rec['ms']:.3f}", f"{rec['ms'] / base['ms']:.3f}"

            nf_ms, nf_ratio = ms_ratio(nf, dense["numba_flash"])
            fx_ms, fx_ratio = ms_ratio(fx, dense["flex"])
            target = "—" if pattern == "dense" else f"{density + 0.1:.3f}"
            met = "—"
            if pattern != "dense" and nf_ratio != "—":
                met = "yes" if float(nf_ratio) <= density + 0.1 else "no"
            tflops = cell(nf, "tflops_effective")
            agree = f"{nf['agreement']:.1e}" if nf and nf.get("agreement") is not None else "—"
            rows.append([pattern, f"{density:.3f}", nf_ms, nf_ratio, target, met, tflops,
                         fx_ms, fx_ratio] + ([agree] if pass_ == "fwd" else []))
        header = ["mask", "density ρ", "numba_flash ms", "ratio", "target", "met",
                  "eff. TFLOP/s", "flex ms", "flex ratio"]
        if pass_ == "fwd":
            header.append("‖nf − flex‖/‖flex‖")
        out += md_table(header, rows)
        out.append("")
    notes = {(r["impl"], r["status"], r["note"]) for r in records if r.get("note")}
    if notes:
        out.append("Notes:")
        out += [f"- {impl} {status}: {note}" for impl, status, note in sorted(notes)]
        out.append("")
    return "\n".join(out)
