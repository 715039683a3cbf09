"""How far the linear probe falls behind full fine-tuning, per domain: the capability analysis's measure.

    python tools/probe_gap.py runs/domain_study/results.csv [--markdown gap.md] [--plot probe_gap.png]

For every setting of the sweep other than the method and its learning rate (domain, partition,
privacy mode), the gap of each seed is ``final_acc(full) - final_acc(head)`` of the two runs with that
seed; the table gives the mean ± sample std over the seeds, and the same for every PEFT method
against full fine-tuning (negative: the method is ahead of full). Only seeds where both runs finished
count (``n=`` says how many when fewer than all). The plot shows the full-minus-head gap per domain,
one bar per partition and privacy mode. Used by tools/domain_study.sh; works on any sweep's
results.csv that holds ``peft.method`` (and optionally ``data.name``, ``data.partition``, ``privacy.mode``).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from statistics import mean, stdev

SETTING_KEYS = ("data.name", "data.partition", "privacy.mode")
METHODS = ("head", "bias", "adapter", "prompt", "lora")


def gaps(rows: list[dict], method: str) -> dict[tuple, list[float]]:
    """Setting -> per-seed ``final_acc(full) - final_acc(method)`` (points of accuracy x 100)."""
    keys = [k for k in SETTING_KEYS if rows and k in rows[0]]
    acc: dict[tuple, dict[str, dict[str, float]]] = {}
    for r in rows:
        setting = tuple(r[k] for k in keys)
        acc.setdefault(setting, {})
        if r["state"] == "finished" and r.get("final_acc") not in ("", None):
            acc[setting].setdefault(r["peft.method"], {})[r["seed"]] = float(r["final_acc"])
    out = {}
    for setting, by_method in acc.items():
        full, other = by_method.get("full", {}), by_method.get(method, {})
        out[setting] = [100 * (full[s] - other[s]) for s in full if s in other]
    return out


def cell(values: list[float], seeds: int) -> str:
    if not values:
        return "–"
    text = f"{mean(values):+.1f}" + (f" ± {stdev(values):.1f}" if len(values) > 1 else "")
    return text + (f" (n={len(values)}/{seeds})" if len(values) < seeds else "")


def table(rows: list[dict]) -> str:
    keys = [k for k in SETTING_KEYS if rows and k in rows[0]]
    seeds = len({r["seed"] for r in rows})
    per_method = {m: gaps(rows, m) for m in METHODS}
    head = [", ".join(keys) or "setting"] + [f"full - {m}" for m in METHODS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for setting in per_method["head"]:
        lines.append("| " + " | ".join([", ".join(setting)] + [cell(per_method[m][setting], seeds)
                                                                 for m in METHODS]) + " |")
    return ("Points of final test accuracy by which full fine-tuning is ahead of each method (mean ± std "
            "over the seeds; negative: the method is ahead).\n\n" + "\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = gaps(rows, "head")
    domains = list(dict.fromkeys(s[0] for s in g))
    series = list(dict.fromkeys(s[1:] for s in g))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, rest in enumerate(series):
        vals = [g.get((d, *rest), []) for d in domains]
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(domains))]
        ax.bar(xs, [mean(v) if v else 0.0 for v in vals], width,
               yerr=[stdev(v) if len(v) > 1 else 0.0 for v in vals], capsize=3, label=", ".join(rest) or "all")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylabel("full fine-tuning minus linear probe\n(points of final test accuracy)")
    ax.set_title("How far the linear probe (head) falls behind, per domain")
    ax.legend(title="partition, privacy", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", type=Path, help="results.csv written by `fedpeft-hpc report`")
    ap.add_argument("--markdown", type=Path, help="write the table here (default: print it)")
    ap.add_argument("--plot", type=Path, help="write the bar plot of full - head per domain here (PNG)")
    args = ap.parse_args(argv)
    with open(args.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    need = ["peft.method", "seed", "state", "final_acc"]
    missing = [k for k in need if rows and k not in rows[0]]
    if not rows or missing:
        print(f"probe_gap: {args.csv}: " + (f"no column {missing[0]!r}" if rows else "no runs"), file=sys.stderr)
        return 2
    text = table(rows)
    if args.markdown:
        args.markdown.write_text(text)
    else:
        print(text)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
