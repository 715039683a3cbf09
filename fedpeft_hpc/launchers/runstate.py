"""Where a run stands, read from its run directory and its job: what a sweep does next, and what a
report says about a run that has no result yet.

    finished     summary.json is there                     -> skipped by a sweep; in the tables
    queued       its job waits in the queue                -> left alone
    running      its job runs                              -> left alone
    interrupted  a checkpoint, no summary, no job left     -> resumed from the checkpoint
    failed       its job ended in an error (or left metrics without a checkpoint)  -> run again
    new          nothing yet                               -> run
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from fedpeft_hpc.launchers.jobstate import QUEUED, JobRef, JobStates, outcome
from fedpeft_hpc.utils.files import read_jsonl

STATES = ("finished", "queued", "running", "interrupted", "failed", "new")
TO_RUN = ("interrupted", "failed", "new")


@dataclass
class RunStatus:
    state: str
    rounds_done: int  # the last round in metrics.jsonl (0: none)
    checkpoint: bool  # checkpoints/latest.safetensors exists
    summary: dict | None
    job_state: str | None = None
    elapsed: str | None = None  # the job's time used so far (squeue), while it is queued or running

    @property
    def detail(self) -> str:
        if self.summary is not None:
            acc = self.summary.get("final_acc")
            return f"final_acc {acc:.4f}" if isinstance(acc, (int, float)) else "finished"
        parts = [f"round {self.rounds_done}" if self.rounds_done else "no round yet"]
        if self.job_state:
            parts.append(f"job {self.job_state}")
        return ", ".join(parts)


def summary_signature(run_dir: Path) -> tuple[int, int, int] | None:
    """What tells one ``summary.json`` from the next (written by an atomic rename: a new inode); the
    login node's clock is never compared with the file server's."""
    try:
        st = os.stat(Path(run_dir) / "summary.json")
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def read_summary(run_dir: Path) -> dict | None:
    p = run_dir / "summary.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # being replaced right now, or damaged: not a result


def run_status(run_dir: Path, job: JobRef | None = None, rows: list[dict] | None = None,
               jobs: JobStates | None = None) -> RunStatus:
    """The run's state; ``rows``: its ``metrics.jsonl`` rows when the caller has read them already;
    ``jobs``: the scheduler's answer for many runs at once (one query; else this run's job is asked alone)."""
    rows = read_jsonl(run_dir / "metrics.jsonl") if rows is None else rows
    done = int(rows[-1].get("round", 0)) if rows else 0
    ckpt = (run_dir / "checkpoints" / "latest.safetensors").is_file()
    summary = read_summary(run_dir)
    if summary is not None and (job is None or outcome(job) == "success"):
        return RunStatus("finished", done, ckpt, summary)  # its last job ended well: no scheduler query
    info = (jobs if jobs is not None else JobStates([job], accounting=True)).info(job)
    state_of_job, active = info.state, info.active
    if summary is not None and not active:
        return RunStatus("finished", done, ckpt, summary, state_of_job)
    if active:
        state = "queued" if state_of_job in QUEUED else "running"
        return RunStatus(state, done, ckpt, None, state_of_job, info.elapsed)
    failed = job is not None and outcome(job) == "error"
    if ckpt:
        return RunStatus("failed" if failed else "interrupted", done, ckpt, None, state_of_job)
    if failed or rows:
        return RunStatus("failed", done, ckpt, None, state_of_job)
    return RunStatus("new", done, ckpt, None, state_of_job)
