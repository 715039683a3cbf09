"""`fedpeft-hpc submit` without a cluster: profiles, --dry-run, the preflight, the job object, job states."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fedpeft_hpc.cli import main
from fedpeft_hpc.config import load_config
from fedpeft_hpc.config.load import to_dict
from fedpeft_hpc.errors import ConfigError, UserError
from fedpeft_hpc.launchers import jobstate
from fedpeft_hpc.launchers.job import TrainJob
from fedpeft_hpc.launchers.jobstate import JobRef
from fedpeft_hpc.preflight import Preflight
from fedpeft_hpc.launchers.profile import ClusterProfile, load_profile, with_flags
from fedpeft_hpc.launchers.runstate import run_status
from tests.conftest import QUICKSTART, REPO, tiny_overrides

EXAMPLE = REPO / "slurm" / "clusters" / "example.yaml"


# -- cluster profiles -----------------------------------------------------------------------------
def test_the_example_profile_loads_and_flags_override_it():
    p = load_profile(EXAMPLE)
    assert (p.partition, p.account, p.gpus_per_node, p.tasks, p.cpus_per_task, p.time_min) == \
        ("gpu", "my-project", 4, 4, 8, 240)
    assert p.setup[0] == "module load cuda/12.1" and p.sbatch["mail-type"] == "END,FAIL"
    q = with_flags(p, {"partition": "debug", "time": 30, "nodes": 2, "account": None})
    assert (q.partition, q.time_min, q.nodes, q.account) == ("debug", 30, 2, "my-project")
    assert load_profile(None) == ClusterProfile() and ClusterProfile().tasks == 1
    assert ClusterProfile().limit_min("slurm") == 60 and ClusterProfile().limit_min("local") == 7 * 24 * 60
    assert q.limit_min("local") == 30


@pytest.mark.parametrize("text, words", [
    ("gpu_per_node: 4", "gpu_per_node: unknown key. Did you mean 'gpus_per_node'?"),
    ("gpus_per_node: four", "gpus_per_node: expected an integer"),
    ("time_min: 0", "time_min: must be >= 1"),
    ("time_min: 1\nsignal_delay_s: 90", "signal_delay_s: 90 s is not shorter than the time limit (1 min)"),
    ("gpus_per_node: 4\ntasks_per_node: 2", "tasks_per_node must equal gpus_per_node"),
    ("setup: [1, 2]", "setup: setup and srun_args are lists of strings"),
])
def test_bad_profiles_name_the_file_and_the_field(tmp_path, text, words):
    f = tmp_path / "cluster.yaml"
    f.write_text(text + "\n")
    with pytest.raises(ConfigError) as e:
        load_profile(f)
    assert str(f) in str(e.value) and words in str(e.value)


def test_flags_are_checked_like_the_profile():
    with pytest.raises(ConfigError, match="--tasks-per-node|tasks_per_node"):
        with_flags(ClusterProfile(gpus_per_node=4), {"tasks_per_node": 2})
    with pytest.raises(UserError, match="does not exist"):
        load_profile("/nope/cluster.yaml")


# -- submit --dry-run --------------------------------------------------------------------------------
def test_dry_run_prints_the_sbatch_script_and_submits_nothing(tmp_path, capsys):
    d = tmp_path / "run"
    rc = main(["submit", str(QUICKSTART), *tiny_overrides(d), "--cluster", str(EXAMPLE), "--executor", "slurm",
               "--partition", "short", "--time", "30", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    for line in ("#SBATCH --partition=short", "#SBATCH --time=30", "#SBATCH --account=my-project",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=4", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --mem=128GB", "#SBATCH --signal=USR2@90", "#SBATCH --mail-type=END,FAIL",
                 f"#SBATCH --output={d}/slurm/%j_0_log.out", "module load cuda/12.1",
                 "srun --unbuffered", "--cpu-bind=none", "-m submitit.core._submit",
                 "dry run: nothing was submitted"):
        assert line in out, line
    assert "1 node(s) x 4 task(s)" in out
    assert not d.exists()


def test_dry_run_of_the_local_executor(tmp_path, capsys):
    rc = main(["submit", str(QUICKSTART), *tiny_overrides(tmp_path / "r"), "--executor", "local",
               "--tasks-per-node", "2", "--time", "7", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "submitit local executor: name=fedpeft-r, nodes=1, tasks_per_node=2, timeout_min=7" in out
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, words", [
    (["data.name=cifar10", "data.root=/nope/cifar"], "/nope/cifar"),
    (["optim.lr=-1"], "optim.lr"),
    (["fed.clients_per_round=99"], "fed.clients_per_round"),
])
def test_a_bad_config_exits_2_before_anything_is_submitted(tmp_path, capsys, args, words):
    rc = main(["submit", str(QUICKSTART), *tiny_overrides(tmp_path / "r"), *args, "--executor", "local"])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and not (tmp_path / "r").exists()


def test_the_preflight_checks_the_run_directory_read_only(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    (d / "metrics.jsonl").write_text('{"round": 1}\n')
    cfg = load_config(QUICKSTART, tiny_overrides(d))
    with pytest.raises(ConfigError, match="holds metrics.jsonl but no config.yaml"):
        Preflight().check(cfg)
    assert sorted(p.name for p in d.iterdir()) == ["metrics.jsonl"]
    from fedpeft_hpc.config.load import dump_yaml

    (d / "config.yaml").write_text(dump_yaml(cfg))  # the same run, requeued before its first checkpoint
    assert Preflight().check(cfg).resumes
    with pytest.raises(ConfigError, match="different config"):
        Preflight().check(load_config(QUICKSTART, tiny_overrides(d, "optim.lr=0.5")))
    assert sorted(p.name for p in d.iterdir()) == ["config.yaml", "metrics.jsonl"]
    assert Preflight().check(cfg, run_dir=False).trainable_params == 3082


def test_debug_executor_trains_in_this_process(tmp_path, capsys):
    d = tmp_path / "r"
    n = torch.get_num_threads()
    try:
        rc = main(["submit", str(QUICKSTART), *tiny_overrides(d, "fed.rounds=1"), "--executor", "debug"])
    finally:
        torch.set_num_threads(n)
    out = capsys.readouterr().out
    assert rc == 0
    assert json.loads(out.strip().splitlines()[-1]) == json.loads((d / "summary.json").read_text())


# -- the job object ----------------------------------------------------------------------------------
def test_checkpoint_resubmits_the_same_training_marked_as_requeued(tmp_path):
    cfg = load_config(QUICKSTART, tiny_overrides(tmp_path / "r", "run.resume=never"))
    job = TrainJob(to_dict(cfg))
    again = job.checkpoint()
    assert isinstance(again.function, TrainJob) and again.args == () and again.kwargs == {}
    assert again.function.config == job.config and again.function.requeues == 1
    assert again.function.checkpoint().function.requeues == 2


def test_a_requeued_job_resumes_whatever_run_resume_said(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("fedpeft_hpc.train.train", lambda cfg: seen.append(cfg) or {"ok": True})
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    cfg = load_config(QUICKSTART, tiny_overrides(tmp_path / "r", "run.resume=never", "run.threads=0"))
    assert TrainJob(to_dict(cfg))() == {"ok": True}
    assert TrainJob(to_dict(cfg)).checkpoint().function() == {"ok": True}
    assert [c.run.resume for c in seen] == ["never", "auto"]
    assert [c.run.threads for c in seen] == [3, 3]  # the cores SLURM gave the task
    cfg1 = load_config(QUICKSTART, tiny_overrides(tmp_path / "r"))
    TrainJob(to_dict(cfg1))()
    assert seen[-1].run.threads == 1  # an explicit run.threads wins


# -- job and run states ------------------------------------------------------------------------------
def test_job_states_without_a_scheduler(tmp_path, monkeypatch):
    from submitit.core.utils import JobPaths, cloudpickle_dump

    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol, no sacct
    assert jobstate.slurm_state("12") is None
    assert not jobstate.is_active(None) and not jobstate.is_active("COMPLETED")
    assert jobstate.is_active("PENDING") and jobstate.is_active("REQUEUED") and jobstate.is_active("RUNNING")
    assert not jobstate.local_alive(str(os.getpid()))  # alive, but not a submitit job
    ref = JobRef("slurm", "12_3", str(tmp_path))
    assert jobstate.outcome(ref) is None
    cloudpickle_dump(("error", "Traceback ..."), JobPaths(tmp_path, job_id="12_3", task_id=0).result_pickle)
    assert jobstate.outcome(ref) == "error"
    assert JobRef.from_dict(ref.as_dict()) == ref and JobRef.from_dict(None) is None
    assert ref.log_paths()[1] == tmp_path / "12_3_0_log.err"


def test_run_states_from_the_run_directory(tmp_path, monkeypatch):
    from submitit.core.utils import JobPaths, cloudpickle_dump

    monkeypatch.setenv("PATH", str(tmp_path))
    d = tmp_path / "r"
    assert run_status(d).state == "new"
    d.mkdir()
    (d / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2}\n{"rou')  # torn last line
    st = run_status(d)
    assert (st.state, st.rounds_done, st.checkpoint) == ("failed", 2, False)  # nothing to resume from
    (d / "checkpoints").mkdir()
    (d / "checkpoints" / "latest.safetensors").write_bytes(b"x")
    assert run_status(d).state == "interrupted"
    ref = JobRef("slurm", "5", str(tmp_path / "jobs"))
    (tmp_path / "jobs").mkdir()
    assert run_status(d, ref).state == "interrupted"  # job gone, no result: killed (time limit, node)
    cloudpickle_dump(("error", "boom"), JobPaths(ref.folder, job_id="5", task_id=0).result_pickle)
    assert run_status(d, ref).state == "failed"
    (d / "summary.json").write_text('{"final_acc": 0.5}')
    st = run_status(d, ref)
    assert st.state == "finished" and st.detail == "final_acc 0.5000"
    monkeypatch.setattr(jobstate, "squeue_snapshot", lambda ids: {i: jobstate.JobInfo("PENDING") for i in ids})
    assert run_status(d, ref).state == "queued"  # submitted again: its job decides
