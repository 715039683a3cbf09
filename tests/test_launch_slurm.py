"""`fedpeft-hpc submit` and `sweep` against a real single-node SLURM (slurm/start_local_slurm.sh).

- submit of a 2-task CPU training through submitit's SLURM executor, `--wait`: the state of one process;
- a submitted job that gets the time-limit signal mid-run requeues itself, resumes from its checkpoint and
  ends bitwise equal to an uninterrupted run; the same for slurm/train.sbatch (its USR1 trap);
- a 2x2 grid x 2 seeds sweep goes in as ONE job array; `report` writes 8 rows / 4 settings; the same sweep
  again submits nothing; a sweep with one invalid value exits 2 and submits nothing;
- a 4-run sweep under `--wait` asks the scheduler at most once per 30 s plus a handful (counted through
  wrappers on the PATH), and `status` shows it; a second `submit` of a queued run.dir exits 2, `status` and
  `cancel` work on it; `slurm/train.sbatch` on a leased directory exits 2 without training.
This SLURM has no accounting daemon: job states may be UNKNOWN to submitit, so the commands and these
tests judge by `scontrol` and the run directories. CI, or FEDPEFT_TEST_SLURM=1 (tests/slurm_support.py).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fedpeft_hpc.cli import main
from fedpeft_hpc.runs.checkpoint import load_checkpoint
from fedpeft_hpc.utils.files import read_jsonl
from tests.conftest import QUICKSTART, REPO
from tests.slurm_support import SLURM_MARKS, clean_env, job_fields, known_job_ids

pytestmark = SLURM_MARKS

ROUNDS = 8
TINY = ("run.progress=false", "run.threads=1", "model.pretrained=false", f"fed.rounds={ROUNDS}",
        "fed.local_epochs=1", "fed.num_clients=8", "fed.clients_per_round=4", "data.min_samples=10",
        "comm.timeout_s=60")
CLI = [sys.executable, "-m", "fedpeft_hpc"]


@pytest.fixture
def job_env(monkeypatch):
    """This process's environment as the jobs it submits should inherit it (sbatch exports it): this
    checkout first on the path, one thread per task, no launcher variables of an outer job."""
    env = clean_env()
    for k in list(os.environ):
        if k not in env:
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def cli_main(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in this process (no second start-up of torch and timm); (status, stdout, stderr)."""
    rc = main(list(args))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=clean_env(),
                          cwd=REPO)


def ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted single-process run (1 thread) every SLURM run here must reproduce."""
    d = tmp_path_factory.mktemp("reference") / "run"
    ok(cli("train", str(QUICKSTART), f"run.dir={d}", *TINY))
    return d


def peft_state(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(run_dir / "checkpoints" / "latest.safetensors")
    assert ckpt.round == ROUNDS
    return ckpt.peft


def max_diff(a: Path, b: Path) -> float:
    sa, sb = peft_state(a), peft_state(b)
    assert sa.keys() == sb.keys()
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


def test_submit_two_tasks_waits_and_matches_one_process(slurm, reference, tmp_path, capsys, job_env):
    d = tmp_path / "two"
    rc, out, err = cli_main(capsys, "submit", str(QUICKSTART), f"run.dir={d}", *TINY, "--executor", "slurm",
                            "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "5", "--wait")
    assert rc == 0, out + err[-3000:]
    job = re.search(r"submitted slurm job (\d+)", out).group(1)
    assert f"{d / 'slurm' / job}_0_log.out" in out and f"run dir: {d}" in out
    assert json.loads(out.strip().splitlines()[-1]) == json.loads((d / "summary.json").read_text())
    rows = read_jsonl(d / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    assert all(r["world_size"] == 2 and r["allreduce_backend"] == "gloo" for r in rows)
    assert max_diff(d, reference) <= 1e-6
    assert [r["test_acc"] for r in rows] == [r["test_acc"] for r in read_jsonl(reference / "metrics.jsonl")]


def _interrupt_and_release(job: str, run_dir: Path, signal_cmd: list[str], timeout: float = 120) -> None:
    """Once round 2 is checkpointed, send ``signal_cmd``; when the job is back in the queue, let it start
    soon. SLURM holds a requeued job for its credential lifetime (121 s by default); a start within the
    second of the requeue is refused ("Job credential revoked", the job then FAILS), hence now+2."""
    deadline = time.monotonic() + timeout
    while not (run_dir / "checkpoints" / "round_00002.safetensors").is_file():
        assert time.monotonic() < deadline, f"job {job} wrote no round-2 checkpoint: {job_fields(job)}"
        time.sleep(0.1)
    assert (run_dir / "summary.json").exists() is False, "the run finished before it could be interrupted"
    subprocess.run(signal_cmd, check=True, env=clean_env(), timeout=30)
    while True:
        fields = job_fields(job)
        if fields.get("JobState") == "PENDING" and fields.get("Reason") == "BeginTime":
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+2"], check=True,
                           env=clean_env(), timeout=30)
            return
        assert fields.get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED"), f"not requeued: {fields}"
        assert time.monotonic() < deadline, f"job {job} was not requeued: {fields}"
        time.sleep(0.2)


def _assert_resumed_exactly(run_dir: Path, log: str, reference: Path, job: str) -> None:
    m = re.search(r"resuming \S+ after round (\d+)", log)
    assert m and 2 <= int(m.group(1)) < ROUNDS, log[-3000:]
    assert int(job_fields(job).get("Restarts", 0)) >= 1
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))  # no round twice, none lost
    sa, sb = peft_state(run_dir), peft_state(reference)
    assert all(torch.equal(sa[k], sb[k]) for k in sa), "requeued run differs from the uninterrupted one"
    ref_rows = read_jsonl(reference / "metrics.jsonl")
    assert [r["test_acc"] for r in rows] == [r["test_acc"] for r in ref_rows]
    assert json.loads((run_dir / "summary.json").read_text())["final_acc"] == \
        json.loads((reference / "summary.json").read_text())["final_acc"]


def test_submitted_job_requeued_at_its_time_limit_resumes_exactly(slurm, reference, tmp_path, capsys, job_env):
    d = tmp_path / "requeued"
    done: dict = {}

    def submit_and_wait() -> None:  # `fedpeft-hpc submit --wait`, in a thread of this process
        try:
            done["rc"] = main(["submit", str(QUICKSTART), f"run.dir={d}", *TINY, "--executor", "slurm",
                               "--cpus-per-task", "1", "--time", "5", "--wait"])
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            done["error"] = repr(e)

    waiter = threading.Thread(target=submit_and_wait, daemon=True)
    waiter.start()
    deadline = time.monotonic() + 120
    while not list((d / "slurm").glob("*_submitted.pkl")):
        assert waiter.is_alive() and time.monotonic() < deadline, f"not submitted: {done} {capsys.readouterr()}"
        time.sleep(0.1)
    job = next((d / "slurm").glob("*_submitted.pkl")).name.split("_")[0]
    # what SLURM sends `signal_delay_s` before the time limit (submitit's SlurmJob._interrupt(timeout=True))
    _interrupt_and_release(job, d, ["scancel", "--signal=USR2", job])
    waiter.join(timeout=240)
    out = capsys.readouterr().out
    assert not waiter.is_alive() and done.get("rc") == 0, f"{done}\n{out}"
    assert f"submitted slurm job {job}" in out
    # --wait followed it through the requeue, until the run's summary.json (one squeue per 30 s at most)
    assert out.strip().splitlines()[-2] == f"job {job}: run finished (summary.json written)"
    logs = "".join(p.read_text() for p in sorted((d / "slurm").glob(f"{job}_0_log.*")))
    assert "Requeued job" in logs  # submitit's handler requeued it (not a restart from scratch)
    _assert_resumed_exactly(d, logs, reference, job)


def test_plain_sbatch_script_requeues_on_usr1_and_resumes_exactly(slurm, reference, tmp_path):
    d, out = tmp_path / "sbatch", tmp_path / "job.out"
    env = clean_env(FEDPEFT_HPC=f"{sys.executable} -m fedpeft_hpc")
    sub = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=1", "--time=5", f"--output={out}",
                          str(REPO / "slurm" / "train.sbatch"), str(QUICKSTART), f"run.dir={d}", *TINY],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    try:
        # what --signal=B:USR1@120 sends to the batch shell two minutes before the time limit
        _interrupt_and_release(job, d, ["scancel", "--batch", "--signal=USR1", job])
        deadline = time.monotonic() + 180
        while job_fields(job).get("JobState") in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED", None):
            assert time.monotonic() < deadline, job_fields(job)
            time.sleep(0.5)
    finally:
        subprocess.run(["scancel", job], capture_output=True, env=clean_env(), timeout=30)
    log = out.read_text()
    assert job_fields(job)["JobState"] == "COMPLETED", log[-3000:]
    assert "SIGUSR1: time limit near, requeueing" in log and "srun exited with status 0" in log
    _assert_resumed_exactly(d, log, reference, job)


SWEEP = """\
base: {base}
name: grid2x2
grid:
  peft.method: [bias, lora]
  optim.lr: [0.05, {lr}]
