"""submit/sweep/report when things around them go wrong: a held lock, an unreachable or refusing
SLURM (fake scontrol/sbatch on the PATH), bad --out/run.dir, a damaged sweep.json, clock skew, runs
dropped from the sweep file, and the requeue limits of slurm/train.sbatch."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from fedpeft_hpc.cli import main
from fedpeft_hpc.config import load_config
from fedpeft_hpc.config.load import dump_yaml
from fedpeft_hpc.launchers import jobstate, sweep
from fedpeft_hpc.launchers.jobstate import SlurmUnreachable
from fedpeft_hpc.launchers.runstate import STATES
from fedpeft_hpc.launchers.sweep_spec import load_sweep
from fedpeft_hpc.preflight import Preflight
from tests.conftest import QUICKSTART, REPO, tiny_overrides

TINY = """\
  run: {progress: false, threads: 1}
  model.pretrained: false
  fed: {rounds: 1, local_epochs: 1, num_clients: 8, clients_per_round: 4}
  data.min_samples: 10
"""


def sweep_file(tmp_path: Path, seeds: str = "[1]", name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(f"base: {QUICKSTART}\nname: e\ngrid:\n  peft.method: [head]\noverrides:\n{TINY}seeds: {seeds}\n")
    return p


def fake_tools(tmp_path: Path, monkeypatch, **scripts: str) -> Path:
    """Executables ``name`` -> shell body, first on the PATH."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        p = bin_dir / name
        p.write_text("#!/bin/sh\n" + body + "\n")
        p.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# -- L1: the lock comes before the planning ------------------------------------------------------------
