"""What the scheduler says about a submitted job, robust to a SLURM without accounting.

submitit asks ``sacct``; on a cluster without accounting (no slurmdbd) that fails and submitit
reports ``UNKNOWN``. Here the state comes from ``scontrol show job`` (slurmctld's own memory,
which keeps a finished job for MinJobAge, 300 s by default), then ``sacct``, else ``None``.
``None`` means "not active": only ``scontrol``'s own answer that it does not know the job
("Invalid job id specified") leads there, since slurmctld knows every pending and running job;
``sacct`` is asked only after that, to name how the job ended, and its failure (no accounting)
changes nothing. Any other failure of ``scontrol`` (a controller timeout, an unreachable
slurmctld) raises ``SlurmUnreachable``: a running job must never be taken for a dead one (its
metrics set aside, the run submitted again on top of itself). Without ``scontrol`` on the PATH
(a laptop reading a copied sweep) there is nobody to ask and the state is ``None``. A job
that is not active any more is judged by its run directory (``summary.json``), never by its
state alone: a requeued job passes through several states, and an old one has none left.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

from fedpeft_hpc.errors import UserError

# SLURM states after which a job does nothing more (a requeued job goes to PENDING instead).
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
                      "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"})
QUEUED = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESV_DEL_HOLD"})


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


def slurm_state(job_id: str) -> str | None:
    """``PENDING``, ``RUNNING``, ``COMPLETED``, ... of a job or array element (``123_4``); ``None`` when
    neither slurmctld nor the accounting knows it (or there is no ``scontrol`` to ask). Raises
    ``SlurmUnreachable`` when ``scontrol`` fails otherwise (see the module's docstring)."""
    res = _run(["scontrol", "-o", "show", "job", job_id])
    if res is None:
        return None
    if res.returncode == 0:
        for field in res.stdout.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
    if res.returncode != 0 and not _unknown_job(res):
        msg = " ".join((res.stderr or res.stdout).split()) or f"exit status {res.returncode}"
        raise SlurmUnreachable(f"cannot reach SLURM (scontrol -o show job {job_id}: {msg}); nothing was "
                               "changed, try again when the controller answers")
    # slurmctld does not know the job (any more): it is not active; accounting may say how it ended
    res = _run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"])
    if res is not None and res.returncode == 0 and res.stdout.strip():
        words = res.stdout.strip().splitlines()[0].split()
        return words[0] if words else None
    return None  # no rows, or no accounting (sacct fails): unknown, and certainly not active


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


def job_state(ref: JobRef) -> str | None:
    """The scheduler's state; local jobs are ``RUNNING`` while their process lives, else ``None``."""
    if ref.executor == "slurm":
        return slurm_state(ref.job_id)
    if ref.executor == "local":
        return "RUNNING" if local_alive(ref.job_id) else None
    return None  # debug jobs ran inside the command that submitted them


def is_active(state: str | None) -> bool:
    return state is not None and state not in TERMINAL


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


def wait_for(refs: Mapping[str, JobRef], poll_s: float = 2.0,
             on_change: Callable[[str, str | None], None] | None = None,
             max_misses: int = 30) -> dict[str, str | None]:
    """Poll until no job in ``refs`` is active; returns the last state seen of each (``None``: unknown).
    ``on_change(key, state)`` is called whenever a job's state changes. A poll on which SLURM does not
    answer is skipped; more than ``max_misses`` of them in a row raise ``SlurmUnreachable``."""
    last: dict[str, str | None] = {}
    pending = dict(refs)
    first = True
    misses = 0  # consecutive polls on which SLURM did not answer
    while pending:
        try:
            states = {key: job_state(ref) for key, ref in pending.items()}
        except SlurmUnreachable:
            misses += 1
            if misses > max_misses:
                raise
            time.sleep(poll_s)
            continue
        misses = 0
        for key, state in states.items():
            if first or state != last.get(key):
                last[key] = state
                if on_change is not None:
                    on_change(key, state)
            if not is_active(state):
                del pending[key]
        first = False
        if pending:
            time.sleep(poll_s)
    return last
