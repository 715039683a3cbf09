"""``fedpeft-hpc sweep SWEEP.yaml``: expand, validate every run, then run what is not done yet.

1. Expand the sweep file (``sweep_spec``) into named runs; each run's directory is ``DIR/NAME``.
2. Resolve and check every run's config (``Preflight``, memoised per model and data) and find
   its state (``runstate``). Any bad value: exit 2 naming the run and the key; nothing is
   submitted and nothing is written.
3. ``DIR/sweep.json`` (the manifest: run name -> overrides, state, job id, log) is written, then
   the runs that are new, interrupted or failed are started: on SLURM as ONE job array (each
   element a checkpointable job; ``--max-parallel`` is the array's concurrency limit), with the
   local executor at most ``--max-parallel`` at a time, with ``debug`` one after another in this
   process. Finished, queued and running runs are left alone, so running a sweep again only
   does what is missing; an interrupted run resumes from its checkpoint.

A failed run that left metrics but no checkpoint has its ``metrics.jsonl`` and ``config.yaml``
moved to ``failed-N/`` inside its directory before it runs again (nothing is deleted).

One sweep command works on a directory at a time: the lock (``DIR/.sweep.lock``) is taken before
planning, so a second command never plans from states the first is changing; it exits 2. A run's
``state`` in the manifest is one of ``runstate.STATES`` (just submitted to SLURM: ``queued``).
Runs the manifest lists from an earlier version of the sweep file whose directory exists stay in
it with ``"in_sweep": false``: never run again, but reported (they are finished runs in DIR).
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import logging
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from fedpeft_hpc.config.schema import Config
from fedpeft_hpc.errors import ConfigError, UserError
from fedpeft_hpc.launchers.jobstate import JobRef, SlurmUnreachable
from fedpeft_hpc.launchers.manifest import FORMAT, MANIFEST, read_manifest
from fedpeft_hpc.preflight import Preflight
from fedpeft_hpc.launchers.profile import ClusterProfile
from fedpeft_hpc.launchers.runstate import TO_RUN, RunStatus, run_status
from fedpeft_hpc.launchers.sweep_spec import SweepRun, SweepSpec, override_items, short_names

log = logging.getLogger(__name__)


@dataclass
class PlannedRun:
    run: SweepRun
    cfg: Config
    dir: Path
    status: RunStatus
    job: JobRef | None  # the job that last ran it (from the manifest)

    @property
    def to_run(self) -> bool:
        return self.status.state in TO_RUN


def run_overrides(spec: SweepSpec, run: SweepRun) -> dict:
    """Everything a run sets on top of the base config except run.dir: overrides, swept values, seed."""
    return {**spec.overrides, **run.setting, "seed": run.seed}


def plan(spec: SweepSpec, out: Path, pre: Preflight) -> list[PlannedRun]:
    """Every run with its resolved config and state; raises one ``UserError`` listing each bad run."""
    from fedpeft_hpc.config.load import load_config
    from fedpeft_hpc.runs.rundir import RunDir

    manifest_runs = read_manifest(out).get("runs", {})
    try:
        base_cfg = load_config(spec.base, override_items(spec.overrides))
    except UserError as e:
        raise UserError(f"sweep {spec.path}: base {spec.base} with the overrides: {e}") from None
    planned, errors = [], []
    for run in spec.runs(base_cfg.seed):
        run_dir = out / run.name
        try:
            cfg = load_config(spec.base, override_items({**run_overrides(spec, run), "run.dir": str(run_dir)}))
            job = JobRef.from_dict((manifest_runs.get(run.name) or {}).get("job"))
            status = run_status(run_dir, job)
            if status.state in ("finished", "queued", "running"):
                diff = RunDir(run_dir, is_main=False).config_differences(cfg)
                if diff:
                    what = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in diff[:4])
                    raise ConfigError(diff[0][0], f"{run_dir} holds a {status.state} run with another config "
                                                  f"({what}); use another --out for the changed sweep")
            # a failed run without a checkpoint starts afresh (its files are set aside first)
            check_dir = status.state in TO_RUN and not (status.state == "failed" and not status.checkpoint)
            pre.check(cfg, run_dir=check_dir)
        except SlurmUnreachable:
            raise  # not this run's fault: no run's state can be known
        except UserError as e:
            errors.append(f"run {run.name}: {e}")
            continue
        planned.append(PlannedRun(run, cfg, run_dir, status, job))
    if errors:
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise UserError(f"sweep {spec.path}: {len(errors)} of {len(errors) + len(planned)} runs are invalid, "
                        "nothing was submitted:\n  " + "\n  ".join(errors[:10]) + more)
    return planned


def write_manifest(out: Path, spec: SweepSpec, planned: list[PlannedRun], executor: str,
                   jobs: dict[str, JobRef], states: dict[str, str]) -> None:
    from fedpeft_hpc.utils.files import atomic_write_text

    short = short_names(spec.swept_keys)
    runs = {}
    for p in planned:
        job = jobs.get(p.run.name, p.job)
        entry = {"dir": p.run.name, "setting": p.run.setting, "setting_name": p.run.setting_name,
                 "seed": p.run.seed, "overrides": {**p.run.setting, "seed": p.run.seed},
                 "state": states.get(p.run.name, p.status.state), "rounds": p.cfg.fed.rounds,
                 "job": job.as_dict() if job else None, "in_sweep": True}
        if job is not None and job.executor != "debug":
            entry["log"] = str(job.log_paths()[1])
        runs[p.run.name] = entry
    # runs of an earlier version of the sweep file stay listed (and reported), never run again
    for name, entry in read_manifest(out).get("runs", {}).items():
        run_dir = out / str(entry.get("dir", name))
        if name not in runs and run_dir.is_dir():
            try:
                state = run_status(run_dir, JobRef.from_dict(entry.get("job"))).state
            except SlurmUnreachable:
                state = entry.get("state")  # as last seen
            runs[name] = {**entry, "state": state, "in_sweep": False}
    manifest = {
        "format": FORMAT, "name": spec.name, "sweep_file": str(spec.path.absolute()),
        "base": str(spec.base.absolute()), "swept": spec.swept_keys, "short_names": short,
        "overrides": spec.overrides, "seeds": list(dict.fromkeys(p.run.seed for p in planned)),
        "executor": executor, "updated": _dt.datetime.now().isoformat(timespec="seconds"), "runs": runs}
    # insertion order kept: the runs appear (and are reported) in the sweep's expansion order
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (shorter messages)."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """One sweep command per directory at a time (a second would start the same runs again). A
    directory this call created is removed again if the body fails before writing anything else."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory; give the sweep directory")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        f = open(out / ".sweep.lock", "w")
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the sweep directory ({e.strerror or e})") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another `fedpeft-hpc sweep` is working on {out} right now; nothing was "
                            "planned or submitted, run it again when that one is done") from None
        ok = False
        try:
            yield
            ok = True
        finally:
            if not ok and created and [p.name for p in out.iterdir()] == [".sweep.lock"]:
                (out / ".sweep.lock").unlink()
                out.rmdir()
            fcntl.flock(f, fcntl.LOCK_UN)


