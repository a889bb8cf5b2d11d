"""Where a kernel's instructions and stalls go, from Nsight Compute's per-SASS-instruction source page.

    python tools/ncu_sass_stats.py OUT/prof-numba_flash-d64-c0-fwd-sass.csv [more.csv ...] [--blocks 20]

The csv is what `tools/gpu_check.sh profile` writes (`ncu --import R --page source --print-source sass
--csv`). Printed per file: warp instructions executed by opcode; stall samples by reason; the instructions
with the most stall samples; and the basic blocks (runs of consecutive instructions executed equally
often) that issue the most instructions, with their opcode mix. From these blocks you can tell the roles
of a warp-specialised kernel apart: the consumer's softmax, the producer's copies, and the spin loops.
"""
import argparse
import collections
import csv


def load(path):
    """[(source, opcode, executed, stall samples, {reason: samples})] in address order."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    head = next(i for i, r in enumerate(rows) if "Instructions Executed" in r)
    hdr, ix = rows[head], {h: i for i, h in enumerate(rows[head])}
    out = []
    for r in rows[head + 1:]:
        if len(r) < len(hdr):
            continue
        try:
            n = int(r[ix["Instructions Executed"]] or 0)
        except ValueError:
            continue
        src = r[ix["Source"]].strip()
        t = src.split()
        op = (t[1] if t[0].startswith("@") else t[0]) if t else "?"
        stalls = {h[6:]: int(r[i] or 0) for h, i in ix.items() if h.startswith("stall_") and "Not Issued" not in h}
        out.append((src, op, n, int(r[ix["Warp Stall Sampling (All Samples)"]] or 0), stalls))
    return out


def report(path, nblocks):
    d = load(path)
    total, samples = sum(x[2] for x in d), max(1, sum(x[3] for x in d))
    print(f"== {path}: {total / 1e6:.1f} M warp instructions, {samples} stall samples")
    ops = collections.Counter()
    for _, op, n, _, _ in d:
        ops[op.split(".")[0]] += n
    print("  by opcode (M): " + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in ops.most_common(24)))
    reasons = collections.Counter()
    for x in d:
        reasons.update(x[4])
    print("  stall samples: " + ", ".join(f"{k} {100 * v / samples:.1f}%" for k, v in reasons.most_common(10)))
    for src, _, _, s, st in sorted(d, key=lambda x: -x[3])[:12]:
        print(f"   {100 * s / samples:5.1f}%  {src[:64]:64s} {max(st, key=st.get) if st else ''}")
    blocks = []
    for i, (_, op, n, s, _) in enumerate(d):
        if blocks and blocks[-1]["n"] == n:
            blocks[-1]["ops"].append(op)
            blocks[-1]["samples"] += s
        else:
            blocks.append(dict(first=i, n=n, ops=[op], samples=s))
    print("  basic blocks by instructions issued:")
    for b in sorted(blocks, key=lambda b: -b["n"] * len(b["ops"]))[:nblocks]:
        mix = collections.Counter(o.split(".")[0] for o in b["ops"]).most_common(6)
        issued = b["n"] * len(b["ops"])
        print(f"   #{b['first']:5d}: {len(b['ops']):4d} instructions x {b['n'] / 1e3:9.1f} K = {issued / 1e6:7.1f} M "
              f"({100 * issued / total:4.1f}%), {100 * b['samples'] / samples:4.1f}% of samples: "
              + " ".join(f"{k} {v}" for k, v in mix))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", nargs="+")
    ap.add_argument("--blocks", type=int, default=20)
    a = ap.parse_args(argv)
    for path in a.csv:
        report(path, a.blocks)


if __name__ == "__main__":
    main()
