"""``results.csv`` (one row per run), ``results.md`` and ``results.tex`` (one row per setting: mean +- std,
or a 95% t-interval with ``--ci``, over seeds).

A setting is what its runs compute (``Collection.settings``: config without the seed, weights, data),
so runs with another ``fed.rounds`` are another row, and the rounds column says which. ``best_acc``
is the best test accuracy over the evaluated rounds: chosen on the test set, so it is labelled as
such and is no substitute for ``final_acc``.

Epsilon is not averaged: a setting's column shows the largest epsilon among its finished runs (the
guarantee that holds for each of them), flagged when a run's noise was derived from the seed or a
run had rounds charged again (``privacy_flags``).

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
                 "wall_s", "epsilon", "personal_acc", "sent_params", "local_params", "frozen_params", "mb_up",
                 "compression_ratio")


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
            "wall_s": _wall_s(rec.metrics), "epsilon": eps, **_privacy_facts(s),
            **{k: s.get(k) if s else None
               for k in ("personal_acc", "sent_params", "local_params", "frozen_params", "compression_ratio")},
            "mb_up": s["bytes_up_total"] / 1e6 if s and s.get("bytes_up_total") is not None else None}


def _wall_s(rows: list[dict]) -> float | None:
    """The rounds' wall time, summed; ``None`` when the rows hold none (a DP run with privacy.release=covered)."""
    times = [float(r["wall_s"]) for r in rows if r.get("wall_s") is not None]
    return sum(times) if times else None


def _privacy_facts(summary: dict | None) -> dict:
    """What a finished DP run's summary says about its noise and its re-charged rounds (for ``privacy_flags``)."""
    s = summary or {}
    return {"seeded_noise": s.get("seeded_noise"), "rounds_charged_again": len(s.get("rounds_charged_again") or [])}


def largest_epsilon(values: list) -> str:
    """The largest epsilon of a setting's runs (``inf`` if any run had no noise), 3 decimals; ``–`` if none."""
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not math.isnan(float(v))]
    return "–" if not vals else ("inf" if any(math.isinf(v) for v in vals) else f"{max(vals):.3f}")


def privacy_flags(runs: list[dict]) -> str:
    """`` (seeded noise in 2 runs; rounds charged again in 1)``, or empty when nothing is to flag."""
    seeded = sum(bool(r.get("seeded_noise")) for r in runs)
    charged = sum(r.get("rounds_charged_again", 0) > 0 for r in runs)
    parts = ([f"seeded noise in {seeded}"] if seeded else []) + ([f"rounds charged again in {charged}"] if charged
                                                                  else [])
    return f" ({'; '.join(parts)})" if parts else ""


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
            "epsilon": largest_epsilon([r["epsilon"] for r in done]) + privacy_flags(done),
            "has_epsilon": any(r["epsilon"] is not None for r in done),
            "personal_acc": _mean_std([r["personal_acc"] for r in done], ci=ci),
            "has_personal": any(r["personal_acc"] is not None for r in done),
            "mb_up": _mean([r["mb_up"] for r in done], ",.3f"),
            "compression_ratio": _mean([r["compression_ratio"] for r in done], ".2f"),
            # encoded transfers (fed.compress_up/down): the table adds MB up and the ratio
            "compressed": any(r["compression_ratio"] not in (None, 1.0) for r in done),
        })
    return rows


def _extras(rows: list[dict]) -> dict[str, bool]:
    """Which optional columns the settings need: epsilon (DP), personal acc, MB up + compression ratio."""
    return {"dp": any(r["has_epsilon"] for r in rows), "personal": any(r["has_personal"] for r in rows),
            "compressed": any(r["compressed"] for r in rows)}


def _head(coll: Collection, extras: dict[str, bool]) -> list[str]:
    cols = [coll.short.get(k, k) for k in coll.swept] or ["run"]
    return (cols + ["rounds", "n", "final acc", "best acc (test-chosen)"]
            + (["personal acc"] if extras["personal"] else []) + ["trainable params", "MB sent"]
            + (["MB up", "compression ratio"] if extras["compressed"] else []) + ["wall s"]
            + (["epsilon"] if extras["dp"] else []))


def _cells(coll: Collection, r: dict, extras: dict[str, bool]) -> list[str]:
    values = [value_text(r["values"].get(k), sep=", ") for k in coll.swept] or [r["setting"]]
    return (values + [r["rounds"], f"{r['n']}/{r['runs']}", r["final_acc"], r["best_acc"]]
            + ([r["personal_acc"]] if extras["personal"] else []) + [r["trainable_params"], r["mb_sent"]]
            + ([r["mb_up"], r["compression_ratio"]] if extras["compressed"] else []) + [r["wall_s"]]
            + ([r["epsilon"]] if extras["dp"] else []))


def _spread_text(ci: bool) -> str:
    return ("Mean ± half-width of the 95% Student-t interval" if ci else "Mean ± sample standard deviation")


def results_md(coll: Collection, ci: bool = False) -> str:
    rows = setting_rows(coll, ci)
    extras = _extras(rows)
    head = _head(coll, extras)
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
        lines.append("| " + " | ".join(_cells(coll, r, extras)) + " |")
    lines += ["", f"{_spread_text(ci)} over the finished runs (seeds) of each setting; a setting is one "
                  "config (rounds included), weights and data. n: finished runs / runs. best acc: the best "
                  "test accuracy over the evaluated rounds, chosen on the test set (optimistic; final acc is "
                  "the result). MB sent: up + down, all clients, whole run. wall s: the rounds' wall time, "
                  "summed."]
    if extras["dp"]:
        lines[-1] += (" epsilon: the largest over the setting's finished runs (not a mean: each run's guarantee "
                      "is its own); seeded noise: the noise derives from the seed, so that epsilon holds only "
                      "against whoever does not know the seed; rounds charged again: released rows were re-run "
                      "or an earlier attempt was charged (privacy.json).")
    if extras["compressed"]:
        lines[-1] += (" MB up: the clients' encoded updates alone; compression ratio: the same transfers' fp32 bytes "
                      "over their encoded bytes (fed.compress_up/down).")
    if extras["personal"]:
        lines[-1] += (" personal acc: each client's own model (global state + its local parts + its LoRA rank) on "
                      "its held-out samples, sample-weighted over clients, after the last round.")
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
    extras = _extras(rows)
    head = _head(coll, extras)
    keys = max(1, len(coll.swept))  # the setting's columns, left-aligned; numbers right-aligned
    lines = [f"% {coll.title}: {_spread_text(ci).lower()} over seeds; best acc chosen on the test set",
             r"\begin{tabular}{" + "l" * keys + "r" * (len(head) - keys) + "}",
             r"\toprule", " & ".join(_tex(h) for h in head) + r" \\", r"\midrule"]
    lines += [" & ".join(_tex(c) for c in _cells(coll, r, extras)) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"