def _set_aside(run_dir: Path) -> None:
    """Move a failed attempt's metrics and config to ``failed-N/`` so the run can start afresh."""
    moved = [name for name in ("metrics.jsonl", "config.yaml") if (run_dir / name).exists()]
    if not moved:
        return
    k = 1
    while (run_dir / f"failed-{k}").exists():
        k += 1
    dest = run_dir / f"failed-{k}"
    dest.mkdir(parents=True)
    for name in moved:
        (run_dir / name).rename(dest / name)
    log.info("%s: the failed attempt's files are in %s", run_dir, dest)


def _table(planned: list[PlannedRun]) -> str:
    width = max([len(p.run.name) for p in planned] + [3])
    lines = [f"{'run':<{width}}  {'state':<11}  detail"]
    for p in planned:
        job = f" [job {p.job.job_id}]" if p.job is not None and p.job.executor != "debug" else ""
        lines.append(f"{p.run.name:<{width}}  {p.status.state:<11}  {p.status.detail}{job}")
    return "\n".join(lines)


def run_sweep(spec: SweepSpec, out: Path, executor: str, profile: ClusterProfile, max_parallel: int | None,
              dry_run: bool = False, wait: bool = False, echo=print) -> int:
    """The ``sweep`` command. Returns the exit status."""

    out = out.resolve()
    if dry_run:  # writes nothing, so it needs no lock
        return _plan_and_run(spec, out, executor, profile, max_parallel, True, wait, echo)
    with _locked(out):  # before planning: a second sweep must not plan from what the first is changing
        return _plan_and_run(spec, out, executor, profile, max_parallel, False, wait, echo)


