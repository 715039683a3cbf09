"""What the scheduler says about submitted jobs: ONE query for all of them, robust to a SLURM
without accounting.

A login node is shared: a tool that asks the controller about every job every few seconds gets
its user banned. ``JobStates`` asks ``squeue`` once for every job of a sweep, a run or a folder
of runs (``squeue -h -r -t all -j ID,ID,...``: slurmctld's own memory, which lists pending and
running jobs and keeps an ended one for MinJobAge, 300 s by default), and ``sacct`` once for the
jobs ``squeue`` no longer lists, only where the caller needs to name how they ended and only
while accounting exists (a cluster without slurmdbd answers "accounting storage is disabled"
once; it is not asked again by this process). ``wait_for`` polls the same way, at most once per
``poll_s`` (30 s, growing by half each poll up to 5 min), and between polls reads only the run
directories (a fresh ``summary.json`` ends the wait for that run without asking anyone).

A job ``squeue`` does not list is not active: slurmctld knows every pending and running job. Any
other failure of ``squeue`` (a controller timeout, an unreachable slurmctld) raises
``SlurmUnreachable``: a running job must never be taken for a dead one (its metrics set aside,
the run submitted again on top of itself). Without ``squeue`` on the PATH (a laptop reading a
copied sweep) there is nobody to ask and the state is ``None``. PREEMPTED and NODE_FAIL jobs may
be requeued by SLURM right after: they count as active for ``GRACE_S`` after they ended. A job
that is not active any more is judged by its run directory (``summary.json``), never by its
state alone: a requeued job passes through several states, and an old one has none left.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

from fedpeft_hpc.utils.scheduler import (GRACE_S, MAY_RETURN, QUEUED, TERMINAL, JobInfo, SlurmUnreachable,
                                         is_active, local_alive, sacct_states, squeue_snapshot)

__all__ = ["GRACE_S", "MAY_RETURN", "QUEUED", "TERMINAL", "JobInfo", "JobRef", "JobStates", "SlurmUnreachable",
           "is_active", "job_state", "local_alive", "outcome", "slurm_state", "wait_for"]

POLL_S = 30.0  # the first interval between two scheduler queries of `--wait`
MAX_POLL_S = 300.0  # the longest interval (each poll waits half as long again as the one before)


@dataclass(frozen=True)
class JobRef:
    """A submitted job: its executor (slurm, local, debug), id, and submitit folder (logs, pickles)."""

    executor: str
    job_id: str
    folder: str

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping | None) -> "JobRef | None":
        if not d or not d.get("job_id"):
            return None
        return cls(executor=str(d["executor"]), job_id=str(d["job_id"]), folder=str(d["folder"]))

    def log_paths(self) -> tuple[Path, Path]:
        """stdout and stderr of task 0 (rank 0)."""
        from submitit.core.utils import JobPaths

        paths = JobPaths(self.folder, job_id=self.job_id, task_id=0)
        return paths.stdout, paths.stderr


class JobStates:
    """What the scheduler says about a set of jobs, asked once (``refresh`` asks again): one ``squeue``
    for every SLURM job, ``sacct`` (with ``accounting=True``) once for those it no longer lists.
    Local jobs are ``RUNNING`` while their process lives; debug jobs ran inside their command."""

    def __init__(self, refs: Iterable[JobRef | None] = (), accounting: bool = False):
        self.refs = {r.job_id: r for r in refs if r is not None}
        self.accounting = accounting
        self._info: dict[str, JobInfo] | None = None

    def add(self, refs: Iterable[JobRef | None]) -> None:
        new = {r.job_id: r for r in refs if r is not None and r.job_id not in self.refs}
        self.refs.update(new)
        if new and self._info is not None:
            self._info = None  # asked again, with the new ones, on the next look-up

    def refresh(self) -> None:
        slurm = [j for j, r in self.refs.items() if r.executor == "slurm"]
        listed = squeue_snapshot(slurm)
        info = dict(listed or {})
        gone = [j for j in slurm if j not in info]
        if listed is not None and gone and self.accounting:
            info.update({j: JobInfo(s) for j, s in sacct_states(gone).items()})
        for j, r in self.refs.items():
            if r.executor == "local":
                info[j] = JobInfo("RUNNING" if local_alive(j) else None)
        self._info = info

    def info(self, ref: JobRef | None) -> JobInfo:
        if ref is None or ref.executor == "debug":
            return JobInfo(None)
        if ref.job_id not in self.refs:
            self.add([ref])
        if self._info is None:
            self.refresh()
        return self._info.get(ref.job_id, JobInfo(None))

    def state(self, ref: JobRef | None) -> str | None:
        return self.info(ref).state


def slurm_state(job_id: str) -> str | None:
    """One job's state (``squeue``, then ``sacct``); ``None`` when neither knows it."""
    return JobStates([JobRef("slurm", job_id, "")], accounting=True).state(JobRef("slurm", job_id, ""))


