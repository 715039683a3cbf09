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

One sweep command works on a directory at a time: the lock (``DIR/.sweep.lock``, ``sweep_lock``) is
taken before planning, so a second command never plans from states the first is changing; it exits 2. A run's
``state`` in the manifest is one of ``runstate.STATES`` (just submitted to SLURM: ``queued``).
Runs the manifest lists from an earlier version of the sweep file whose directory exists stay in
it with ``"in_sweep": false``: never run again, but reported (they are finished runs in DIR).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fedpeft_hpc.errors import ConfigError, UserError
from fedpeft_hpc.launchers.jobstate import JobRef, JobStates, SlurmUnreachable
from fedpeft_hpc.launchers.manifest import FORMAT, MANIFEST, read_manifest
from fedpeft_hpc.launchers.sweep_lock import locked as _locked
from fedpeft_hpc.launchers.profile import ClusterProfile
from fedpeft_hpc.launchers.runstate import STATES, run_status, summary_signature
from fedpeft_hpc.launchers.sweep_plan import PlannedRun, plan, run_overrides
from fedpeft_hpc.launchers.sweep_spec import SweepSpec, short_names
from fedpeft_hpc.preflight import Preflight

__all__ = ["PlannedRun", "plan", "run_overrides", "run_sweep", "write_manifest"]

log = logging.getLogger(__name__)


def manifest_entry(p: PlannedRun, job: JobRef | None, state: str) -> dict:
    """One run in ``sweep.json``: its directory, swept values, identity, state, job, log."""
    entry = {"dir": p.run.name, "setting": p.run.setting, "setting_name": p.run.setting_name,
             "seed": p.run.seed, "overrides": {**p.run.values, "seed": p.run.seed},
             "state": state, "rounds": p.cfg.fed.rounds, "job": job.as_dict() if job else None,
             "attempts": p.attempts, "in_sweep": True}
    if p.identity is not None:
        entry["identity"], entry["setting_id"] = p.identity.run_id, p.identity.setting_id
    if job is not None and job.executor != "debug":
        entry["log"] = str(job.log_paths()[1])
    return entry


def _earlier_runs(out: Path, listed: dict) -> dict:
    """Runs of an earlier version of the sweep file: they stay listed (and reported), never run again."""
    old = {name: entry for name, entry in read_manifest(out).get("runs", {}).items()
           if name not in listed and (out / str(entry.get("dir", name))).is_dir()}
    states = JobStates((JobRef.from_dict(e.get("job")) for e in old.values()), accounting=True)
    runs = {}
    for name, entry in old.items():
        try:
            state = run_status(out / str(entry.get("dir", name)), JobRef.from_dict(entry.get("job")),
                               jobs=states).state
        except SlurmUnreachable:
            state = entry.get("state")  # as last seen
        runs[name] = {**entry, "state": state, "in_sweep": False}
    return runs


def write_manifest(out: Path, spec: SweepSpec, planned: list[PlannedRun], executor: str,
                   jobs: dict[str, JobRef], states: dict[str, str]) -> None:
    from fedpeft_hpc.utils.files import atomic_write_text

    short = short_names(spec.swept_keys)
    runs = {p.run.name: manifest_entry(p, jobs.get(p.run.name, p.job), states.get(p.run.name, p.status.state))
            for p in planned}
    runs.update(_earlier_runs(out, runs))
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
              dry_run: bool = False, wait: bool = False, echo=print, only: str | None = None,
              max_attempts: int | None = None) -> int:
    """The ``sweep`` command. Returns the exit status. ``only``: start only the runs in this state or whose
    name matches this glob; ``max_attempts``: never submit a run more often than this."""

    out = out.resolve()
    select = Selection(only, max_attempts)
    if dry_run:  # writes nothing, so it needs no lock
        return _plan_and_run(spec, out, executor, profile, max_parallel, True, wait, echo, select)
    with _locked(out):  # before planning: a second sweep must not plan from what the first is changing
        return _plan_and_run(spec, out, executor, profile, max_parallel, False, wait, echo, select)


@dataclass(frozen=True)
class Selection:
    """Which of the runs that are new, interrupted or failed this command starts (``--only``, ``--max-attempts``)."""

    only: str | None = None
    max_attempts: int | None = None

    def pick(self, planned: list[PlannedRun], echo) -> list[PlannedRun]:
        from fnmatch import fnmatchcase

        if self.only is not None and self.only not in STATES and not any(
                fnmatchcase(p.run.name, self.only) for p in planned):
            raise ConfigError("--only", f"{self.only!r} is neither a state ({', '.join(STATES)}) nor a glob "
                                        "matching a run name of this sweep")
        todo = [p for p in planned if p.to_run and (self.only is None or p.status.state == self.only
                                                    or fnmatchcase(p.run.name, self.only))]
        spent = [p for p in todo if self.max_attempts is not None and p.attempts >= self.max_attempts]
        for p in spent:
            echo(f"not started again: {p.run.name} ({p.status.state}) was submitted {p.attempts} time(s) "
                 f"(--max-attempts {self.max_attempts})")
        return [p for p in todo if p not in spent]


