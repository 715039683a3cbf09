"""``accuracy_vs_round.png`` and ``accuracy_vs_bytes.png``: one line per setting, mean over its seeds
with a +-1 std band.

Accuracy against cumulative MB communicated (log x) is the figure FedPEFT's argument rests on:
PEFT methods reach full fine-tuning's accuracy at a small fraction of its traffic. Curves use
every evaluated round of every run, finished or not (a setting with unfinished runs says so in
its legend entry). ``panels`` (swept keys) draws one sub-plot per combination of their values
(``report.panels``). matplotlib is imported here only, with the Agg canvas: no display needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpeft_hpc.report.collect import Collection, RunRecord
from fedpeft_hpc.report.panels import split


@dataclass
class Curve:
    label: str
    rounds: np.ndarray
    acc_mean: np.ndarray
    acc_std: np.ndarray  # 0 where fewer than two runs have the round
    mb_mean: np.ndarray


def _points(rec: RunRecord, metric: str = "test_acc", up_only: bool = False) -> dict[int, tuple[float, float]]:
    """round -> (``metric``: test accuracy or personal_acc, cumulative MB up + down, or up alone) for the rounds
    that evaluated (MB NaN where the row holds no byte counts: a DP run with privacy.release=covered whose cohort
    size is secret)."""
    out = {}
    for row in rec.metrics:
        acc = row.get(metric)
        if isinstance(acc, (int, float)):
            sent = [row.get("bytes_up_total")] + ([] if up_only else [row.get("bytes_down_total")])
            mb = sum(sent) / 1e6 if None not in sent else math.nan
            out[int(row["round"])] = (float(acc), float(mb))
    return out


def curves(coll: Collection, metric: str = "test_acc", up_only: bool = False) -> list[Curve]:
    out = []
    for name, recs in coll.settings().items():
        per_run = [_points(r, metric, up_only) for r in recs]
        rounds = sorted(set().union(*per_run))
        if not rounds:
            continue
        acc_mean, acc_std, mb_mean = [], [], []
        for k in rounds:
            accs = [p[k][0] for p in per_run if k in p]
            mbs = [p[k][1] for p in per_run if k in p]
            acc_mean.append(np.mean(accs))
            acc_std.append(np.std(accs, ddof=1) if len(accs) > 1 else 0.0)
            known = [m for m in mbs if math.isfinite(m)]  # runs whose rows hold the bytes (not withheld under DP)
            mb_mean.append(np.mean(known) if known else math.nan)
        done = sum(r.finished for r in recs)
        what = coll.label(recs[0])
        if sum(coll.label(rs[0]) == what for rs in coll.settings().values()) > 1:  # same name, other computation
            what += f", rounds={recs[0].rounds}"
        label = f"{what} (n={done})" if done == len(recs) else f"{what} ({done}/{len(recs)} finished)"
        out.append(Curve(label, np.array(rounds), np.array(acc_mean), np.array(acc_std), np.array(mb_mean)))
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (MB, accuracy) points that no other point beats with fewer or equal MB and higher or equal
    accuracy (one strictly better), sorted by MB; points without a finite MB (bytes withheld under DP) are left out."""
    front, best = [], -float("inf")
    finite = [(mb, acc) for mb, acc in points if math.isfinite(mb) and math.isfinite(acc)]
    for mb, acc in sorted(finite, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((mb, acc))
            best = acc
    return front


def _figure(title: str, xlabel: str, panels: int, ylabel: str = "test accuracy (top-1)"):
    """A figure with ``panels`` axes (two per row), one shared y axis; the title on top."""
    from matplotlib.figure import Figure

    ncols = 1 if panels == 1 else 2
    nrows = -(-panels // ncols)
    fig = Figure(figsize=(7.5 * (1 if ncols == 1 else 0.85 * ncols), 4.8 * (1 if nrows == 1 else 0.85 * nrows)),
                 dpi=120, layout="constrained")
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    for ax in axes[panels:]:  # an odd number of panels leaves one cell empty
        ax.set_visible(False)
    axes = list(axes[:panels])
    if panels == 1:
        axes[0].set_title(title)
    else:
        fig.suptitle(title)
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
    return fig, axes


def _finish(ax, n: int, subtitle: str | None) -> None:
    if subtitle is not None:
        ax.set_title(subtitle, fontsize=10)
    if n:
        ax.legend(fontsize=8 if n <= 8 else 6, loc="best")
    else:
        ax.text(0.5, 0.5, "no evaluated round yet", ha="center", va="center", transform=ax.transAxes)


def _save(fig, path: Path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).print_png(str(path))
    return fig


def plot_accuracy_vs_round(coll: Collection, path: Path, panels: list[str] | None = None):
    """Write the PNG (one panel per value of the ``panels`` keys); returns the matplotlib Figure."""
    from matplotlib.ticker import MaxNLocator

    groups = split(coll, panels or [])
    fig, axes = _figure(f"{coll.title}: test accuracy per round (mean ± std over seeds)", "communication round",
                        len(groups))
    for ax, (subtitle, part) in zip(axes, groups):
        cs = curves(part)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for c in cs:
            (line,) = ax.plot(c.rounds, c.acc_mean, marker="o", markersize=3, label=c.label)
            ax.fill_between(c.rounds, c.acc_mean - c.acc_std, c.acc_mean + c.acc_std, color=line.get_color(),
                            alpha=0.2, linewidth=0)
        _finish(ax, len(cs), subtitle if len(groups) > 1 else None)
    return _save(fig, path)


def plot_accuracy_vs_bytes(coll: Collection, path: Path, panels: list[str] | None = None, metric: str = "test_acc",
                           up_only: bool = False):
    """Write the PNG (log x; one panel per value of the ``panels`` keys); returns the matplotlib Figure.
    ``metric``: ``test_acc`` (the global model on the global test set) or ``personal_acc`` (each client's own
    model on its held-out samples, ``data.client_test_fraction``); ``up_only``: the uplink's bytes alone."""
    groups = split(coll, panels or [])
    what = "test accuracy" if metric == "test_acc" else "personalized accuracy (clients' own models)"
    fig, axes = _figure(f"{coll.title}: {what} vs communication",
                        f"cumulative communication, MB ({'up' if up_only else 'up + down'}, all clients; log scale)",
                        len(groups),
                        ylabel="test accuracy (top-1)" if metric == "test_acc" else "personal_acc (top-1)")
    for ax, (subtitle, part) in zip(axes, groups):
        # settings whose rows hold no byte counts at all (withheld under DP) have no place on this x axis
        cs = [c for c in curves(part, metric, up_only) if np.isfinite(c.mb_mean).any()]
        for c in cs:
            (line,) = ax.plot(c.mb_mean, c.acc_mean, marker="o", markersize=3, label=c.label)
            ax.fill_between(c.mb_mean, c.acc_mean - c.acc_std, c.acc_mean + c.acc_std, color=line.get_color(),
                            alpha=0.2, linewidth=0)
        # the settings' last evaluated points that no other setting beats at equal or lower cost
        front = pareto_front([(float(c.mb_mean[-1]), float(c.acc_mean[-1])) for c in cs]) if len(cs) > 1 else []
        if front:
            xs, ys = zip(*front)
            ax.plot(xs, ys, color="black", linestyle="--", linewidth=1, marker="*", markersize=9, zorder=5,
                    label="Pareto front (last rounds)")
        if cs:
            from matplotlib.ticker import FuncFormatter, NullFormatter

            ax.set_xscale("log")
            plain = FuncFormatter(lambda x, _: f"{x:g}")  # 0.2, 3, 40 MB rather than 2x10^-1
            ax.xaxis.set_major_formatter(plain)
            mbs = np.concatenate([c.mb_mean for c in cs])
            mbs = mbs[np.isfinite(mbs)]
            lo, hi = (mbs.min(), mbs.max()) if mbs.size else (1.0, 1.0)
            ax.xaxis.set_minor_formatter(plain if hi < 10 * lo else NullFormatter())
        _finish(ax, len(cs) + bool(front), subtitle if len(groups) > 1 else None)
    return _save(fig, path)