def _plan_and_run(spec: SweepSpec, out: Path, executor: str, profile: ClusterProfile, max_parallel: int | None,
                  dry_run: bool, wait: bool, echo) -> int:
    from fedpeft_hpc.launchers.executor import auto_parameters, local_preview, resolve_kind, sbatch_preview

    pre = Preflight()
    planned = plan(spec, out, pre)  # raises before anything is written
    todo = [p for p in planned if p.to_run]
    counts = {s: sum(p.status.state == s for p in planned) for s in dict.fromkeys(p.status.state for p in planned)}
    echo(f"sweep {spec.name}: {len(planned)} runs in {shown(out)} ("
         + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"); {len(todo)} to run")
    kind = resolve_kind(executor, submitting=bool(todo) and not dry_run)
    if dry_run:
        echo(_table(planned))
        if todo and kind == "slurm":
            params = auto_parameters(profile, kind, f"fedpeft-{spec.name}", max_parallel)
            echo("\nwould submit one job array:\n" + sbatch_preview(out / "slurm", params, array_size=len(todo)))
        elif todo:
            echo("\nwould run with the " + local_preview(auto_parameters(profile, kind, spec.name))
                 + f", at most {max_parallel or 1} at a time")
        return 0
    if not todo:
        echo("nothing to run: every run is finished, queued or running (`--dry-run` lists them)")
        write_manifest(out, spec, planned, kind, {}, {})
        return 0
    for p in todo:
        if p.status.state == "failed" and not p.status.checkpoint and p.dir.exists():
            _set_aside(p.dir)
            p.status = run_status(p.dir)  # new now: nothing left to resume or to set aside
    write_manifest(out, spec, planned, kind, {}, {})
    if kind == "slurm":
        return _run_slurm(spec, out, planned, todo, profile, max_parallel, wait, echo)
    return _run_here(spec, out, planned, todo, kind, profile, max_parallel or 1, echo)


def _job_config(p: PlannedRun) -> dict:
    from fedpeft_hpc.config.load import to_dict

    return to_dict(p.cfg)


def _run_slurm(spec: SweepSpec, out: Path, planned: list[PlannedRun], todo: list[PlannedRun],
               profile: ClusterProfile, max_parallel: int | None, wait: bool, echo) -> int:
    from fedpeft_hpc.launchers import jobstate
    from fedpeft_hpc.launchers.executor import make_executor, submission
    from fedpeft_hpc.launchers.job import TrainJob

    folder = out / "slurm"
    ex = make_executor("slurm", folder, profile, f"fedpeft-{spec.name}", array_parallelism=max_parallel)
    # sbatch refusing the array leaves sweep.json as written above: these runs not submitted
    with submission(f"the job array of {len(todo)} run(s)",
                    f"; {shown(out / MANIFEST)} lists them without a job, run the sweep again once that is fixed"):
        with ex.batch():
            submitted = [ex.submit(TrainJob(_job_config(p))) for p in todo]
    jobs = {p.run.name: JobRef("slurm", j.job_id, str(folder)) for p, j in zip(todo, submitted)}
    states = {name: "queued" for name in jobs}  # just submitted: a run with its job in the queue
    write_manifest(out, spec, planned, "slurm", jobs, states)
    array_id = submitted[0].job_id.split("_")[0]
    limit = f", at most {max_parallel} at once" if max_parallel else ""
    echo(f"submitted {len(todo)} runs as SLURM job array {array_id}{limit}" if len(todo) > 1
         else f"submitted SLURM job {array_id}")
    for p in todo:
        echo(f"  {jobs[p.run.name].job_id:<12} {p.run.name}")
    echo(f"logs: {shown(folder)}/{array_id}_<i>_0_log.{{out,err}}; manifest: {shown(out / MANIFEST)}")
    if not wait:
        return 0

    def on_change(name: str, state: str | None) -> None:
        echo(f"  {jobs[name].job_id:<12} {name}: {state or 'gone'}")

    jobstate.wait_for(jobs, on_change=on_change)
    return _final(spec, out, planned, "slurm", jobs, echo)


