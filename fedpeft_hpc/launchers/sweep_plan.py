"""A sweep's plan: every run of the sweep file with its resolved config, identity, directory and state.

Runs are known by what they compute (``runs/identity``), not by their names: a run whose
identity matches a run directory under ``--out`` (``identity.json``, or the ``config.yaml`` of a
run from before identities were recorded) is that run, whatever the directory is called, so
reordering the sweep file, adding a one-value axis or renaming never plans a finished run again.
A directory of the same config trained with other weights or other data is not this run: that is
an error naming what differs (never a silent skip, never old results reported as new).

The scheduler is asked once for the whole plan (``JobStates``: one ``squeue``, one ``sacct``); a
run's job is the one its lease names (``runs/lease``: the job submitted for it, until it ends),
else the one ``sweep.json`` last recorded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from fedpeft_hpc.config.schema import Config
from fedpeft_hpc.errors import ConfigError, UserError
from fedpeft_hpc.launchers.jobstate import JobRef, JobStates, SlurmUnreachable
from fedpeft_hpc.launchers.manifest import read_manifest
from fedpeft_hpc.launchers.runstate import TO_RUN, RunStatus, run_status
from fedpeft_hpc.launchers.sweep_spec import SweepRun, SweepSpec, override_items
from fedpeft_hpc.preflight import Preflight
from fedpeft_hpc.runs.identity import Identity, saved_identity
from fedpeft_hpc.runs.lease import read_lease


@dataclass
class PlannedRun:
    run: SweepRun
    cfg: Config
    dir: Path
    status: RunStatus
    job: JobRef | None  # the job that last ran it (its lease, else the manifest)
    identity: Identity | None = None
    attempts: int = 0  # how often a sweep submitted it (sweep.json)

    @property
    def to_run(self) -> bool:
        return self.status.state in TO_RUN


def run_overrides(spec: SweepSpec, run: SweepRun) -> dict:
    """Everything a run sets on top of the base config except run.dir: overrides, grid and zip values, seed."""
    return {**spec.overrides, **(run.values or run.setting), "seed": run.seed}


def lease_job(run_dir: Path) -> JobRef | None:
    """The job the run directory's lease names (submitted for it, or training in it)."""
    lease = read_lease(run_dir)
    if not lease or not lease.get("job"):
        return None
    return JobRef(str(lease.get("executor") or "slurm"), str(lease["job"]), str(lease.get("folder") or ""))


def run_jobs(out: Path, manifest_runs: dict) -> dict[str, JobRef]:
    """Directory name -> its job, for every run directory under ``out`` that has one."""
    jobs = {}
    for name, entry in manifest_runs.items():
        ref = JobRef.from_dict(entry.get("job"))
        if ref is not None:
            jobs[str(entry.get("dir", name))] = ref
    if out.is_dir():
        for d in out.iterdir():
            ref = lease_job(d) if d.is_dir() else None
            if ref is not None:
                jobs[d.name] = ref
    return jobs


def existing_identities(out: Path) -> dict[str, Identity]:
    """Directory name -> identity of every run directory under ``out``."""
    found = {}
    if out.is_dir():
        for d in sorted(out.iterdir()):
            ident = saved_identity(d) if d.is_dir() else None
            if ident is not None:
                found[d.name] = ident
    return found


def _place(run: SweepRun, ident: Identity, existing: dict[str, Identity], out: Path) -> SweepRun:
    """The run under the name of the directory that holds the same computation, if one does; an error
    when a directory holds the same config with other weights or data."""
    same = sorted((name for name, other in existing.items() if other.config == ident.config),
                  key=lambda n: n != run.name)  # its own name first
    for name in same:
        if not ident.differs_in(existing[name]):
            return dataclasses.replace(run, name=name)
    if same:
        differ = ident.differs_in(existing[same[0]])
        what = " and ".join({"weights": "other weights (model.checkpoint's content)",
                             "data": "other data (data.root's content)"}[d] for d in differ)
        raise ConfigError("model.checkpoint" if "weights" in differ else "data.root",
                          f"{out / same[0]} holds a run of this config trained with {what}; its results are "
                          "not this run's: use another --out for these weights or data")
    return run


