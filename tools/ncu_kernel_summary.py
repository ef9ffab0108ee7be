#!/usr/bin/env python3
"""Per-kernel time summary of an `ncu --csv --metrics gpu__time_duration.sum` log.

  ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum \\
      --csv --log-file prof.csv .bundle/bin/gpu_model_bench --profile_decode_batch=1
  python3 tools/ncu_kernel_summary.py prof.csv [--top 25]

Groups launches by kernel name (template arguments dropped) and prints, most
time first: launches, total and mean microseconds, share of the kernel time.
"""
import argparse
import collections
import csv
import re
import sys

UNIT = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}


def short(name):
    name = re.sub(r"<.*>", "<…>", name)  # template arguments
    name = re.sub(r"\(.*\)", "", name)  # parameter lists
    return name.strip()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    with open(args.csv, newline="") as f:
        lines = [l for l in f if l.startswith('"')]  # ncu prefixes its own log lines with ==
    rows = list(csv.DictReader(lines))
    total = collections.defaultdict(float)
    count = collections.Counter()
    for r in rows:
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        us = float(r["Metric Value"].replace(",", "")) * UNIT.get(r.get("Metric Unit", "nsecond"), 1e-3)
        k = short(r["Kernel Name"])
        total[k] += us
        count[k] += 1
    if not total:
        print("no gpu__time_duration.sum rows in", args.csv)
        return 1
    grand = sum(total.values())
    print(f"{sum(count.values())} kernel launches, {grand:.1f} us of kernel time")
    print(f"{'launches':>8} {'total us':>10} {'mean us':>8} {'share':>6}  kernel")
    for k, us in sorted(total.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{count[k]:8d} {us:10.1f} {us / count[k]:8.2f} {100 * us / grand:5.1f}%  {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
