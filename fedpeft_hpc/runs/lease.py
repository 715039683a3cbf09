"""One job per run directory: ``run.dir/lease.json`` names the job (or process) that trains in it.

    {"job": "123_4", "executor": "slurm", "host": "node17", "pid": 4242,
     "since": "2026-12-04T23:10:00", "refreshed": "2026-12-04T23:41:07"}

``submit`` and ``sweep`` write it when they submit a run (the job id; the job has no process yet),
so a second submission is refused while the first waits in the queue. Rank 0 of the training takes
it over at its start (the same job: a requeue, or the submitted job starting), refreshes it every
round and removes it when the training ends. ``train`` (every rank, read-only, through
``RunDir.check``), ``submit``, ``sweep`` and ``slurm/train.sbatch`` (whose ranks run ``train``)
refuse a directory whose lease is live and not their own, with exit 2 naming the holder.

A lease is live while its SLURM job is queued or running (one ``squeue``; a preempted job for a
grace period), its local submitit job's process runs, or (no job) its process runs on this host.
A lease from another host without a job cannot be checked from here and counts as live: the
message says how to release it. A stale lease (its job or process gone) is taken over with a log
line. Without ``squeue`` on the PATH a SLURM lease cannot be checked either and counts as live.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
from pathlib import Path
from typing import Callable

from fedpeft_hpc.errors import ConfigError
from fedpeft_hpc.utils.files import atomic_write_json
from fedpeft_hpc.utils.scheduler import local_alive, squeue_snapshot

LEASE = "lease.json"

log = logging.getLogger(__name__)


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def this_process() -> dict:
    """Who would hold the lease from this process: its SLURM job (an array element as ``123_4``) or
    submitit local job, its host and pid."""
    env = os.environ
    job, executor = None, None
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job, executor = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}", "slurm"
    elif env.get("SLURM_JOB_ID"):
        job, executor = env["SLURM_JOB_ID"], "slurm"
    elif env.get("SUBMITIT_LOCAL_JOB_ID"):
        job, executor = env["SUBMITIT_LOCAL_JOB_ID"], "local"
    return {"job": job, "executor": executor, "host": socket.gethostname(), "pid": os.getpid()}


def read_lease(run_dir: Path) -> dict | None:
    try:
        data = json.loads((Path(run_dir) / LEASE).read_text())
    except (OSError, json.JSONDecodeError):
        return None  # none, or torn: nobody can be named, nothing to respect
    return data if isinstance(data, dict) else None


def holder_text(lease: dict) -> str:
    if lease.get("job"):
        return f"{lease.get('executor') or 'slurm'} job {lease['job']}"
    return f"process {lease.get('pid')} on {lease.get('host')}"


def is_ours(lease: dict, me: dict | None = None) -> bool:
    me = me or this_process()
    if lease.get("job") and me.get("job"):
        return str(lease["job"]) == str(me["job"]) and lease.get("executor") == me.get("executor")
    return lease.get("host") == me.get("host") and lease.get("pid") == me.get("pid")


def lease_alive(lease: dict) -> bool:
    """Whether the lease's holder may still train (see the module's docstring)."""
    job, executor = lease.get("job"), lease.get("executor")
    if job and executor == "slurm":
        listed = squeue_snapshot([str(job)])
        return True if listed is None else (str(job) in listed and listed[str(job)].active)
    same_host = lease.get("host") == socket.gethostname()
    if job and executor == "local":
        return local_alive(str(job)) if same_host else True
    pid = lease.get("pid")
    if not same_host or not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, another user's
    return True


def check_lease(run_dir: Path, alive: Callable[[dict], bool] | None = None) -> dict | None:
    """Raise ``ConfigError`` (exit 2) if another live job or process holds ``run_dir``; returns a stale
    lease of someone else (to be taken over), else ``None``. Reads only. ``alive``: ``lease_alive`` unless
    the caller knows better (a sweep asked the scheduler about all its runs' jobs at once)."""
    lease = read_lease(run_dir)
    if lease is None or is_ours(lease):
        return None
    if (alive or lease_alive)(lease):
        how = (f"`fedpeft-hpc cancel {run_dir}` stops it" if lease.get("job") else
               f"if that process is gone, remove {Path(run_dir) / LEASE}")
        raise ConfigError("run.dir", f"{run_dir} is leased by {holder_text(lease)} (since {lease.get('since')}, "
                                     f"last seen {lease.get('refreshed') or lease.get('since')}): one job per run "
                                     f"directory; wait for it to end, or {how}")
    return lease


def take_lease(run_dir: Path) -> None:
    """Rank 0 at the start of a training: hold the lease (a stale one is taken over, with a log line)."""
    stale = check_lease(run_dir)
    if stale is not None:
        log.warning("%s: taking over the stale lease of %s (gone; since %s)", run_dir, holder_text(stale),
                    stale.get("since"))
    old = read_lease(run_dir)
    since = old.get("since") if old is not None and stale is None else None
    folder = old.get("folder") if old is not None and stale is None else None
    atomic_write_json(Path(run_dir) / LEASE, {**this_process(), "folder": folder, "since": since or _now(),
                                              "refreshed": _now()})


def refresh_lease(run_dir: Path) -> None:
    """Rank 0 after every round: the lease says when its holder was last seen."""
    lease = read_lease(run_dir)
    if lease is not None and is_ours(lease):
        atomic_write_json(Path(run_dir) / LEASE, {**lease, "refreshed": _now()})


def release_lease(run_dir: Path) -> None:
    """Rank 0 when the training ends (well or not): the directory is free again."""
    lease = read_lease(run_dir)
    if lease is not None and is_ours(lease):
        try:
            (Path(run_dir) / LEASE).unlink()
        except OSError:
            pass


def lease_for_submission(run_dir: Path, executor: str, job_id: str, folder: Path) -> None:
    """``submit``/``sweep``: the run belongs to this job from now on (it takes the lease over at its start);
    ``folder``: the job's submitit folder (logs, result)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(run_dir) / LEASE, {"job": str(job_id), "executor": executor, "folder": str(folder),
                                              "host": socket.gethostname(), "pid": None, "since": _now(),
                                              "refreshed": None})
