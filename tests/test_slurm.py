"""`fedpeft-hpc train` under a real single-node SLURM (started by slurm/start_local_slurm.sh).

`srun` starts 2 ranks that must reach the single-process result; an `sbatch` script launches
the same training with `srun` inside, while its own shell (SLURM_NTASKS=2, no
SLURM_STEP_NUM_TASKS) counts as one process. They run in CI (where a missing SLURM fails them)
or with FEDPEFT_TEST_SLURM=1, and skip otherwise: see tests/slurm_support.py.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from fedpeft_hpc.runs.checkpoint import load_checkpoint
from fedpeft_hpc.utils.files import read_jsonl
from tests.conftest import QUICKSTART, REPO
from tests.slurm_support import SLURM_MARKS, clean_env, wait_for_job

pytestmark = SLURM_MARKS

OVERRIDES = ("run.progress=false", "run.threads=1", "fed.rounds=2", "fed.local_epochs=1",
             "model.pretrained=false", "peft.method=lora", "comm.timeout_s=60")


def train_args(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "fedpeft_hpc", "train", str(QUICKSTART), f"run.dir={run_dir}", *OVERRIDES]


def run(cmd: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=clean_env(), cwd=REPO)
    assert res.returncode == 0, (f"{shlex.join(cmd)} exited {res.returncode}\n"
                                 f"{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return res


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("single") / "run"
    run(train_args(d))
    return d


def assert_same_as_single(run_dir: Path, single: Path) -> None:
    ref = load_checkpoint(single / "checkpoints" / "latest.safetensors").peft
    got = load_checkpoint(run_dir / "checkpoints" / "latest.safetensors").peft
    assert ref.keys() == got.keys()
    assert max(float((ref[k] - got[k]).abs().max()) for k in ref) <= 1e-6
    ref_rows, rows = read_jsonl(single / "metrics.jsonl"), read_jsonl(run_dir / "metrics.jsonl")
    assert [r["test_acc"] for r in rows] == [r["test_acc"] for r in ref_rows]
    assert len(rows) == 2
    assert all(r["world_size"] == 2 and r["allreduce_backend"] == "gloo" for r in rows), rows


def test_srun_two_ranks_match_one_process(slurm, single, tmp_path):
    d = tmp_path / "srun"
    run(["srun", "--kill-on-bad-exit=1", "--time=5", "--immediate=60", "-n", "2", "--ntasks-per-node=2",
         "-c", "1", "--export=ALL", *train_args(d)])
    assert_same_as_single(d, single)


def test_sbatch_script_launches_srun_and_its_shell_is_no_rank(slurm, single, tmp_path):
    d, out = tmp_path / "sbatch", tmp_path / "job.out"
    probe = ("import os; from fedpeft_hpc.comm.world import detect_world; w = detect_world(); "
             "print('batch shell:', w.launcher, w.world_size, os.environ.get('SLURM_NTASKS'), "
             "os.environ.get('SLURM_STEP_NUM_TASKS'))")
    script = tmp_path / "job.sh"
    script.write_text("\n".join([
        "#!/bin/bash",
        "set -euo pipefail",
        f"cd {shlex.quote(str(REPO))}",
        f"{shlex.quote(sys.executable)} -c {shlex.quote(probe)}",
        f"srun --kill-on-bad-exit=1 {shlex.join(train_args(d))}",
        "echo batch done",
    ]) + "\n")
    sub = run(["sbatch", "--parsable", f"--job-name=fedpeft-test-{uuid.uuid4().hex[:8]}", "--time=5",
               "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={out}", str(script)])
    job = sub.stdout.strip().split(";")[0]
    try:
        state, exit_code = wait_for_job(job, timeout=180)
    finally:
        subprocess.run(["scancel", job], capture_output=True, env=clean_env(), timeout=30)  # no-op once done
    log = out.read_text() if out.exists() else "(no job output)"
    assert (state, exit_code) == ("COMPLETED", "0:0"), f"job {job}: {state} {exit_code}\n{log[-3000:]}"
    assert "batch shell: single 1 2 None" in log, log[-3000:]
    assert "batch done" in log
    assert (d / "summary.json").is_file() and (d / "checkpoints" / "latest.safetensors").is_file()
    assert_same_as_single(d, single)
