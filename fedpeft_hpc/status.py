"""``fedpeft-hpc status DIR`` and ``fedpeft-hpc cancel DIR``: what a sweep, a run or a folder of runs is
doing, and stopping what it has queued or running.

Both read the run directories (``report.collect``: sweep.json, leases, metrics, summaries) and ask
the scheduler ONCE for all their jobs (one ``squeue``, one ``sacct`` where accounting exists); no
model or data is built, so they answer in a second on a login node. ``cancel`` sends one ``scancel``
for every queued or running SLURM job (local submitit jobs are stopped through submitit); the runs
are then interrupted, and the next ``sweep`` (or ``submit``) resumes them from their checkpoints.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from fedpeft_hpc.errors import UserError
from fedpeft_hpc.report.collect import Collection, RunRecord, collect

COLUMNS = ("run", "state", "rounds", "last acc", "job", "elapsed", "log")


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def run_line(rec: RunRecord) -> dict:
    """One run as ``status`` shows it: state, rounds done of planned, last test accuracy, job, elapsed, log."""
    job = rec.job if rec.job is not None and rec.job.executor != "debug" else None
    if rec.status.elapsed:  # the scheduler's time used, while the job is queued or running
        elapsed = rec.status.elapsed
    else:
        wall = [float(r["wall_s"]) for r in rec.metrics if isinstance(r.get("wall_s"), (int, float))]
        elapsed = _clock(sum(wall)) if wall else "-"
    log = job.log_paths()[1] if job is not None and job.folder else rec.dir / "train.log"
    acc = rec.last_acc
    return {"run": rec.name, "state": rec.status.state, "rounds_done": rec.status.rounds_done,
            "rounds": rec.rounds, "last_acc": acc, "job": job.job_id if job else None,
            "job_state": rec.status.job_state, "elapsed": elapsed, "log": str(log), "dir": str(rec.dir)}


def status_text(coll: Collection) -> str:
    lines = [run_line(r) for r in coll.runs]
    rows = [[d["run"], d["state"] + (f" ({d['job_state']})" if d["job_state"] and d["state"] != "finished" else ""),
             f"{d['rounds_done']}/{d['rounds'] if d['rounds'] is not None else '?'}",
             f"{d['last_acc']:.4f}" if d["last_acc"] is not None else "-", d["job"] or "-", d["elapsed"],
             _short(d["log"])] for d in lines]
    widths = [max(len(str(x)) for x in col) for col in zip(COLUMNS, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    states: dict[str, int] = {}
    for d in lines:
        states[d["state"]] = states.get(d["state"], 0) + 1
    head = f"{coll.title}: {len(lines)} run(s): " + ", ".join(f"{n} {s}" for s, n in states.items())
    return "\n".join([head, fmt.format(*COLUMNS)] + [fmt.format(*r) for r in rows])


def _short(path: str) -> str:
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def status(path: str | Path, as_json: bool = False) -> str:
    coll = collect(Path(path))
    if as_json:
        return json.dumps({"title": coll.title, "runs": [run_line(r) for r in coll.runs]}, indent=2)
    return status_text(coll)


def cancel(path: str | Path, echo=print) -> int:
    """Cancel every queued or running job of the runs under ``path``; returns the exit status."""
    coll = collect(Path(path))
    live = [r for r in coll.runs if r.status.state in ("queued", "running") and r.job is not None]
    if not live:
        echo(f"nothing queued or running in {path}")
        return 0
    slurm = [r for r in live if r.job.executor == "slurm"]
    if slurm:
        if shutil.which("scancel") is None:
            raise UserError("cancel: no `scancel` on the PATH (is this a SLURM login node?); nothing was cancelled")
        ids = sorted({r.job.job_id for r in slurm})
        res = subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            msg = " ".join((res.stderr or res.stdout).split())
            raise UserError(f"scancel {' '.join(ids[:4])}{' ...' if len(ids) > 4 else ''} failed: {msg}")
    for r in live:
        if r.job.executor == "local":
            from submitit.local.local import LocalJob

            LocalJob(r.job.folder, r.job.job_id).cancel(check=False)
    for r in live:
        echo(f"cancelled {r.job.executor} job {r.job.job_id} ({r.status.state}): {r.name}")
    echo(f"{len(live)} job(s) cancelled; the runs keep their checkpoints: `fedpeft-hpc sweep` (or `submit`) "
         "resumes them")
    return 0
