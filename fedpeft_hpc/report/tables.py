"""``results.csv`` (one row per run), ``results.md`` and ``results.tex`` (one row per setting: mean +- std,
or a 95% t-interval with ``--ci``, over seeds).

A setting is what its runs compute (``Collection.settings``: config without the seed, weights, data),
so runs with another ``fed.rounds`` are another row, and the rounds column says which. ``best_acc``
is the best test accuracy over the evaluated rounds: chosen on the test set, so it is labelled as
such and is no substitute for ``final_acc``.

Every run is a row of the CSV whatever its state; a setting's means use its finished runs only,
its ``n`` column says how many of its runs that is, and the unfinished ones are listed under the
table with their state and progress. Runs that a sweep directory holds from an earlier version of
its sweep file are rows like the others, and the text says which they are.
"""

from __future__ import annotations

import csv
import io
import math
from statistics import mean, stdev

from fedpeft_hpc.report.collect import Collection, RunRecord, value_text

RESULT_FIELDS = ("seed", "state", "rounds_done", "rounds", "final_acc", "best_acc", "trainable_params", "mb_sent",
                 "wall_s", "epsilon")


def run_row(rec: RunRecord) -> dict:
    """One run's numbers: from ``summary.json`` when finished, progress so far otherwise."""
    s = rec.status.summary if rec.finished else None
    last = rec.metrics[-1] if rec.metrics else {}
    if s is not None:
        bytes_total = s.get("bytes_total")
    elif last:
        bytes_total = last.get("bytes_up_total", 0) + last.get("bytes_down_total", 0)
    else:
        bytes_total = None
    source = s if s is not None else last
    eps = math.inf if source.get("epsilon_unbounded") else source.get("epsilon")  # zero noise: no bound
    return {"name": rec.name, **rec.setting, "seed": rec.seed, "state": rec.status.state,
            "rounds_done": rec.status.rounds_done, "rounds": rec.rounds,
            "final_acc": s.get("final_acc") if s else None, "best_acc": s.get("best_acc") if s else None,
            "trainable_params": s.get("trainable_params") if s else None,
            "mb_sent": bytes_total / 1e6 if bytes_total is not None else None,
            "wall_s": sum(float(r.get("wall_s", 0.0)) for r in rec.metrics) if rec.metrics else None,
            "epsilon": eps}


def results_csv(coll: Collection) -> str:
    fields = ["name", *coll.swept, *RESULT_FIELDS]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for rec in coll.runs:
        row = run_row(rec)
        w.writerow({k: _csv_value(row.get(k)) for k in fields})
    return buf.getvalue()


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, dict)):
        import json

        return json.dumps(v)
    return v


def _stats(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``None`` with fewer than two values)."""
    return mean(values), (stdev(values) if len(values) > 1 else None)


def _t_halfwidth(std: float, n: int) -> float:
    """Half-width of the two-sided 95% Student-t interval of a mean of ``n`` values."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1)) * std / math.sqrt(n)


def _mean_std(values: list, digits: int = 4, ci: bool = False) -> str:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not math.isnan(float(v))]
    if not vals:
        return "–"
    if any(math.isinf(v) for v in vals):
        return "inf"
    m, s = _stats(vals)
    if s is None:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {_t_halfwidth(s, len(vals)) if ci else s:.{digits}f}"


def _mean(values: list, fmt: str) -> str:
    vals = [float(v) for v in values if isinstance(v, (int, float))]
    return format(mean(vals), fmt) if vals else "–"


def _rounds_text(recs: list[RunRecord]) -> str:
    rounds = sorted({r.rounds for r in recs if r.rounds is not None})
    return ", ".join(str(n) for n in rounds) or "–"