def _plan_and_run(spec: SweepSpec, out: Path, executor: str, profile: ClusterProfile, max_parallel: int | None,
                  dry_run: bool, wait: bool, echo, select: Selection) -> int:
    from fedpeft_hpc.launchers.executor import auto_parameters, local_preview, resolve_kind, sbatch_preview

    pre = Preflight()
    planned = plan(spec, out, pre)  # raises before anything is written
    todo = select.pick(planned, echo)
    counts = {s: sum(p.status.state == s for p in planned) for s in dict.fromkeys(p.status.state for p in planned)}
    echo(f"sweep {spec.name}: {len(planned)} runs in {shown(out)} ("
         + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"); {len(todo)} to run")
    kind = resolve_kind(executor, submitting=bool(todo) and not dry_run)
    _warn_time_budget(todo, planned, profile, kind, echo)
    if dry_run:
        echo(_table(planned))
        if todo and kind == "slurm":
            params = auto_parameters(profile, kind, f"fedpeft-{spec.name}", max_parallel)
            echo("\nwould submit one job array:\n" + sbatch_preview(out / "slurm", params, array_size=len(todo),
                                                                   python=profile.python))
        elif todo:
            echo("\nwould run with the " + local_preview(auto_parameters(profile, kind, spec.name))
                 + f", at most {max_parallel or 1} at a time")
        return 0
    if not todo:
        echo("nothing to run: every run is finished, queued or running, or not selected (`--dry-run` lists them)")
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


def _warn_time_budget(todo: list[PlannedRun], planned: list[PlannedRun], profile: ClusterProfile, kind: str,
                      echo) -> None:
    """The first run whose job may stop before it ends, at a measured rate (``timebudget``)."""
    from fedpeft_hpc.launchers.timebudget import budget_warning

    def like(p: PlannedRun) -> tuple:
        return p.cfg.peft.method, p.cfg.model.name, p.cfg.data.name

    for p in todo:
        warning = budget_warning(profile, kind, p.cfg, p.dir, [q.dir for q in planned if like(q) == like(p)])
        if warning:
            echo(warning, file=sys.stderr)
            return


def _submitted(p: PlannedRun, ref: JobRef) -> None:
    """The run belongs to its job now: its lease names it (a second submission is refused), one attempt more."""
    from fedpeft_hpc.runs.lease import lease_for_submission
    from fedpeft_hpc.runs.rundir import RunDir

    lease_for_submission(p.dir, ref.executor, ref.job_id, Path(ref.folder))
    RunDir(p.dir).write_planned_config(p.cfg)
    p.attempts += 1


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
    before = {p.run.name: summary_signature(p.dir) for p in todo}  # a new summary.json ends a run's wait
    # sbatch refusing the array leaves sweep.json as written above: these runs not submitted
    with submission(f"the job array of {len(todo)} run(s)",
                    f"; {shown(out / MANIFEST)} lists them without a job, run the sweep again once that is fixed"):
        with ex.batch():
            submitted = [ex.submit(TrainJob(_job_config(p))) for p in todo]
    jobs = {p.run.name: JobRef("slurm", j.job_id, str(folder)) for p, j in zip(todo, submitted)}
    for p in todo:
        _submitted(p, jobs[p.run.name])
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
        echo(f"  {jobs[name].job_id:<12} {name}: {'finished' if state == 'done' else state or 'gone'}")

    jobstate.wait_for(jobs, on_change=on_change, done=lambda name: summary_signature(out / name) != before[name])
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
                if kind == "local":
                    _submitted(p, jobs[p.run.name])
                else:
                    p.attempts += 1
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
    """Re-read every run's state, record it, say what is not finished; 0 if every run this command started
    finished."""
    states = {}
    asked = JobStates((jobs.get(p.run.name, p.job) for p in planned), accounting=True)  # one squeue for all
    for p in planned:
        job = jobs.get(p.run.name, p.job)
        st = run_status(p.dir, job if kind != "debug" else None, jobs=asked)
        states[p.run.name] = st.state
        p.status = st
    write_manifest(out, spec, planned, kind, jobs, states)
    unfinished = [p for p in planned if p.status.state != "finished"]
    bad = [p for p in unfinished if p.run.name in jobs]  # of the runs this command started
    for p in bad:
        log_hint = ""
        job = jobs.get(p.run.name, p.job)
        if job is not None and job.executor != "debug":
            log_hint = f"; log: {shown(job.log_paths()[1])}"
        echo(f"not finished: {p.run.name}: {p.status.state} ({p.status.detail}){log_hint}", file=sys.stderr)
    left = len(unfinished) - len(bad)
    echo(f"sweep {spec.name}: {len(planned) - len(unfinished)}/{len(planned)} runs finished"
         + (f" ({left} not started by this command: --only, --max-attempts)" if left else "")
         + f"; `fedpeft-hpc report {shown(out)}` writes the tables and plots")
    return 0 if not bad else 1