def test_a_second_sweep_on_a_locked_directory_exits_2_without_planning(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    planned = []
    real_plan = sweep.plan
    monkeypatch.setattr(sweep, "plan", lambda *a, **k: planned.append(1) or real_plan(*a, **k))
    with sweep._locked(out):  # the first sweep command, still working
        rc, _, err = cli(capsys, "sweep", str(sweep_file(tmp_path)), "--out", str(out), "--executor", "local")
    assert rc == 2 and "another `fedpeft-hpc sweep` is working on" in err and "nothing was planned" in err
    assert planned == []  # it did not plan from the state the first one is changing
    assert not (out / "sweep.json").exists()


def test_a_sweep_that_fails_its_checks_leaves_no_directory_behind(tmp_path, capsys):
    out = tmp_path / "out"
    spec = sweep_file(tmp_path)
    spec.write_text(spec.read_text().replace("[head]", "[nosuch]"))
    rc, _, err = cli(capsys, "sweep", str(spec), "--out", str(out), "--executor", "local")
    assert rc == 2 and "nosuch" in err and not out.exists()


# -- L2: a failing squeue is not "no such job" -----------------------------------------------------------
def test_slurm_state_tells_an_unknown_job_from_an_unreachable_controller(tmp_path, monkeypatch):
    from fedpeft_hpc.utils import scheduler

    monkeypatch.setitem(scheduler._accounting, "exists", True)
    bin_dir = fake_tools(tmp_path, monkeypatch,
                        squeue='echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1',
                        sacct='echo "Slurm accounting storage is disabled" >&2; exit 1')
    assert jobstate.slurm_state("7") is None  # gone, and no accounting to say how it ended
    (bin_dir / "sacct").write_text("#!/bin/sh\necho '7|COMPLETED'\n")
    assert jobstate.slurm_state("7") is None  # accounting said once it is disabled: not asked again
    monkeypatch.setitem(scheduler._accounting, "exists", True)
    assert jobstate.slurm_state("7") == "COMPLETED"
    (bin_dir / "squeue").write_text("#!/bin/sh\necho '7|RUNNING|1:02|N/A'\n")
    assert jobstate.slurm_state("7") == "RUNNING"
    (bin_dir / "squeue").write_text(
        "#!/bin/sh\necho 'slurm_load_jobs error: Socket timed out on send/recv operation' >&2; exit 1\n")
    with pytest.raises(SlurmUnreachable, match=r"cannot reach SLURM \(squeue -h -r -t \.\.\.: slurm_load_jobs "
                                               r"error: Socket timed out on send/recv operation\)"):
        jobstate.slurm_state("7")


def test_one_squeue_answers_for_every_job_and_a_preempted_job_may_come_back(tmp_path, monkeypatch):
    log = tmp_path / "calls"
    fake_tools(tmp_path, monkeypatch, squeue=f'echo "$*" >> {log}; printf "3_0|RUNNING|0:05|N/A\\n'
                                             f'3_1|PREEMPTED|0:09|$(date +%Y-%m-%dT%H:%M:%S)\\n'
                                             f'3_2|PREEMPTED|0:09|2000-01-01T00:00:00\\n"')
    refs = [jobstate.JobRef("slurm", f"3_{i}", "/tmp") for i in range(4)]
    states = jobstate.JobStates(refs)
    infos = [states.info(r) for r in refs]
    assert len(log.read_text().splitlines()) == 1  # one query for all four
    assert [i.state for i in infos] == ["RUNNING", "PREEMPTED", "PREEMPTED", None]
    assert [i.active for i in infos] == [True, True, False, False]  # ended just now: SLURM may requeue it
    assert infos[0].elapsed == "0:05"


def test_a_sweep_moves_and_submits_nothing_when_squeue_fails(tmp_path, capsys, monkeypatch):
    fake_tools(tmp_path, monkeypatch, squeue='echo "slurm_load_jobs error: Unable to contact slurm controller" '
                                             '>&2; exit 1')
    out = tmp_path / "out"
    name = "seed=1"  # the one-value axis peft.method is not in the name
    (out / name).mkdir(parents=True)
    (out / name / "metrics.jsonl").write_text('{"round": 1}\n')  # a live run, between checkpoints
    manifest = {"format": sweep.FORMAT, "runs": {name: {"dir": name, "job": {
        "executor": "slurm", "job_id": "41_0", "folder": str(out / "slurm")}}}}
    (out / "sweep.json").write_text(json.dumps(manifest))
    rc, _, err = cli(capsys, "sweep", str(sweep_file(tmp_path)), "--out", str(out), "--executor", "local")
    assert rc == 2
    assert "cannot reach SLURM (squeue -h -r -t ...: slurm_load_jobs error: Unable to contact" in err
    assert "invalid" not in err  # not blamed on the run's config
    assert sorted(p.name for p in (out / name).iterdir()) == ["metrics.jsonl"]  # not set aside
    assert json.loads((out / "sweep.json").read_text()) == manifest


def test_waiting_survives_a_few_missed_polls_but_not_many(monkeypatch):
    answers = iter([SlurmUnreachable("x"), "RUNNING", SlurmUnreachable("x"), "COMPLETED"])

    def snapshot(ids):
        a = next(answers)
        if isinstance(a, Exception):
            raise a
        return {i: jobstate.JobInfo(a) for i in ids}

    monkeypatch.setattr(jobstate, "squeue_snapshot", snapshot)
    ref = jobstate.JobRef("slurm", "1", "/tmp")
    assert jobstate.wait_for({"j": ref}, poll_s=0, tick_s=0) == {"j": "COMPLETED"}
    monkeypatch.setattr(jobstate, "squeue_snapshot", lambda ids: (_ for _ in ()).throw(SlurmUnreachable("down")))
    with pytest.raises(SlurmUnreachable, match="down"):
        jobstate.wait_for({"j": ref}, poll_s=0, tick_s=0, max_misses=2)


def test_waiting_asks_the_scheduler_at_most_once_per_poll_interval_and_backs_off(monkeypatch):
    """--wait: the run directories (free) every tick; one squeue per poll, the polls 30 s apart and more."""
    clock = {"t": 0.0}
    asked = []
    monkeypatch.setattr(jobstate.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(jobstate.time, "sleep", lambda s: clock.__setitem__("t", clock["t"] + max(s, 0.01)))

    def snapshot(ids):
        asked.append(clock["t"])
        return {i: jobstate.JobInfo("RUNNING" if clock["t"] < 600 else "COMPLETED") for i in ids}

    monkeypatch.setattr(jobstate, "squeue_snapshot", snapshot)
    refs = {f"r{i}": jobstate.JobRef("slurm", f"9_{i}", "/tmp") for i in range(36)}
    finished = {"r0"}  # its summary.json appeared: no scheduler needed for it
    last = jobstate.wait_for(refs, done=lambda key: key in finished)
    assert last["r0"] == "done" and last["r1"] == "COMPLETED"
    gaps = [b - a for a, b in zip([0.0] + asked, asked)]
    assert asked and all(g >= 30 for g in gaps), gaps  # never more than one query per 30 s for 36 jobs
    assert gaps[1] > gaps[0] and max(gaps) <= 300  # backing off, at most 5 min apart
    assert len(asked) <= 600 / 30  # a handful over 10 minutes (was 36 scontrol calls every 2 s)


# -- L4: runs dropped from the sweep file stay listed and reported ----------------------------------------
def _finish_by_hand(planned) -> None:
    """What a finished run leaves, without training (its config is the one the sweep resolves)."""
    for p in planned:
        p.dir.mkdir(parents=True)
        (p.dir / "config.yaml").write_text(dump_yaml(p.cfg))
        (p.dir / "metrics.jsonl").write_text(json.dumps({"round": 1, "test_acc": 0.5}) + "\n")
        (p.dir / "summary.json").write_text(json.dumps({"final_acc": 0.5, "best_acc": 0.5}))


def test_runs_no_longer_in_the_sweep_file_are_kept_and_reported(tmp_path, capsys):
    out = tmp_path / "out"
    spec12 = load_sweep(sweep_file(tmp_path, "[1, 2]"))
    planned = sweep.plan(spec12, out, Preflight())
    _finish_by_hand(planned)
    sweep.write_manifest(out, spec12, planned, "debug", {}, {})

    spec13 = sweep_file(tmp_path, "[1, 3]", "s13.yaml")
    n = torch.get_num_threads()
    try:  # seed 3 trains in this process
        rc, stdout, err = cli(capsys, "sweep", str(spec13), "--out", str(out), "--executor", "debug")
    finally:
        torch.set_num_threads(n)
    assert rc == 0, err[-2000:]
    assert "2 runs in" in stdout and "1 to run" in stdout  # seed 2 is not planned, not run
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert {n: r["in_sweep"] for n, r in runs.items()} == {
        "seed=1": True, "seed=3": True, "seed=2": False}
    assert runs["seed=2"]["seed"] == 2 and runs["seed=2"]["state"] == "finished"

    assert cli(capsys, "report", str(out))[0] == 0
    with open(out / "results.csv") as f:
        rows = {r["name"]: r["state"] for r in csv.DictReader(f)}
    assert rows == {n: "finished" for n in runs}
    md = (out / "results.md").read_text()
    assert "3 runs: 3 finished." in md
    assert "1 of them not in the current sweep file" in md and "`seed=2`" in md
    assert "| base | 1 | 3/3 |" in md  # one row: no axis varies (peft.method has one value)

    # the sweep again: still listed, still not run
    rc, stdout, _ = cli(capsys, "sweep", str(spec13), "--out", str(out), "--executor", "debug")
    assert rc == 0 and "nothing to run" in stdout
    assert json.loads((out / "sweep.json").read_text())["runs"]["seed=2"]["in_sweep"] is False


# -- L5: sbatch refusing the job ---------------------------------------------------------------------------
SBATCH_REFUSES = 'echo "sbatch: error: invalid partition specified: nosuch" >&2; exit 1'


def test_submit_reports_what_sbatch_said(tmp_path, capsys, monkeypatch):
    fake_tools(tmp_path, monkeypatch, sbatch=SBATCH_REFUSES, srun="exit 0")
    rc, _, err = cli(capsys, "submit", str(QUICKSTART), *tiny_overrides(tmp_path / "r"), "--executor", "slurm",
                     "--partition", "nosuch")
    assert rc == 2 and "sbatch: error: invalid partition specified: nosuch" in err
    assert "Traceback" not in err and "was not submitted" in err


def test_a_refused_sweep_leaves_its_runs_unsubmitted_and_a_later_one_queued(tmp_path, capsys, monkeypatch):
    bin_dir = fake_tools(tmp_path, monkeypatch, sbatch=SBATCH_REFUSES, srun="exit 0",
                         squeue='echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1')
    out = tmp_path / "out"
    name = "seed=1"
    (out / name).mkdir(parents=True)
    (out / name / "metrics.jsonl").write_text('{"round": 1}\n')  # failed without a checkpoint
    rc, _, err = cli(capsys, "sweep", str(sweep_file(tmp_path)), "--out", str(out), "--executor", "slurm")
    assert rc == 2 and "sbatch: error: invalid partition specified: nosuch" in err and "Traceback" not in err
    entry = json.loads((out / "sweep.json").read_text())["runs"][name]
    assert entry["job"] is None and entry["state"] == "new"  # set aside, not submitted
    assert (out / name / "failed-1" / "metrics.jsonl").is_file()

    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'Submitted batch job 77'\n")
    rc, stdout, err = cli(capsys, "sweep", str(sweep_file(tmp_path)), "--out", str(out), "--executor", "slurm")
    assert rc == 0, err
    entry = json.loads((out / "sweep.json").read_text())["runs"][name]
    assert entry["job"]["job_id"].startswith("77") and entry["state"] == "queued" and entry["state"] in STATES
    assert not (out / name / "failed-2").exists()  # nothing to set aside: no empty failed-N/


# -- L6: --out and run.dir that cannot be directories -------------------------------------------------------
def test_out_and_run_dir_that_are_files_exit_2_naming_them(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("keep me")
    spec = str(sweep_file(tmp_path))
    rc, _, err = cli(capsys, "sweep", spec, "--out", str(f), "--executor", "local")
    assert rc == 2 and f"--out {f} is a file, not a directory" in err
    rc, _, err = cli(capsys, "sweep", spec, "--out", str(f / "sub"), "--executor", "local")
    assert rc == 2 and f"--out {f / 'sub'}: cannot create the sweep directory" in err
    rc, _, err = cli(capsys, "submit", str(QUICKSTART), *tiny_overrides(f), "--executor", "local")
    assert rc == 2 and f"run.dir: {f} is a file, not a directory" in err
    rc, _, err = cli(capsys, "train", str(QUICKSTART), *tiny_overrides(f / "sub"))
    assert rc == 2 and f"run.dir: {f / 'sub'} cannot be created: {f} is a file" in err
    rc, _, err = cli(capsys, "train", str(QUICKSTART), *tiny_overrides(f))
    assert rc == 2 and f"run.dir: {f} is a file, not a directory" in err
    assert f.read_text() == "keep me"


# -- L7: a sweep.json that is JSON but not a manifest ---------------------------------------------------------
@pytest.mark.parametrize("text, words", [
    ("[1, 2]", "a JSON object is expected, it holds a list"),
    ('{"format": "fedpeft-hpc-sweep/1", "runs": {"a": 3}}', '"runs" must map each run name to an object'),
    ('{"format": "fedpeft-hpc-sweep/1", "runs": [1]}', '"runs" must map each run name to an object'),
])
def test_a_malformed_manifest_is_a_user_error_naming_the_file(tmp_path, capsys, text, words):
    (tmp_path / "sweep.json").write_text(text)
    rc, _, err = cli(capsys, "report", str(tmp_path))
    assert rc == 2 and f"{tmp_path / 'sweep.json'}" in err and words in err


# -- L8: submit --wait does not compare clocks ----------------------------------------------------------------
class _FakeJob:
    job_id = "4242"


class _FakeExecutor:
    def __init__(self, write):
        self.write = write

    def submit(self, fn):
        self.write()
        return _FakeJob()


@pytest.mark.parametrize("rewrite, rc_expected", [(True, 0), (False, 1)])
def test_wait_judges_the_summary_by_the_file_not_by_the_clock(tmp_path, capsys, monkeypatch, rewrite, rc_expected):
    from fedpeft_hpc.launchers import executor
    from fedpeft_hpc.utils.files import atomic_write_text

    d = tmp_path / "r"
    summary = d / "summary.json"
    if not rewrite:  # a summary that was there before and that nothing replaces
        d.mkdir()
        summary.write_text('{"final_acc": 0.1}')

    def job_writes():
        if rewrite:
            d.mkdir(parents=True, exist_ok=True)
            atomic_write_text(summary, '{"final_acc": 0.5}')
            old = time.time() - 3600  # the file server's clock is an hour behind the login node's
            os.utime(summary, (old, old))

    monkeypatch.setattr(executor, "make_executor", lambda *a, **k: _FakeExecutor(job_writes))
    monkeypatch.setattr(jobstate, "wait_for", lambda refs, on_change=None, done=None: {"job": None})
    monkeypatch.setattr(Preflight, "check", lambda self, cfg, run_dir=True: _Checked())
    rc, out, err = cli(capsys, "submit", str(QUICKSTART), *tiny_overrides(d), "--executor", "local", "--wait")
    assert rc == rc_expected, err
    if rewrite:
        assert json.loads(out.strip().splitlines()[-1]) == {"final_acc": 0.5}
    else:
        assert "without writing" in err


class _Checked:
    trainable_params, resumes, weights_built_by_job = 1, False, False


# -- L9: slurm/train.sbatch stops requeueing ----------------------------------------------------------------------
def _sbatch_on_usr1(tmp_path: Path, monkeypatch, restarts: int, progress: bool, max_requeues: str = "3") -> str:
    """Run train.sbatch with a fake srun (waits for a file) and scontrol (records), send it SIGUSR1."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    ckpt = run_dir / "checkpoints" / "latest.safetensors"
    ckpt.write_bytes(b"round 1")
    bin_dir = fake_tools(tmp_path, monkeypatch,
                         srun=f'touch {tmp_path}/started; while [ ! -e {tmp_path}/stop ]; do sleep 0.1; done',
                         scontrol=f'echo "$@" >> {tmp_path}/scontrol.log')
    env = {**os.environ, "SLURM_JOB_ID": "9", "SLURM_RESTART_COUNT": str(restarts), "MAX_REQUEUES": max_requeues,
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(["bash", str(REPO / "slurm" / "train.sbatch"), "cfg.yaml", f"run.dir={run_dir}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "started").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        if progress:  # a new checkpoint: the atomic rename of the trainer
            (run_dir / "checkpoints" / "tmp").write_bytes(b"round 2")
            (run_dir / "checkpoints" / "tmp").replace(ckpt)
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        (tmp_path / "stop").touch()
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    scontrol = (tmp_path / "scontrol.log").read_text() if (tmp_path / "scontrol.log").exists() else ""
    return out + "\nSCONTROL:" + scontrol


def test_train_sbatch_requeues_only_with_progress_and_below_the_limit(tmp_path, monkeypatch):
    out = _sbatch_on_usr1(tmp_path / "a", monkeypatch, restarts=1, progress=True)
    assert "requeueing job 9 (restart 1 of at most 3)" in out and "SCONTROL:requeue 9" in out
    out = _sbatch_on_usr1(tmp_path / "b", monkeypatch, restarts=3, progress=True)
    assert "NOT requeueing job 9: it was requeued 3 times already (MAX_REQUEUES=3)" in out
    assert out.endswith("SCONTROL:")
    out = _sbatch_on_usr1(tmp_path / "c", monkeypatch, restarts=0, progress=False)
    assert "latest.safetensors did not change during this allocation (no progress)" in out
    assert out.endswith("SCONTROL:")


def test_train_sbatch_refuses_a_bad_max_requeues(tmp_path):
    res = subprocess.run(["bash", str(REPO / "slurm" / "train.sbatch"), "cfg.yaml"], capture_output=True, text=True,
                         env={**os.environ, "MAX_REQUEUES": "many"}, timeout=30)
    assert res.returncode == 2 and "MAX_REQUEUES=many: must be a whole number" in res.stderr


# -- L11 ----------------------------------------------------------------------------------------------------------
def test_a_base_that_is_a_directory_is_named_as_such(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(f"base: {tmp_path}\n")
    rc, _, err = cli(capsys, "sweep", str(spec), "--dry-run")
    assert rc == 2 and f"base: {tmp_path} is a directory, not a config file" in err


def test_setting_aside_nothing_creates_no_folder(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    sweep._set_aside(d)
    assert list(d.iterdir()) == []
    (d / "metrics.jsonl").write_text("{}\n")
    sweep._set_aside(d)
    assert [p.name for p in d.iterdir()] == ["failed-1"] and (d / "failed-1" / "metrics.jsonl").is_file()