def setting_rows(coll: Collection, ci: bool = False) -> list[dict]:
    """Per setting: its values, ``n``, and the aggregated columns (strings, ready for the table)."""
    rows = []
    for name, recs in coll.settings().items():
        done = [run_row(r) for r in recs if r.finished]
        rows.append({
            "setting": recs[0].setting_name, "values": recs[0].setting, "n": len(done), "runs": len(recs),
            "rounds": _rounds_text(recs),
            "final_acc": _mean_std([r["final_acc"] for r in done], ci=ci),
            "best_acc": _mean_std([r["best_acc"] for r in done], ci=ci),
            "trainable_params": _mean([r["trainable_params"] for r in done], ",.0f"),
            "mb_sent": _mean([r["mb_sent"] for r in done], ",.2f"),
            "wall_s": _mean([r["wall_s"] for r in done], ".1f"),
            "epsilon": _mean_std([r["epsilon"] for r in done], 3),
            "has_epsilon": any(r["epsilon"] is not None for r in done),
        })
    return rows


def _head(coll: Collection, dp: bool) -> list[str]:
    cols = [coll.short.get(k, k) for k in coll.swept] or ["run"]
    return cols + ["rounds", "n", "final acc", "best acc (test-chosen)", "trainable params", "MB sent",
                   "wall s"] + (["epsilon"] if dp else [])


def _cells(coll: Collection, r: dict, dp: bool) -> list[str]:
    values = [value_text(r["values"].get(k), sep=", ") for k in coll.swept] or [r["setting"]]
    return values + [r["rounds"], f"{r['n']}/{r['runs']}", r["final_acc"], r["best_acc"], r["trainable_params"],
                     r["mb_sent"], r["wall_s"]] + ([r["epsilon"]] if dp else [])


def _spread_text(ci: bool) -> str:
    return ("Mean ± half-width of the 95% Student-t interval" if ci else "Mean ± sample standard deviation")


def results_md(coll: Collection, ci: bool = False) -> str:
    rows = setting_rows(coll, ci)
    dp = any(r["has_epsilon"] for r in rows)
    head = _head(coll, dp)
    lines = [f"# {coll.title}: results", ""]
    states: dict[str, int] = {}
    for r in coll.runs:
        states[r.status.state] = states.get(r.status.state, 0) + 1
    lines.append(f"{len(coll.runs)} runs: " + ", ".join(f"{n} {s}" for s, n in states.items()) + ".")
    old = [r for r in coll.runs if not r.in_sweep]
    if old:
        lines.append(f"{len(old)} of them not in the current sweep file (kept from an earlier version of it, "
                     "`in_sweep: false` in sweep.json; in the table like the others): "
                     + ", ".join(f"`{r.name}`" for r in old) + ".")
    lines += ["", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cells(coll, r, dp)) + " |")
    lines += ["", f"{_spread_text(ci)} over the finished runs (seeds) of each setting; a setting is one "
                  "config (rounds included), weights and data. n: finished runs / runs. best acc: the best "
                  "test accuracy over the evaluated rounds, chosen on the test set (optimistic; final acc is "
                  "the result). MB sent: up + down, all clients, whole run. wall s: the rounds' wall time, "
                  "summed."]
    unfinished = [r for r in coll.runs if not r.finished]
    if unfinished:
        lines += ["", "Not finished (not in the means):", ""]
        for r in unfinished:
            of = f" of {r.rounds}" if r.rounds else ""
            lines.append(f"- `{r.name}`: {r.status.state}, {r.status.rounds_done} round(s){of} done")
    return "\n".join(lines) + "\n"


def _tex(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("±", r"$\pm$"), ("–", "--")):
        text = text.replace(a, b)
    return text


def results_tex(coll: Collection, ci: bool = False) -> str:
    """The settings table as a LaTeX booktabs ``tabular`` (``\\usepackage{booktabs}``)."""
    rows = setting_rows(coll, ci)
    dp = any(r["has_epsilon"] for r in rows)
    head = _head(coll, dp)
    keys = max(1, len(coll.swept))  # the setting's columns, left-aligned; numbers right-aligned
    lines = [f"% {coll.title}: {_spread_text(ci).lower()} over seeds; best acc chosen on the test set",
             r"\begin{tabular}{" + "l" * keys + "r" * (len(head) - keys) + "}",
             r"\toprule", " & ".join(_tex(h) for h in head) + r" \\", r"\midrule"]
    lines += [" & ".join(_tex(c) for c in _cells(coll, r, dp)) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"
