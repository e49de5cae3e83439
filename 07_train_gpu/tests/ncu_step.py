#!/usr/bin/env python3
"""One decode step's kernels from an ncu CSV (gpu_sampler_speed.sh): `ncu --csv --metrics gpu__time_duration.sum`
over a greedy `sample` run. A step starts at embed_rows_kernel; the step printed is the second one profiled (the
first may differ: a prompt chunk). Prints the kernel count, the sum of the kernels' durations (the GPU's busy time,
without the gaps between them), and the time per kernel name."""
import argparse
import csv
import re
import sys
from collections import OrderedDict

UNIT = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6}


def short(name):
    name = re.sub(r"\(.*$", "", name)  # drop the argument list
    name = re.sub(r"^.*::", "", name)  # and the namespaces
    return name


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    rows = []
    with open(a.csv, errors="replace") as f:
        lines = [l for l in f if l.startswith('"')]
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        try:
            v = float(r["Metric Value"].replace(",", "")) * UNIT.get(r["Metric Unit"], 1.0)
        except (KeyError, ValueError):
            continue
        rows.append((short(r["Kernel Name"]), v))
    starts = [i for i, (n, _) in enumerate(rows) if n.startswith("embed_rows_kernel")]
    if len(starts) < 3:
        print(f"{a.label}: {len(rows)} kernels profiled, fewer than two whole steps", file=sys.stderr)
        return 1
    step = rows[starts[1]:starts[2]]
    total = sum(v for _, v in step)
    per = OrderedDict()
    for n, v in step:
        c, t = per.get(n, (0, 0.0))
        per[n] = (c + 1, t + v)
    print(f"ncu {a.label}: one plain step = {len(step)} kernels, {total:.1f} us of kernel time "
          f"(mean {total / len(step):.2f} us)")
    for n, (c, t) in sorted(per.items(), key=lambda kv: -kv[1][1]):
        print(f"  {n:40s} {c:3d}x  {t:7.1f} us  ({t / c:.2f} us each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