def _lease_alive(states: JobStates):
    """Whether a lease's holder lives, from the plan's one scheduler query where the lease names a SLURM job."""
    from fedpeft_hpc.runs.lease import lease_alive

    def alive(lease: dict) -> bool:
        if lease.get("job") and lease.get("executor") == "slurm":
            return states.info(JobRef("slurm", str(lease["job"]), "")).active
        return lease_alive(lease)

    return alive


def _check_same_config(cfg: Config, run_dir: Path, status: RunStatus) -> None:
    from fedpeft_hpc.runs.rundir import RunDir

    diff = RunDir(run_dir, is_main=False).config_differences(cfg)
    if diff:
        what = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in diff[:4])
        raise ConfigError(diff[0][0], f"{run_dir} holds a {status.state} run with another config "
                                      f"({what}); use another --out for the changed sweep")


def _errors_text(spec: SweepSpec, errors: list[tuple[str, str]], n_ok: int) -> str:
    """One line per distinct problem, naming its runs (an unset variable in a path: said once, not per run)."""
    by_msg: dict[str, list[str]] = {}
    for name, msg in errors:
        by_msg.setdefault(msg, []).append(name)
    lines = []
    for msg, names in by_msg.items():
        who = f"run {names[0]}" if len(names) == 1 else (
            f"runs {', '.join(names[:3])}" + (f" and {len(names) - 3} more" if len(names) > 3 else ""))
        lines.append(f"{who}: {msg}")
    more = f"\n  ... and {len(lines) - 10} more problems" if len(lines) > 10 else ""
    return (f"sweep {spec.path}: {len(errors)} of {len(errors) + n_ok} runs are invalid, nothing was submitted:\n  "
            + "\n  ".join(lines[:10]) + more)


def plan(spec: SweepSpec, out: Path, pre: Preflight) -> list[PlannedRun]:
    """Every run with its resolved config, identity and state; raises one ``UserError`` listing each bad run."""
    from fedpeft_hpc.config.load import load_config
    from fedpeft_hpc.runs.rundir import RunDir

    manifest_runs = read_manifest(out).get("runs", {})
    try:
        base_cfg = load_config(spec.base, override_items(spec.overrides))
    except UserError as e:
        raise UserError(f"sweep {spec.path}: base {spec.base} with the overrides: {e}") from None
    attempts = {str(e.get("dir", n)): int(e.get("attempts", 0) or 0) for n, e in manifest_runs.items()}
    jobs = run_jobs(out, manifest_runs)
    states = JobStates(jobs.values(), accounting=True)  # one squeue (and one sacct) for the whole sweep
    existing = existing_identities(out)
    planned: list[PlannedRun] = []
    errors: list[tuple[str, str]] = []
    for run in spec.runs(base_cfg.seed):
        try:
            cfg = load_config(spec.base, override_items({**run_overrides(spec, run), "run.dir": str(out / run.name)}))
            ident = pre.check(cfg, run_dir=False).identity
            run = _place(run, ident, existing, out)
            run_dir = out / run.name
            cfg.run.dir = str(run_dir)
            job = jobs.get(run.name)
            status = run_status(run_dir, job, jobs=states)
            if status.state in ("finished", "queued", "running"):
                _check_same_config(cfg, run_dir, status)
            # a failed run without a checkpoint starts afresh (its files are set aside first)
            if status.state in TO_RUN and not (status.state == "failed" and not status.checkpoint):
                RunDir(run_dir, is_main=False).check(cfg, lease_alive=_lease_alive(states))  # resume, config, lease
        except SlurmUnreachable:
            raise  # not this run's fault: no run's state can be known
        except UserError as e:
            errors.append((run.name, str(e)))
            continue
        planned.append(PlannedRun(run, cfg, run_dir, status, job, ident, attempts.get(run.name, 0)))
    if errors:
        raise UserError(_errors_text(spec, errors, len(planned)))
    return planned
