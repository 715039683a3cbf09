"""A good citizen of a shared cluster, without a cluster (issue 17): leases, run identity, extending a run,
reports that never mix settings, status and cancel with ONE scheduler query (fake squeue/scancel on the
PATH), the progress bar only on a terminal. The same on a real SLURM: tests/test_launch_slurm.py.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fedpeft_hpc.cli import main
from fedpeft_hpc.runs.checkpoint import load_checkpoint
from fedpeft_hpc.utils.files import read_jsonl
from tests.conftest import QUICKSTART, run_cli, tiny_overrides
from tests.test_report import make_run

TINY = """\
  run: {progress: false, threads: 1}
  fed: {rounds: 1, local_epochs: 1, num_clients: 8, clients_per_round: 4}
  data.min_samples: 10
"""


def fake_tools(tmp_path: Path, **scripts: str) -> Path:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def cli(capsys, *args: str) -> tuple[int, str, str]:
    n = torch.get_num_threads()
    try:
        rc = main(list(args))
    finally:
        torch.set_num_threads(n)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# -- 6: a finished run extended to more rounds ---------------------------------------------------------------
def test_a_finished_run_extended_to_more_rounds_equals_an_uninterrupted_run(tmp_path):
    ext, ref = tmp_path / "extended", tmp_path / "reference"
    for d, rounds in ((ext, 2), (ref, 3)):
        res = run_cli("train", str(QUICKSTART), *tiny_overrides(d), f"fed.rounds={rounds}")
        assert res.returncode == 0, res.stderr[-2000:]
    res = run_cli("train", str(QUICKSTART), *tiny_overrides(ext), "fed.rounds=3")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming" in res.stderr and "after round 2" in res.stderr  # one more round, not three
    assert [r["round"] for r in read_jsonl(ext / "metrics.jsonl")] == [1, 2, 3]
    a, b = (load_checkpoint(d / "checkpoints" / "latest.safetensors") for d in (ext, ref))
    assert a.round == b.round == 3 and all(torch.equal(a.peft[k], b.peft[k]) for k in b.peft)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (ext, ref))
    assert (sa["final_acc"], sa["rounds"], sa["bytes_total"]) == (sb["final_acc"], 3, sb["bytes_total"])

    # under DP the noise was calibrated for the rounds planned: an extension says so and changes nothing
    saved = yaml.safe_load((ext / "config.yaml").read_text())
    saved["privacy"].update({"mode": "client", "noise_multiplier": 1.0})
    (ext / "config.yaml").write_text(yaml.safe_dump(saved))
    before = sorted(p.name for p in ext.iterdir())
    res = run_cli("train", str(QUICKSTART), *tiny_overrides(ext), "fed.rounds=4", "privacy.mode=client",
                  "privacy.noise_multiplier=1.0")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "fed.rounds" in res.stderr and "planned for 3 rounds" in res.stderr and "more privacy" in res.stderr
    assert sorted(p.name for p in ext.iterdir()) == before


# -- 2: one job per run directory ------------------------------------------------------------------------------
def test_train_refuses_a_leased_directory_and_takes_over_a_stale_lease(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    holder = subprocess.Popen(["sleep", "120"])
    try:
        lease = {"job": None, "executor": None, "host": socket.gethostname(), "pid": holder.pid,
                 "since": "2026-12-04T10:00:00", "refreshed": "2026-12-04T10:05:00"}
        (d / "lease.json").write_text(json.dumps(lease))
        res = run_cli("train", str(QUICKSTART), *tiny_overrides(d))
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert f"is leased by process {holder.pid} on {socket.gethostname()}" in res.stderr
        assert sorted(p.name for p in d.iterdir()) == ["lease.json"]  # nothing trained, nothing written

        # a SLURM job that squeue lists as running holds it too; the message says how to stop it
        bin_dir = fake_tools(tmp_path, squeue='echo "12_3|RUNNING|1:00:00|N/A"')
        (d / "lease.json").write_text(json.dumps({**lease, "job": "12_3", "executor": "slurm", "pid": None}))
        res = run_cli("train", str(QUICKSTART), *tiny_overrides(d), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        assert res.returncode == 2 and "is leased by slurm job 12_3" in res.stderr
        assert f"fedpeft-hpc cancel {d}" in res.stderr
    finally:
        holder.kill()
        holder.wait()
    # its job gone (squeue lists nothing): stale, taken over with a log line; released at the end
    bin_dir = fake_tools(tmp_path, squeue="exit 0")
    res = run_cli("train", str(QUICKSTART), *tiny_overrides(d), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "taking over the stale lease of slurm job 12_3" in res.stderr
    assert (d / "summary.json").is_file() and not (d / "lease.json").exists()


def test_the_lease_is_held_and_refreshed_while_training(tmp_path):
    d = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fedpeft_hpc", "train", str(QUICKSTART),
                             *tiny_overrides(d, "fed.rounds=30")], env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                        "PYTHONPATH": str(Path.cwd())},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (d / "metrics.jsonl").is_file() or len(read_jsonl(d / "metrics.jsonl")) < 2:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        lease = json.loads((d / "lease.json").read_text())
        assert lease["pid"] == proc.pid and lease["host"] == socket.gethostname() and lease["refreshed"]
        res = run_cli("train", str(QUICKSTART), *tiny_overrides(d, "fed.rounds=30"))
        assert res.returncode == 2 and f"leased by process {proc.pid}" in res.stderr
    finally:
        proc.kill()
        proc.wait()


# -- 3: runs known by what they compute -------------------------------------------------------------------------
def _sweep(tmp_path: Path, name: str, grid: str, extra: str = "") -> Path:
    p = tmp_path / name
    p.write_text(f"base: {QUICKSTART}\nname: ident\ngrid:\n{grid}overrides:\n{TINY}{extra}seeds: [1]\n")
    return p


def test_a_reordered_sweep_with_a_one_value_axis_plans_nothing_new(tmp_path, capsys):
    out = tmp_path / "out"
    first = _sweep(tmp_path, "a.yaml", "  optim.lr: [0.05, 0.1]\n  peft.method: [bias, head]\n",
                   "  model.pretrained: false\n")
    rc, stdout, err = cli(capsys, "sweep", str(first), "--out", str(out), "--executor", "debug")
    assert rc == 0, err[-2000:]
    names = sorted(json.loads((out / "sweep.json").read_text())["runs"])
    assert all((out / n / "identity.json").is_file() for n in names)
    # keys reordered, 0.1 written 1.0e-1, and optim.momentum: [0.9] added at the base's own value
    second = _sweep(tmp_path, "b.yaml", "  peft.method: [head, bias]\n  optim.momentum: [0.9]\n"
                                        "  optim.lr: [1.0e-1, 0.05]\n", "  model.pretrained: false\n")
    rc, stdout, _ = cli(capsys, "sweep", str(second), "--out", str(out), "--executor", "debug")
    assert rc == 0 and "(4 finished); 0 to run" in stdout and "nothing to run" in stdout
    # a directory renamed (an older naming scheme) is still found by what it computes
    (out / names[0]).rename(out / "renamed")
    rc, stdout, _ = cli(capsys, "sweep", str(second), "--out", str(out), "--executor", "debug")
    assert rc == 0 and "(4 finished); 0 to run" in stdout
    assert "renamed" in json.loads((out / "sweep.json").read_text())["runs"]


def test_other_weights_under_the_same_out_are_refused_not_reported_as_old_results(tmp_path, capsys,
                                                                                  pretrained_ckpt):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "out"
    spec = _sweep(tmp_path, "w.yaml", "  peft.method: [head, bias]\n", f"  model.checkpoint: {pretrained_ckpt}\n")
    rc, _, err = cli(capsys, "sweep", str(spec), "--out", str(out), "--executor", "debug")
    assert rc == 0, err[-2000:]
    summaries = {p: p.read_text() for p in out.glob("*/summary.json")}
    other = tmp_path / "other_weights.safetensors"
    tensors = load_file(str(pretrained_ckpt))
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in tensors.items()}, str(other))
    spec.write_text(spec.read_text().replace(str(pretrained_ckpt), str(other)))
    rc, stdout, err = cli(capsys, "sweep", str(spec), "--out", str(out), "--executor", "debug")
    assert rc == 2 and "nothing was submitted" in err
    assert "trained with other weights (model.checkpoint's content)" in err and "use another --out" in err
    assert {p: p.read_text() for p in out.glob("*/summary.json")} == summaries


def test_an_unset_variable_in_a_path_is_named_once(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FEDPEFT_WEIGHTS", raising=False)
    spec = _sweep(tmp_path, "v.yaml", "  peft.method: [head, bias, lora]\n",
                  "  model.checkpoint: $FEDPEFT_WEIGHTS/vit.safetensors\n")
    rc, _, err = cli(capsys, "sweep", str(spec), "--out", str(tmp_path / "out"), "--executor", "debug")
    assert rc == 2 and "Traceback" not in err
    assert err.count("environment variable FEDPEFT_WEIGHTS is not set") == 1, err
    assert "runs method=head_seed=1, method=bias_seed=1, method=lora_seed=1:" in err


# -- 4: reports that never mix settings ------------------------------------------------------------------------
def test_runs_of_one_setting_with_other_rounds_are_separate_rows(tmp_path, capsys):
    from fedpeft_hpc.report import write_report

    out = tmp_path / "mixed"
    runs = {}
    for seed, rounds, accs in ((1, 5, [0.5] * 4 + [0.6]), (2, 5, [0.5] * 4 + [0.62]),
                               (3, 20, [0.7] * 19 + [0.8]), (4, 20, [0.7] * 19 + [0.84])):
        name = f"method=bias_seed={seed}"
        make_run(out / name, seed=seed, accs=accs, rounds=rounds)
        runs[name] = {"dir": name, "setting": {"peft.method": "bias"}, "setting_name": "method=bias",
                      "seed": seed, "rounds": rounds, "job": None}
    (out / "sweep.json").write_text(json.dumps({
        "format": "fedpeft-hpc-sweep/1", "name": "mixed", "swept": ["peft.method"],
        "short_names": {"peft.method": "method"}, "runs": runs}))
    _, md = write_report(out)
    assert "| method | rounds | n | final acc | best acc (test-chosen) |" in md
    assert "| bias | 5 | 2/2 | 0.6100 ± 0.0141 |" in md and "| bias | 20 | 2/2 | 0.8200 ± 0.0283 |" in md
    assert "chosen on the test set" in md
    # --ci: 95% t-intervals (t(0.975, 1) = 12.706); results.tex beside results.md
    assert main(["report", str(out), "--ci"]) == 0
    md = (out / "results.md").read_text()
    assert "| bias | 5 | 2/2 | 0.6100 ± 0.1271 |" in md and "95% Student-t" in md
    tex = (out / "results.tex").read_text()
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert r"bias & 20 & 2/2 & 0.8200 $\pm$ 0.2541" in tex


# -- 1: status and cancel: one scheduler query -------------------------------------------------------------------
@pytest.fixture
def queued_sweep(tmp_path):
    """A sweep of 3 runs whose jobs are 7_0 (running, 1 round done), 7_1 (pending), 7_2 (finished)."""
    out = tmp_path / "sw"
    runs = {}
    for i, (accs, finished) in enumerate((([0.4], False), (None, False), ([0.5, 0.6], True))):
        name = f"lr=0.{i + 1}_seed=1"
        if accs is not None:
            make_run(out / name, seed=1, accs=accs, rounds=2, finished=finished)
        runs[name] = {"dir": name, "setting": {"optim.lr": 0.1 * (i + 1)}, "setting_name": name[:-7], "seed": 1,
                      "rounds": 2, "job": {"executor": "slurm", "job_id": f"7_{i}", "folder": str(out / "slurm")}}
    (out / "sweep.json").write_text(json.dumps({"format": "fedpeft-hpc-sweep/1", "name": "sw", "swept": ["optim.lr"],
                                                "short_names": {"optim.lr": "lr"}, "runs": runs}))
    calls = tmp_path / "calls"
    bin_dir = fake_tools(tmp_path, squeue=f'echo "squeue $*" >> {calls}; printf "7_0|RUNNING|0:42|N/A\\n'
                                          f'7_1|PENDING|0:00|N/A\\n7_2|COMPLETED|1:10|2026-12-04T10:00:00\\n"',
                         sacct=f'echo "sacct $*" >> {calls}; exit 1', scancel=f'echo "scancel $*" >> {calls}')
    return out, bin_dir, calls


def test_status_shows_every_run_from_one_squeue(queued_sweep, capsys, monkeypatch):
    out, bin_dir, calls = queued_sweep
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    rc, stdout, _ = cli(capsys, "status", str(out))
    assert rc == 0
    assert calls.read_text().splitlines() == ["squeue -h -r -t all -j 7_0,7_1,7_2 -o %i|%T|%M|%e"]  # one for all
    lines = {line.split()[0]: line.split() for line in stdout.splitlines()[2:]}
    assert lines["lr=0.1_seed=1"][1:6] == ["running", "(RUNNING)", "1/2", "0.4000", "7_0"]
    assert lines["lr=0.1_seed=1"][6] == "0:42" and lines["lr=0.1_seed=1"][7].endswith("slurm/7_0_0_log.err")
    assert lines["lr=0.2_seed=1"][1:6] == ["queued", "(PENDING)", "0/2", "-", "7_1"]
    assert lines["lr=0.3_seed=1"][1:5] == ["finished", "2/2", "0.6000", "7_2"]
    assert stdout.splitlines()[0] == "sw: 3 run(s): 1 running, 1 queued, 1 finished"
    rc, stdout, _ = cli(capsys, "status", str(out), "--json")
    assert [r["state"] for r in json.loads(stdout)["runs"]] == ["running", "queued", "finished"]


def test_cancel_sends_one_scancel_for_everything_queued_or_running(queued_sweep, capsys, monkeypatch):
    out, bin_dir, calls = queued_sweep
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    rc, stdout, _ = cli(capsys, "cancel", str(out))
    assert rc == 0 and "2 job(s) cancelled" in stdout
    assert [c for c in calls.read_text().splitlines() if c.startswith("scancel")] == ["scancel 7_0 7_1"]


def test_sweep_only_and_max_attempts_choose_what_starts(tmp_path, capsys):
    out = tmp_path / "out"
    spec = _sweep(tmp_path, "o.yaml", "  optim.lr: [0.05, 0.1]\n", "  model.pretrained: false\n")
    rc, stdout, err = cli(capsys, "sweep", str(spec), "--out", str(out), "--executor", "debug",
                          "--only", "lr=0.1_*")
    assert rc == 0, err[-2000:]
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert {n: r["state"] for n, r in runs.items()} == {"lr=0.05_seed=1": "new", "lr=0.1_seed=1": "finished"}
    assert runs["lr=0.1_seed=1"]["attempts"] == 1
    rc, _, err = cli(capsys, "sweep", str(spec), "--out", str(out), "--executor", "debug", "--only", "nosuch*")
    assert rc == 2 and "--only: 'nosuch*' is neither a state" in err
    rc, stdout, _ = cli(capsys, "sweep", str(spec), "--out", str(out), "--executor", "debug", "--only", "new",
                        "--max-attempts", "1")
    assert rc == 0 and "1 to run" in stdout
    shutil.rmtree(out / "lr=0.1_seed=1" / "checkpoints")  # its attempt failed: metrics, no checkpoint
    (out / "lr=0.1_seed=1" / "summary.json").unlink()
    rc, stdout, _ = cli(capsys, "sweep", str(spec), "--out", str(out), "--executor", "debug", "--max-attempts", "1")
    assert rc == 0 and "not started again: lr=0.1_seed=1 (failed) was submitted 1 time(s)" in stdout
    assert not (out / "lr=0.1_seed=1" / "failed-1").exists()  # left as it is


# -- 6: the progress bar only on a terminal ------------------------------------------------------------------------
def test_no_progress_bar_in_logs(tmp_path):
    from tests.conftest import subprocess_env

    d = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "fedpeft_hpc", "train", str(QUICKSTART), *tiny_overrides(d),
                          "run.progress=true"], capture_output=True, timeout=300, env=subprocess_env())
    assert res.returncode == 0, res.stderr[-2000:]
    # bytes, not text: text mode would turn the bar's carriage returns into newlines
    assert b"\r" not in res.stderr and b"\r" not in (d / "train.log").read_bytes()
    assert b"trainable" in res.stderr  # the log itself is there


# -- 5: profiles that fit the cluster --------------------------------------------------------------------------
def _preview(tmp_path: Path, text: str) -> str:
    from fedpeft_hpc.launchers.executor import auto_parameters, sbatch_preview
    from fedpeft_hpc.launchers.profile import load_profile

    (tmp_path / "p.yaml").write_text(text)
    profile = load_profile(tmp_path / "p.yaml")
    return sbatch_preview(tmp_path, auto_parameters(profile, "slurm", "x"), python=profile.python)


def test_profiles_infer_tasks_from_gres_render_booleans_and_choose_the_python(tmp_path, capsys):
    script = _preview(tmp_path, "sbatch: {gres: 'gpu:a100:4', exclusive: false, requeue: true}\n"
                                "python: apptainer exec /img/fedpeft.sif python\n")
    assert "#SBATCH --ntasks-per-node=4" in script  # one rank per GPU of the gres (was 1: 2 ranks on 8 GPUs)
    assert "#SBATCH --gres=gpu:a100:4" in script and "#SBATCH --requeue" in script
    assert "exclusive" not in script  # false: left out (was `--exclusive=False`)
    assert "apptainer exec /img/fedpeft.sif python -u -m submitit.core._submit" in script
    (tmp_path / "bad.yaml").write_text("gpus_per_node: 2\nsbatch: {gres: 'gpu:4'}\n")
    rc = main(["submit", str(QUICKSTART), *tiny_overrides(tmp_path / "r"), "--cluster", str(tmp_path / "bad.yaml"),
               "--dry-run", "--executor", "slurm"])
    err = capsys.readouterr().err
    assert rc == 2 and "gpus_per_node: 2 GPUs per node, but sbatch" in err and "requests 4" in err


def test_slurm_cpus_per_task_sets_threads_without_submitit():
    from fedpeft_hpc.comm.runtime import Runtime
    from fedpeft_hpc.config.schema import CommConfig

    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1", "SLURM_LOCALID": "0",
           "SLURM_CPUS_PER_TASK": "1"}
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        Runtime.start(CommConfig(device="cpu"), env=env).close()  # what srun and sbatch give a task
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(n)


def test_a_time_budget_below_the_measured_need_is_warned_about(tmp_path):
    from fedpeft_hpc.config import load_config
    from fedpeft_hpc.launchers.profile import ClusterProfile
    from fedpeft_hpc.launchers.timebudget import budget_warning

    d, other = tmp_path / "new", tmp_path / "measured"
    other.mkdir()
    (other / "metrics.jsonl").write_text("".join(json.dumps({"round": k, "wall_s": 600.0}) + "\n" for k in (1, 2)))
    cfg = load_config(QUICKSTART, [f"run.dir={d}", "fed.rounds=120"])  # 120 rounds x 10 min = 20 h
    profile = ClusterProfile(time_min=240, max_requeues=3)  # 4 allocations of 4 h = 16 h
    warning = budget_warning(profile, "slurm", cfg, d, [other])
    assert warning and "needs about 20.0 h" in warning and "= 16.0 h" in warning and str(other) in warning
    assert budget_warning(ClusterProfile(time_min=240, max_requeues=4), "slurm", cfg, d, [other]) is None
    assert budget_warning(profile, "slurm", cfg, d) is None  # no measured rate: nothing is claimed


def test_a_sweep_lock_without_flock(tmp_path, monkeypatch):
    import errno
    import fcntl

    from fedpeft_hpc.errors import UserError
    from fedpeft_hpc.launchers.sweep_lock import locked

    def no_flock(*_):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    out = tmp_path / "out"
    with locked(out):
        assert (out / ".sweep.lock.d" / "holder").is_file()
        with pytest.raises(UserError, match="no flock: if that command is gone, remove"):
            with locked(out):
                pass
    assert not (out / ".sweep.lock.d").exists()


# -- 6: bench writes where it says, BENCHMARKS.md only when asked ----------------------------------------------------
def test_bench_writes_its_rows_under_a_named_directory_not_into_the_working_directory(tmp_path, monkeypatch):
    from fedpeft_hpc.bench import registry
    from fedpeft_hpc.bench.report import Row
    from fedpeft_hpc.bench.run import run_bench

    class Quick:
        name = "quick"

        @staticmethod
        def fn(ctx):
            return [Row("batched vs sequential clients", "bias, 2 clients", 1.5, key="batched_speedup")]

    monkeypatch.setattr(registry, "measurements", lambda suite, device: [Quick])
    monkeypatch.chdir(tmp_path)
    n = torch.get_num_threads()
    try:
        assert run_bench(threads=1, out=str(tmp_path / "results")) == 0
        assert not (tmp_path / "BENCHMARKS.md").exists()  # was appended to ./BENCHMARKS.md of any directory
        assert "| batched vs sequential clients |" in (tmp_path / "results" / "bench.md").read_text()
        assert run_bench(threads=1, out=None, markdown=str(tmp_path / "BENCHMARKS.md")) == 0  # when asked
        assert (tmp_path / "BENCHMARKS.md").is_file()
    finally:
        torch.set_num_threads(n)


def test_without_sweep_json_a_running_job_is_known_by_its_lease_and_not_submitted_again(tmp_path, capsys,
                                                                                       monkeypatch):
    spec = _sweep(tmp_path, "l.yaml", "  peft.method: [head]\n", "  model.pretrained: false\n")
    out = tmp_path / "out"
    d = out / "seed=1"
    (d / "checkpoints").mkdir(parents=True)
    (d / "checkpoints" / "latest.safetensors").write_bytes(b"between two checkpoints of a live job")
    (d / "metrics.jsonl").write_text('{"round": 1}\n')
    (d / "lease.json").write_text(json.dumps({"job": "55_0", "executor": "slurm", "folder": str(out / "slurm"),
                                              "host": "login", "pid": None, "since": "2026-12-04T10:00:00"}))
    bin_dir = fake_tools(tmp_path, squeue='echo "55_0|RUNNING|0:10:00|N/A"')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    rc, stdout, err = cli(capsys, "sweep", str(spec), "--out", str(out), "--dry-run")  # no sweep.json
    assert rc == 0, err[-2000:]
    assert "(1 running); 0 to run" in stdout and "[job 55_0]" in stdout
    # its job gone (cancelled): interrupted, resumed; the stale lease is judged by the plan's one squeue
    calls = tmp_path / "calls"
    (bin_dir / "squeue").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    rc, stdout, err = cli(capsys, "sweep", str(spec), "--out", str(out), "--dry-run")
    assert rc == 0 and "(1 interrupted); 1 to run" in stdout, err[-2000:]
    assert len(calls.read_text().splitlines()) == 1