def job_state(ref: JobRef) -> str | None:
    """The scheduler's state of one job (asks for it alone: prefer one ``JobStates`` for many jobs)."""
    return JobStates([ref], accounting=True).state(ref)


def outcome(ref: JobRef) -> str | None:
    """``success`` or ``error`` from rank 0's submitit result file; ``None`` if there is none (killed,
    requeued, or still running)."""
    from submitit.core.utils import JobPaths, pickle_load

    path = JobPaths(ref.folder, job_id=ref.job_id, task_id=0).result_pickle
    if not path.is_file():
        return None
    try:
        return str(pickle_load(path)[0])
    except Exception:  # a half-written or foreign file says nothing
        return None


def wait_for(refs: Mapping[str, JobRef], poll_s: float = POLL_S,
             on_change: Callable[[str, str | None], None] | None = None,
             max_misses: int = 30, done: Callable[[str], bool] | None = None,
             tick_s: float = 2.0, max_poll_s: float = MAX_POLL_S) -> dict[str, str | None]:
    """Wait until no job in ``refs`` is active; returns the last state seen of each (``None``: unknown,
    ``"done"``: ``done(key)`` said its run finished). Every ``tick_s`` only ``done(key)`` is read (the
    run directory: free); the scheduler is asked once per poll for all jobs together, first after
    ``poll_s``, then at intervals growing by half up to ``max_poll_s``. ``on_change(key, state)`` is
    called whenever a job's state changes. A poll on which SLURM does not answer is skipped; more
    than ``max_misses`` of them in a row raise ``SlurmUnreachable``."""
    last: dict[str, str | None] = {}
    pending = dict(refs)
    interval = poll_s
    next_poll = time.monotonic() + interval
    misses = 0  # consecutive polls on which SLURM did not answer

    def seen(key: str, state: str | None) -> None:
        if key not in last or state != last[key]:
            last[key] = state
            if on_change is not None:
                on_change(key, state)

    while pending:
        for key in [k for k in pending if done is not None and done(k)]:
            seen(key, "done")
            del pending[key]
        for key in [k for k, r in pending.items() if r.executor != "slurm"]:  # no scheduler to ask: free
            state = JobStates([pending[key]]).state(pending[key])
            seen(key, state)
            if not is_active(state):
                del pending[key]
        if pending and time.monotonic() >= next_poll:
            try:
                states = JobStates(pending.values())
                states.refresh()  # the one squeue of this poll
                misses = 0
            except SlurmUnreachable:
                misses += 1
                if misses > max_misses:
                    raise
            else:
                for key, ref in list(pending.items()):
                    info = states.info(ref)
                    seen(key, info.state)
                    if not info.active:
                        del pending[key]
            interval = min(interval * 1.5, max(max_poll_s, poll_s))
            next_poll = time.monotonic() + interval
        if pending:
            time.sleep(max(0.0, min(tick_s, next_poll - time.monotonic())))
    return last
