"""``accuracy_vs_round.png`` and ``accuracy_vs_bytes.png``: one line per setting, mean over its seeds
with a +-1 std band.

Accuracy against cumulative MB communicated (log x) is the figure FedPEFT's argument rests on:
PEFT methods reach full fine-tuning's accuracy at a small fraction of its traffic. Curves use
every evaluated round of every run, finished or not (a setting with unfinished runs says so in
its legend entry). matplotlib is imported here only, with the Agg canvas: no display needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpeft_hpc.report.collect import Collection, RunRecord


@dataclass
class Curve:
    label: str
    rounds: np.ndarray
    acc_mean: np.ndarray
    acc_std: np.ndarray  # 0 where fewer than two runs have the round
    mb_mean: np.ndarray


def _points(rec: RunRecord) -> dict[int, tuple[float, float]]:
    """round -> (test accuracy, cumulative MB up + down) for the rounds that evaluated."""
    out = {}
    for row in rec.metrics:
        acc = row.get("test_acc")
        if isinstance(acc, (int, float)):
            mb = (row.get("bytes_up_total", 0) + row.get("bytes_down_total", 0)) / 1e6
            out[int(row["round"])] = (float(acc), float(mb))
    return out


def curves(coll: Collection) -> list[Curve]:
    out = []
    for name, recs in coll.settings().items():
        per_run = [_points(r) for r in recs]
        rounds = sorted(set().union(*per_run))
        if not rounds:
            continue
        acc_mean, acc_std, mb_mean = [], [], []
        for k in rounds:
            accs = [p[k][0] for p in per_run if k in p]
            mbs = [p[k][1] for p in per_run if k in p]
            acc_mean.append(np.mean(accs))
            acc_std.append(np.std(accs, ddof=1) if len(accs) > 1 else 0.0)
            mb_mean.append(np.mean(mbs))
        done = sum(r.finished for r in recs)
        what = coll.label(recs[0])
        label = f"{what} (n={done})" if done == len(recs) else f"{what} ({done}/{len(recs)} finished)"
        out.append(Curve(label, np.array(rounds), np.array(acc_mean), np.array(acc_std), np.array(mb_mean)))
    return out


def _figure(title: str, xlabel: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (top-1)")
    ax.grid(True, which="major", alpha=0.3)
    return fig, ax


def _save(fig, ax, path: Path, n: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if n:
        ax.legend(fontsize=8 if n <= 8 else 6, loc="best")
    else:
        ax.text(0.5, 0.5, "no evaluated round yet", ha="center", va="center", transform=ax.transAxes)
    FigureCanvasAgg(fig).print_png(str(path))
    return fig


def plot_accuracy_vs_round(coll: Collection, path: Path):
    """Write the PNG; returns the matplotlib Figure."""
    cs = curves(coll)
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure(f"{coll.title}: test accuracy per round (mean ± std over seeds)", "communication round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for c in cs:
        (line,) = ax.plot(c.rounds, c.acc_mean, marker="o", markersize=3, label=c.label)
        ax.fill_between(c.rounds, c.acc_mean - c.acc_std, c.acc_mean + c.acc_std, color=line.get_color(),
                        alpha=0.2, linewidth=0)
    return _save(fig, ax, path, len(cs))


def plot_accuracy_vs_bytes(coll: Collection, path: Path):
    """Write the PNG (log x); returns the matplotlib Figure."""
    cs = curves(coll)
    fig, ax = _figure(f"{coll.title}: test accuracy vs communication",
                      "cumulative communication, MB (up + down, all clients; log scale)")
    for c in cs:
        (line,) = ax.plot(c.mb_mean, c.acc_mean, marker="o", markersize=3, label=c.label)
        ax.fill_between(c.mb_mean, c.acc_mean - c.acc_std, c.acc_mean + c.acc_std, color=line.get_color(),
                        alpha=0.2, linewidth=0)
    if cs:
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax.set_xscale("log")
        plain = FuncFormatter(lambda x, _: f"{x:g}")  # 0.2, 3, 40 MB rather than 2x10^-1
        ax.xaxis.set_major_formatter(plain)
        lo, hi = min(c.mb_mean.min() for c in cs), max(c.mb_mean.max() for c in cs)
        ax.xaxis.set_minor_formatter(plain if hi < 10 * lo else NullFormatter())
    return _save(fig, ax, path, len(cs))