overrides:
  run: {{progress: false, threads: 1}}
  model.pretrained: false
  fed: {{rounds: 2, local_epochs: 1, num_clients: 8, clients_per_round: 4}}
  data.min_samples: 10
seeds: [1, 2]
"""


def test_sweep_is_one_array_reported_and_not_submitted_twice(slurm, tmp_path, capsys, job_env):
    spec, out = tmp_path / "grid.yaml", tmp_path / "sweep"
    spec.write_text(SWEEP.format(base=QUICKSTART, lr=0.1))
    rc, stdout, stderr = cli_main(capsys, "sweep", str(spec), "--out", str(out), "--executor", "slurm",
                                  "--max-parallel", "2", "--cpus-per-task", "1", "--time", "5", "--wait")
    assert rc == 0, stdout + stderr[-3000:]
    manifest = json.loads((out / "sweep.json").read_text())
    runs = manifest["runs"]
    assert len(runs) == 8 and manifest["executor"] == "slurm"
    ids = [r["job"]["job_id"] for r in runs.values()]
    array = ids[0].split("_")[0]
    assert sorted(ids) == sorted(f"{array}_{i}" for i in range(8)), ids  # one array of 8 elements
    assert f"submitted 8 runs as SLURM job array {array}, at most 2 at once" in stdout
    assert all(r["state"] == "finished" for r in runs.values()), runs
    assert (out / "slurm" / f"{array}_submission.sh").read_text().count("#SBATCH --array=0-7%2") == 1

    assert cli_main(capsys, "report", str(out))[0] == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {r["state"] for r in rows} == {"finished"}
    assert {(r["peft.method"], r["optim.lr"]) for r in rows} == {(m, lr) for m in ("bias", "lora")
                                                                for lr in ("0.05", "0.1")}
    md = (out / "results.md").read_text()
    assert len(re.findall(r"^\| 0\.(05|1) \| (bias|lora) \| 2 \| 2/2 \|", md, flags=re.M)) == 4, md
    for png in ("accuracy_vs_round.png", "accuracy_vs_bytes.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    before = max(known_job_ids())
    rc, stdout, _ = cli_main(capsys, "sweep", str(spec), "--out", str(out), "--executor", "slurm",
                             "--max-parallel", "2")
    assert rc == 0 and "nothing to run" in stdout and "(8 finished); 0 to run" in stdout
    assert max(known_job_ids()) == before  # no sbatch
    assert [r["job"]["job_id"] for r in json.loads((out / "sweep.json").read_text())["runs"].values()] == ids


def test_sweep_with_an_invalid_value_exits_2_and_submits_nothing(slurm, tmp_path, capsys, job_env):
    spec, out = tmp_path / "bad.yaml", tmp_path / "sweep"
    spec.write_text(SWEEP.format(base=QUICKSTART, lr=-1))
    before = known_job_ids()
    rc, _, err = cli_main(capsys, "sweep", str(spec), "--out", str(out), "--executor", "slurm")
    assert rc == 2, err
    assert "runs lr=-1.0_method=bias_seed=1, lr=-1.0_method=bias_seed=2, lr=-1.0_method=lora_seed=1 and 1 more: " \
           "optim.lr: must be > 0.0, got -1.0" in err
    assert "4 of 8 runs are invalid, nothing was submitted" in err
    assert not out.exists()
    assert all(j <= max(before, default=0) for j in known_job_ids())  # no sbatch happened


# -- a good citizen of a shared cluster (issue 17) -------------------------------------------------------------
FOUR = SWEEP.replace("name: grid2x2", "name: four").replace("  optim.lr: [0.05, {lr}]\n", "")  # 2 methods x 2 seeds


def counting_path(tmp_path: Path) -> tuple[str, Path]:
    """A PATH whose squeue/scontrol/sacct/sbatch/scancel log every call to a file, then run the real one."""
    from tests.slurm_support import SBIN

    wrap, log = tmp_path / "counting", tmp_path / "scheduler_calls"
    wrap.mkdir()
    for tool in ("squeue", "scontrol", "sacct", "sbatch", "scancel"):
        real = shutil.which(tool, path=SBIN)
        (wrap / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\nexec {real} "$@"\n')
        (wrap / tool).chmod(0o755)
    return f"{wrap}{os.pathsep}{SBIN}", log


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_a_four_run_sweep_under_wait_asks_the_scheduler_rarely_and_status_shows_it(slurm, tmp_path, capsys,
                                                                                   job_env, monkeypatch):
    spec, out = tmp_path / "four.yaml", tmp_path / "sweep"
    spec.write_text(FOUR.format(base=QUICKSTART))
    path, log = counting_path(tmp_path)
    monkeypatch.setenv("PATH", path)
    t0 = time.monotonic()
    rc, stdout, stderr = cli_main(capsys, "sweep", str(spec), "--out", str(out), "--executor", "slurm",
                                  "--cpus-per-task", "1", "--time", "5", "--wait")
    wall = time.monotonic() - t0
    assert rc == 0, stdout + stderr[-3000:]
    made = calls(log)
    queries = [c for c in made if c.split()[0] in ("squeue", "scontrol", "sacct")]
    assert [c.split()[0] for c in made].count("sbatch") == 1
    # at most one query per 30 s of waiting plus a handful (the code before: 30 scontrol calls in 22 s)
    assert len(queries) <= wall / 30 + 3, (wall, made)
    log.unlink(missing_ok=True)
    rc, stdout, _ = cli_main(capsys, "status", str(out))
    assert rc == 0 and stdout.splitlines()[0] == "four: 4 run(s): 4 finished", stdout
    rows = stdout.splitlines()[2:]
    assert len(rows) == 4 and all(re.search(r" finished +2/2 +0\.\d{4} +\d+_\d ", r) for r in rows), stdout
    assert len(calls(log)) <= 1  # one squeue at most (none: every run's job ended well)
    with capsys.disabled():  # for the record (pytest -s): what was asked, and what status says
        print(f"\n{len(made)} scheduler calls in {wall:.0f} s: {made}\n{stdout}")


def test_one_job_per_run_directory_and_status_and_cancel_while_queued(slurm, tmp_path, capsys, job_env):
    held = tmp_path / "held.yaml"
    held.write_text("sbatch: {hold: true}\n")  # the job waits in the queue until released
    d = tmp_path / "run"
    args = ["submit", str(QUICKSTART), f"run.dir={d}", *TINY, "--executor", "slurm", "--cluster", str(held),
            "--cpus-per-task", "1", "--time", "5"]
    rc, out, err = cli_main(capsys, *args)
    assert rc == 0, err[-3000:]
    job = re.search(r"submitted slurm job (\d+)", out).group(1)
    try:
        rc, _, err = cli_main(capsys, *args)  # the same run.dir again while the first job is queued
        assert rc == 2 and f"is leased by slurm job {job}" in err and "Traceback" not in err
        assert max(known_job_ids()) == int(job)  # nothing submitted
        rc, out, _ = cli_main(capsys, "status", str(d))
        assert rc == 0 and re.search(rf"^run +queued \(PENDING\) +0/{ROUNDS} +- +{job} ", out, flags=re.M), out
        rc, out, _ = cli_main(capsys, "cancel", str(d))
        assert rc == 0 and f"cancelled slurm job {job} (queued): run" in out
        assert job_fields(job).get("JobState") in (None, "CANCELLED")
        rc, out, err = cli_main(capsys, *args)  # its job gone: the lease is stale, the run may go again
        assert rc == 0, err[-3000:]
        again = re.search(r"submitted slurm job (\d+)", out).group(1)
        subprocess.run(["scancel", again], env=clean_env(), timeout=30)
    finally:
        subprocess.run(["scancel", job], env=clean_env(), timeout=30)


def test_train_sbatch_on_a_leased_directory_exits_without_training(slurm, tmp_path):
    holder = subprocess.run(["sbatch", "--parsable", "--hold", "--time=5", "--wrap", "sleep 300"],
                            capture_output=True, text=True, env=clean_env(), timeout=60)
    assert holder.returncode == 0, holder.stderr
    held = holder.stdout.strip().split(";")[0]
    d, out = tmp_path / "leased", tmp_path / "job.out"
    d.mkdir()
    (d / "lease.json").write_text(json.dumps({"job": held, "executor": "slurm", "host": "login", "pid": None,
                                              "since": "2026-12-04T10:00:00", "refreshed": None}))
    env = clean_env(FEDPEFT_HPC=f"{sys.executable} -m fedpeft_hpc")
    try:
        sub = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=1", "--time=5", f"--output={out}",
                              str(REPO / "slurm" / "train.sbatch"), str(QUICKSTART), f"run.dir={d}", *TINY],
                             capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
        assert sub.returncode == 0, sub.stderr
        from tests.slurm_support import wait_for_job

        state, exit_code = wait_for_job(sub.stdout.strip().split(";")[0], timeout=180)
        log = out.read_text()
        assert (state, exit_code) == ("FAILED", "2:0"), log[-3000:]
        assert f"is leased by slurm job {held}" in log
        assert sorted(p.name for p in d.iterdir()) == ["lease.json"]  # nothing trained, nothing written
    finally:
        subprocess.run(["scancel", held], env=clean_env(), timeout=30)
