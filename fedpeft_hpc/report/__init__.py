"""``fedpeft-hpc report DIR``: tables and plots of the runs under DIR (a sweep, a run, or a folder of runs).

Writes ``results.csv``, ``results.md``, ``results.tex`` (booktabs), ``accuracy_vs_round.png`` and
``accuracy_vs_bytes.png`` (its Pareto front marked) into DIR (see ``collect``, ``tables``, ``plots``). Unfinished runs are rows with their state, never dropped.
"""

from __future__ import annotations

from pathlib import Path

FILES = ("results.csv", "results.md", "results.tex", "accuracy_vs_round.png", "accuracy_vs_bytes.png")


def write_report(path: str | Path, panels: list[str] | None = None, ci: bool = False) -> tuple[dict[str, Path], str]:
    """Write the five files into ``path`` (and ``personal_acc_vs_bytes.png`` / ``accuracy_vs_bytes_up.png`` where
    runs hold personal_acc / encoded transfers); returns their paths and the Markdown table.

    ``panels``: swept keys whose values get a plot panel each (``report.panels``); checked first.
    ``ci``: 95% Student-t intervals instead of standard deviations.
    """
    from fedpeft_hpc.report.collect import collect
    from fedpeft_hpc.report.plots import plot_accuracy_vs_bytes, plot_accuracy_vs_round
    from fedpeft_hpc.report.tables import results_csv, results_md, results_tex
    from fedpeft_hpc.utils.files import atomic_write, atomic_write_text

    path = Path(path)
    coll = collect(path)
    if panels:
        from fedpeft_hpc.report.panels import resolve_keys

        panels = resolve_keys(coll, panels)  # a bad key fails before anything is written
    out = {name: path / name for name in FILES}
    md = results_md(coll, ci)
    atomic_write_text(out["results.csv"], results_csv(coll))
    atomic_write_text(out["results.md"], md)
    atomic_write_text(out["results.tex"], results_tex(coll, ci))
    atomic_write(out["accuracy_vs_round.png"], lambda tmp: plot_accuracy_vs_round(coll, Path(tmp), panels))
    atomic_write(out["accuracy_vs_bytes.png"], lambda tmp: plot_accuracy_vs_bytes(coll, Path(tmp), panels))
    if any(r.get("compression_ratio") not in (None, 1.0) for rec in coll.runs for r in rec.metrics):
        # encoded transfers (fed.compress_up/down): accuracy against the uplink's bytes alone too
        out["accuracy_vs_bytes_up.png"] = path / "accuracy_vs_bytes_up.png"
        atomic_write(out["accuracy_vs_bytes_up.png"],
                     lambda tmp: plot_accuracy_vs_bytes(coll, Path(tmp), panels, up_only=True))
    if any(isinstance(r.get("personal_acc"), (int, float)) for rec in coll.runs for r in rec.metrics):
        # clients held samples out (data.client_test_fraction): their own models' accuracy too
        out["personal_acc_vs_bytes.png"] = path / "personal_acc_vs_bytes.png"
        atomic_write(out["personal_acc_vs_bytes.png"],
                     lambda tmp: plot_accuracy_vs_bytes(coll, Path(tmp), panels, metric="personal_acc"))
    return out, md