def _run_here(spec: SweepSpec, out: Path, planned: list[PlannedRun], todo: list[PlannedRun], kind: str,
              profile: ClusterProfile, max_parallel: int, echo) -> int:
    """The local executor (subprocesses, ``max_parallel`` at a time) or debug (in this process)."""
    from fedpeft_hpc.launchers.executor import make_executor, submission
    from fedpeft_hpc.launchers.job import TrainJob

    folder = out / "slurm"
    ex = make_executor(kind, folder, profile, f"fedpeft-{spec.name}")
    jobs: dict[str, JobRef] = {}
    states: dict[str, str] = {}
    queue = list(todo)
    running: dict[str, tuple[PlannedRun, object, float]] = {}
    done = 0

    def finish(p: PlannedRun, t0: float) -> None:
        nonlocal done
        done += 1
        status = run_status(p.dir, jobs[p.run.name] if kind == "local" else None)
        states[p.run.name] = status.state
        took = time.monotonic() - t0
        echo(f"[{done}/{len(todo)}] {status.state:<9} {p.run.name} ({status.detail}, {took:.0f} s)")
        write_manifest(out, spec, planned, kind, jobs, states)

    try:
        while queue or running:
            while queue and len(running) < max_parallel:
                p = queue.pop(0)
                t0 = time.monotonic()
                with submission(f"run {p.run.name}"):
                    job = ex.submit(TrainJob(_job_config(p)))
                jobs[p.run.name] = JobRef(kind, str(job.job_id), str(folder))
                if kind == "debug":  # runs now, in this process
                    try:
                        job.result()
                    except Exception as e:  # noqa: BLE001 - the run failed; the sweep goes on
                        echo(f"run {p.run.name} failed: {type(e).__name__}: {e}", file=sys.stderr)
                    finish(p, t0)
                    continue
                running[p.run.name] = (p, job, t0)
                states[p.run.name] = "running"
                write_manifest(out, spec, planned, kind, jobs, states)
                echo(f"started {p.run.name} (local job {job.job_id})")
            for name, (p, job, t0) in list(running.items()):
                if job.done():
                    del running[name]
                    finish(p, t0)
            if running:
                time.sleep(0.5)
    except KeyboardInterrupt:
        for name, (p, job, _) in running.items():
            job.cancel(check=False)
            states[name] = "interrupted"
        write_manifest(out, spec, planned, kind, jobs, states)
        raise
    return _final(spec, out, planned, kind, jobs, echo)


def _final(spec: SweepSpec, out: Path, planned: list[PlannedRun], kind: str, jobs: dict[str, JobRef],
           echo) -> int:
    """Re-read every run's state, record it, say what is not finished; 0 if every run finished."""
    states = {}
    for p in planned:
        job = jobs.get(p.run.name, p.job)
        st = run_status(p.dir, job if kind != "debug" else None)
        states[p.run.name] = st.state
        p.status = st
    write_manifest(out, spec, planned, kind, jobs, states)
    bad = [p for p in planned if p.status.state != "finished"]
    for p in bad:
        log_hint = ""
        job = jobs.get(p.run.name, p.job)
        if job is not None and job.executor != "debug":
            log_hint = f"; log: {shown(job.log_paths()[1])}"
        echo(f"not finished: {p.run.name}: {p.status.state} ({p.status.detail}){log_hint}", file=sys.stderr)
    echo(f"sweep {spec.name}: {len(planned) - len(bad)}/{len(planned)} runs finished; "
         f"`fedpeft-hpc report {shown(out)}` writes the tables and plots")
    return 0 if not bad else 1
