"""Asking SLURM about jobs: one ``squeue`` for many jobs, ``sacct`` once, a local process's liveness.

A leaf (imports nothing of ours but ``errors``): the run directory's lease (``runs/lease.py``) and
the launchers (``launchers/jobstate.py``, which explains the policy) both ask through it.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from fedpeft_hpc.errors import UserError

# SLURM states after which a job does nothing more (a requeued job goes to PENDING instead).
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
                      "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"})
QUEUED = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESV_DEL_HOLD"})
# ended, but SLURM may requeue them right after (a preemption with PreemptMode=REQUEUE, a failed node)
MAY_RETURN = frozenset({"PREEMPTED", "NODE_FAIL"})
GRACE_S = 180.0  # how long such a job still counts as active after it ended



class SlurmUnreachable(UserError):
    """``scontrol`` failed for another reason than not knowing the job: the job's state is unknown."""


def _run(cmd: list[str]) -> subprocess.CompletedProcess | None:
    """The finished command; ``None`` when it is not installed. A timeout raises ``SlurmUnreachable``."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise SlurmUnreachable(f"cannot reach SLURM ({' '.join(cmd)}: no answer within 60 s); nothing was "
                               "changed, try again when the controller answers") from None
    except OSError as e:
        raise SlurmUnreachable(f"cannot reach SLURM ({' '.join(cmd)}: {e})") from None


def _unknown_job(res: subprocess.CompletedProcess) -> bool:
    return "invalid job id" in (res.stderr + res.stdout).lower()


@dataclass(frozen=True)
class JobInfo:
    """One job as the scheduler listed it: its state, time used (``squeue`` %M), when it ended."""

    state: str | None
    elapsed: str | None = None
    ended_s_ago: float | None = None  # None: not ended, or not known

    @property
    def active(self) -> bool:
        if self.state in MAY_RETURN:  # may be requeued right after: wait GRACE_S before calling it over
            return self.ended_s_ago is None or self.ended_s_ago < GRACE_S
        return is_active(self.state)


def _ended_s_ago(text: str) -> float | None:
    try:
        return max(0.0, (_dt.datetime.now() - _dt.datetime.fromisoformat(text)).total_seconds())
    except ValueError:  # "N/A", "Unknown": not ended
        return None


def _unreachable(cmd: list[str], res: subprocess.CompletedProcess) -> SlurmUnreachable:
    msg = " ".join((res.stderr or res.stdout).split()) or f"exit status {res.returncode}"
    shown = " ".join(cmd[:4] + (["..."] if len(cmd) > 4 else []))
    return SlurmUnreachable(f"cannot reach SLURM ({shown}: {msg}); nothing was changed, try again when the "
                            "controller answers")


def squeue_snapshot(job_ids: Iterable[str]) -> dict[str, JobInfo] | None:
    """Every listed job among ``job_ids`` (``123`` or array elements ``123_4``), from ONE ``squeue``
    call; a job it does not list is not active. ``None`` where there is no ``squeue`` to ask."""
    ids = sorted(set(job_ids))
    if not ids:
        return {}
    cmd = ["squeue", "-h", "-r", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T|%M|%e"]
    res = _run(cmd)
    if res is None:
        return None
    if res.returncode != 0:
        if _unknown_job(res):  # squeue's answer when the only job asked about is gone
            return {}
        raise _unreachable(cmd, res)
    out: dict[str, JobInfo] = {}
    for line in res.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 4 and parts[0]:
            state = parts[1].split()[0] if parts[1].strip() else None
            out[parts[0]] = JobInfo(state, parts[2] or None, _ended_s_ago(parts[3]))
    return out


_accounting = {"exists": True}  # one "accounting storage is disabled" is enough for this process


def sacct_states(job_ids: Iterable[str]) -> dict[str, str]:
    """How jobs ended, from ONE ``sacct`` call; empty without accounting (asked once per process)."""
    ids = sorted(set(job_ids))
    if not ids or not _accounting["exists"]:
        return {}
    res = _run(["sacct", "-n", "-X", "-P", "-j", ",".join(ids), "-o", "JobID,State"])
    if res is None or res.returncode != 0:
        _accounting["exists"] = res is not None and "disabled" not in (res.stderr + res.stdout).lower()
        return {}
    out = {}
    for line in res.stdout.splitlines():
        job, _, state = line.partition("|")
        if job.strip() in ids and state.split():
            out[job.strip()] = state.split()[0]
    return out


def local_alive(pid: str) -> bool:
    """A submitit local job (its controller process) is still running."""
    if not pid.isdigit():
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        try:
            os.kill(int(pid), 0)
        except OSError:
            return False
        return True  # no /proc (macOS): the process exists, trust it
    return b"submitit.local._local" in cmdline


def is_active(state: str | None) -> bool:
    return state is not None and state not in TERMINAL


