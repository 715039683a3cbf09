"""A pivot of a report's results.csv: one row per value of some keys, one column per value of others.

    python tools/pivot_results.py runs/cpu_study/results.csv --rows peft.method \\
        --cols data.partition,privacy.mode --value final_acc [--value mb_sent]

Each cell is the mean ± sample standard deviation over the finished runs (seeds) with those
values; ``n`` is appended where fewer runs finished than exist. Used by tools/cpu_study.sh for
docs/results/summary.md; works on any sweep's results.csv.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from statistics import mean, stdev

FORMATS = {"final_acc": ".3f", "best_acc": ".3f", "mb_sent": ",.2f", "wall_s": ",.1f", "epsilon": ".2f",
           "trainable_params": ",.0f"}


def cell(values: list[float], runs: int, fmt: str) -> str:
    if not values:
        return "–"
    text = format(mean(values), fmt)
    if len(values) > 1:
        text += " ± " + format(stdev(values), fmt)
    return text + (f" (n={len(values)}/{runs})" if len(values) < runs else "")


def pivot(rows: list[dict], row_keys: list[str], col_keys: list[str], value: str) -> str:
    """Markdown table of ``value`` (first-seen order of rows and columns)."""
    fmt = FORMATS.get(value, ".4g")
    order_r, order_c, groups = {}, {}, {}
    for r in rows:
        rk, ck = tuple(r[k] for k in row_keys), tuple(r[k] for k in col_keys)
        order_r.setdefault(rk, None)
        order_c.setdefault(ck, None)
        g = groups.setdefault((rk, ck), {"values": [], "runs": 0})
        g["runs"] += 1
        if r["state"] == "finished" and r.get(value) not in ("", None):
            g["values"].append(float(r[value]))
    head = [" / ".join(row_keys)] + [", ".join(ck) for ck in order_c]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for rk in order_r:
        cells = [cell(groups[(rk, ck)]["values"], groups[(rk, ck)]["runs"], fmt) if (rk, ck) in groups else ""
                 for ck in order_c]
        lines.append("| " + " | ".join([", ".join(rk)] + cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", type=Path, help="results.csv written by `fedpeft-hpc report`")
    ap.add_argument("--rows", required=True, help="comma-separated column names of results.csv")
    ap.add_argument("--cols", required=True, help="comma-separated column names of results.csv")
    ap.add_argument("--value", action="append", required=True, help="final_acc, best_acc, mb_sent, ... (repeat)")
    args = ap.parse_args(argv)
    with open(args.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    row_keys, col_keys = args.rows.split(","), args.cols.split(",")
    missing = [k for k in row_keys + col_keys + args.value if rows and k not in rows[0]]
    if not rows or missing:
        valid = ", ".join(rows[0]) if rows else "none: the file has no runs"
        print(f"pivot_results: {args.csv}: no column {missing[:1] or ''}; columns: {valid}", file=sys.stderr)
        return 2
    for value in args.value:
        print(f"**{value}**\n\n{pivot(rows, row_keys, col_keys, value)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
