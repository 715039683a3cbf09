"""fedpeft_hpc.comm: world detection, rendezvous, runtime, counted collectives, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedpeft_hpc.comm import CollectiveError, LocalCommunicator, Runtime, WorldInfo, detect_world
from fedpeft_hpc.comm.collective import make_communicator
from fedpeft_hpc.comm.rendezvous import ensure_rendezvous, slurm_master_addr, slurm_master_port
from fedpeft_hpc.comm.world import parse_tasks_per_node
from fedpeft_hpc.config.schema import CommConfig
from fedpeft_hpc.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "helpers" / "comm_worker.py"
BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"
NUMEL = 1000

# -- detect_world --------------------------------------------------------------------------


def test_single_when_nothing_set():
    w = detect_world({})
    assert w == WorldInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, launcher="single",
                          node_rank=0)
    assert w.rank == 0 and w.world_size == 1


def test_torchrun():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
           "MASTER_ADDR": "n0", "MASTER_PORT": "29500",
           # torchrun inside an srun step: torchrun wins
           "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "0"}
    assert detect_world(env) == WorldInfo(3, 1, 8, 2, "torchrun", 1)


def test_torchrun_without_local_world_size_assumes_one_node():
    w = detect_world({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (w.world_size, w.local_world_size, w.launcher) == (2, 2, "torchrun")


def test_openmpi():
    env = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "6", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "3", "SLURM_PROCID": "0", "SLURM_NTASKS": "6"}
    assert detect_world(env) == WorldInfo(5, 2, 6, 3, "openmpi", None)


def test_mpich():
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2", "PMI_FD": "9"}
    assert detect_world(env) == WorldInfo(1, 1, 2, 2, "mpich", None)


def test_mpich_inside_sbatch_allocation():
    env = {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "77"}
    assert detect_world(env).launcher == "mpich"


def test_srun_step():
    env = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_ID": "123"}
    assert detect_world(env) == WorldInfo(3, 1, 4, 2, "slurm", 1)


def test_srun_step_uneven_tasks_per_node():
    env = {"SLURM_PROCID": "4", "SLURM_STEP_NUM_TASKS": "5", "SLURM_LOCALID": "0", "SLURM_NODEID": "2",
           "SLURM_STEP_TASKS_PER_NODE": "2(x2),1"}
    assert detect_world(env).local_world_size == 1


def test_srun_with_ntasks_per_node_only():
    env = {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "1",
           "SLURM_NTASKS_PER_NODE": "2"}
    assert detect_world(env) == WorldInfo(1, 1, 2, 2, "slurm", None)


def test_srun_pmi2_counts_as_slurm():
    # srun --mpi=pmi2 exports PMI_RANK/PMI_SIZE but not MPICH hydra's MPI_LOCALRANKID
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2",
           "SLURM_LOCALID": "1", "SLURM_NODEID": "0", "SLURM_STEP_TASKS_PER_NODE": "2"}
    assert detect_world(env) == WorldInfo(1, 1, 2, 2, "slurm", 0)


def test_sbatch_script_without_srun_is_single():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
           "SLURM_TASKS_PER_NODE": "4", "SLURM_JOB_ID": "99", "SLURM_JOB_NODELIST": "n[1-2]"}
    assert detect_world(env).launcher == "single"
    assert detect_world(env).world_size == 1


def test_submitit_local():
    # what submitit.local.local.start_controller / Controller.start_tasks export
    env = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_NODEID": "0",
           "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_GLOBALID": "1",
           "SUBMITIT_LOCAL_JOB_ID": "4242",
           # submitted from inside an allocation: inherited, must not win
           "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}
    assert detect_world(env) == WorldInfo(1, 1, 2, 2, "submitit", 0)


@pytest.mark.parametrize("env", [
    {"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
    {"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
    {"PMI_RANK": "0", "PMI_SIZE": "0"},
    {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "2(y2)"},
])
def test_malformed_env_is_a_user_error(env):
    with pytest.raises(UserError):
        detect_world(env)


def test_parse_tasks_per_node():
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert parse_tasks_per_node("4") == [4]


def test_detect_world_reads_only():
    env = {"PMI_RANK": "0", "PMI_SIZE": "2"}
    detect_world(env)
    assert env == {"PMI_RANK": "0", "PMI_SIZE": "2"}


# -- rendezvous ------------------------------------------------------------------------------


def test_slurm_port_is_deterministic_and_in_range():
    a = slurm_master_port({"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0"})
    assert a == slurm_master_port({"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0"})
    assert 20000 <= a < 40000
    assert a != slurm_master_port({"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "1"})


def test_slurm_addr_with_scontrol(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] || exit 1\n"
                    "echo gpu-017; echo gpu-018\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    assert slurm_master_addr({"SLURM_STEP_NODELIST": "gpu-[017-018]"}) == "gpu-017"


def test_slurm_addr_without_scontrol(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert slurm_master_addr({"SLURM_JOB_NODELIST": "node7"}) == "node7"
    with pytest.raises(UserError, match="MASTER_ADDR"):
        slurm_master_addr({"SLURM_JOB_NODELIST": "node[7-8]"})


def test_ensure_rendezvous_slurm_writes_env_vars(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    env = {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "1", "SLURM_NODEID": "0",
           "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_STEP_NODELIST": "node3", "SLURM_JOB_ID": "55",
           "SLURM_STEP_ID": "0"}
    ensure_rendezvous(detect_world(env), env)
    assert env["MASTER_ADDR"] == "node3"
    assert env["MASTER_PORT"] == str(slurm_master_port(env))
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("1", "2", "1")


def test_ensure_rendezvous_keeps_given_master(monkeypatch):
    env = {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "a[1-2]",
           "MASTER_ADDR": "login", "MASTER_PORT": "31337"}
    ensure_rendezvous(detect_world(env), env)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("login", "31337")


def test_ensure_rendezvous_single_and_torchrun():
    env: dict = {}
    ensure_rendezvous(detect_world(env), env)
    assert env == {}
    with pytest.raises(UserError, match="MASTER_ADDR"):
        ensure_rendezvous(WorldInfo(0, 0, 2, 2, "torchrun"),
                          {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


# -- runtime in one process -----------------------------------------------------------------


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_single_process_runtime(keep_threads):
    with Runtime.start(CommConfig(backend="auto", device="cpu"), threads=1, env={}) as rt:
        assert rt.backend == "none" and rt.comm.is_main and rt.device == torch.device("cpu")
        assert rt.world.launcher == "single"
        assert torch.get_num_threads() == 1
        buf = torch.arange(10, dtype=torch.float64)
        assert rt.comm.allreduce_sum_(buf) is buf
        assert torch.equal(buf, torch.arange(10, dtype=torch.float64))
        rec = rt.comm.last["aggregate"]
        assert (rec.calls, rec.bytes, rec.ring_bytes, rec.ms) == (0, 0, 0, 0.0)
        assert rt.comm.call_count("aggregate") == 0
        rt.comm.barrier()
        assert rt.comm.call_count("barrier") == 0
    assert not torch.distributed.is_initialized()
    rt.close()  # twice is fine


def test_default_threads_split_cores(keep_threads):
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    Runtime.start(CommConfig(device="cpu"), env=env).close()
    assert torch.get_num_threads() == max(1, os.cpu_count() or 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requests_without_cuda_are_config_errors(keep_threads):
    with pytest.raises(ConfigError) as e:
        Runtime.start(CommConfig(device="cuda"), env={})
    assert e.value.key == "comm.device"
    with pytest.raises(ConfigError) as e:
        Runtime.start(CommConfig(backend="nccl"), env={})
    assert e.value.key == "comm.backend"


def test_communicator_rejects_bad_input():
    with pytest.raises(ValueError):
        make_communicator(0, 2, "none", torch.device("cpu"), 1.0)
    with pytest.raises(ValueError):
        make_communicator(2, 2, "gloo", torch.device("cpu"), 1.0)
    with pytest.raises(ValueError):
        LocalCommunicator().allreduce_sum_(torch.zeros(4, 4, dtype=torch.float64).t())


def test_import_is_inert():
    code = ("import os, sys; before = dict(os.environ)\n"
            "import fedpeft_hpc.comm as c; w = c.detect_world()\n"
            "assert 'torch' not in sys.modules, 'detect_world pulled in torch'\n"
            "import fedpeft_hpc.comm.runtime, fedpeft_hpc.comm.collective, fedpeft_hpc.comm.rendezvous\n"
            "assert 'mpi4py' not in sys.modules and 'mpi4py.MPI' not in sys.modules\n"
            "assert dict(os.environ) == before\n")
    r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""


# -- several processes --------------------------------------------------------------------

_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                  "MASTER_PORT", "TORCHELASTIC_RUN_ID")
_LAUNCHER_PREFIXES = ("OMPI_", "PMI_", "PMIX_", "MPI_LOCAL", "HYDRA_", "SLURM_", "SUBMITIT_")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_VARS and not k.startswith(_LAUNCHER_PREFIXES)}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(cmd: list, limit: float = 90) -> tuple[int, str, float]:
    """Run a launcher in its own session; kill the whole session if it overruns."""
    t0 = time.monotonic()
    p = subprocess.Popen([str(c) for c in cmd], env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"{cmd[:3]} still running after {limit} s:\n{out[-3000:]}")
    return p.returncode, out, time.monotonic() - t0


def _torchrun(*args) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER,
            *args]


def _mpiexec(*args) -> list:
    return [MPIEXEC, "-n", "2", sys.executable, WORKER, *args]


def _have_mpi() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return MPIEXEC.exists()


IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
# outside CI a machine without MPI skips these; in CI (which installs the mpich wheel) that is a failure
needs_mpi = pytest.mark.skipif(not _have_mpi() and not IN_CI, reason="needs mpi4py and an mpiexec next to python")


def _check_results(out_dir: Path, launcher: str, backend: str) -> None:
    w = 2
    expected = (torch.arange(NUMEL, dtype=torch.float64) * sum(r + 1 for r in range(w))
                + sum(range(w))).tolist()
    for rank in range(w):
        res = json.loads((out_dir / f"rank{rank}.json").read_text())
        assert (res["rank"], res["world_size"]) == (rank, w)
        assert (res["launcher"], res["backend"]) == (launcher, backend)
        assert res["local_rank"] == rank and res["local_world_size"] == w
        assert res["result"] == expected
        assert res["same_object"]
        assert res["calls"] == 1
        last = res["last"]
        assert last["calls"] == 1 and last["backend"] == backend
        assert last["bytes"] == NUMEL * 8 * w
        assert last["ring_bytes"] == 2 * (w - 1) * NUMEL * 8
        assert last["ms"] > 0
        assert res["totals"]["aggregate"] == last
        assert res["totals"]["barrier"]["calls"] == 1
        assert res["threads"] == max(1, (os.cpu_count() or 1) // w)


@pytest.mark.multiproc
def test_torchrun_allreduce(tmp_path):
    rc, out, _ = _run(_torchrun(tmp_path, "--numel", NUMEL))
    assert rc == 0, out
    _check_results(tmp_path, "torchrun", "gloo")


@pytest.mark.multiproc
@needs_mpi
@pytest.mark.parametrize("backend", ["gloo", "mpi"])
def test_mpiexec_allreduce(tmp_path, backend):
    rc, out, _ = _run(_mpiexec(tmp_path, "--backend", backend, "--numel", NUMEL))
    assert rc == 0, out
    _check_results(tmp_path, "mpich", backend)


@pytest.mark.multiproc
def test_torchrun_dead_rank_ends_job(tmp_path):
    rc, out, secs = _run(_torchrun(tmp_path, "--fail-rank", "1", "--timeout", "20"), limit=90)
    assert rc != 0, out
    assert secs < 60, out
    # torchrun notices the dead worker, stops rank 0 and names rank 1 as root cause; if rank 0
    # got to its collective first, the CollectiveError names rank 0's view of it
    err = tmp_path / "error0.txt"
    if err.exists():
        assert "Another rank probably died" in err.read_text()
    else:
        assert "Root Cause" in out and "rank      : 1 (local_rank: 1)" in out, out


@pytest.mark.multiproc
def test_torchrun_hung_rank_times_out(tmp_path):
    rc, out, secs = _run(_torchrun(tmp_path, "--hang-rank", "1", "--timeout", "30",
                                   "--collective-timeout", "2"), limit=60)
    assert rc != 0, out
    assert secs < 45, out
    assert (tmp_path / "error0.txt").exists(), out
    msg = (tmp_path / "error0.txt").read_text()
    assert "rank 0 of 2" in msg and "'aggregate'" in msg and "comm.timeout_s=2" in msg
    assert "Another rank probably died or hung" in msg
    assert "CollectiveError: rank 0 of 2" in out


@pytest.mark.multiproc
@needs_mpi
@pytest.mark.parametrize("backend", ["gloo", "mpi"])
def test_mpiexec_hung_rank_aborts_job(tmp_path, backend):
    # without MPI_Abort, MPICH's MPI_Finalize on rank 0 would wait for the hung rank forever;
    # with backend mpi a blocking Allreduce would never time out at all
    rc, out, secs = _run(_mpiexec(tmp_path, "--backend", backend, "--hang-rank", "1", "--timeout", "30",
                                  "--collective-timeout", "2"), limit=60)
    assert rc != 0, out
    assert secs < 45, out  # a hang (no MPI_Abort) runs into the 60 s limit above
    err = tmp_path / "error0.txt"
    assert err.exists(), out
    msg = err.read_text()
    assert f"({backend}) failed" in msg and "comm.timeout_s=2" in msg, msg
    # (the "[rank 0/2] ... aborting the MPI job" line on stderr is not asserted: hydra may drop
    # output still in flight when it tears the job down)


@pytest.mark.multiproc
@needs_mpi
def test_mpiexec_dead_rank_ends_job(tmp_path):
    rc, out, secs = _run(_mpiexec(tmp_path, "--backend", "mpi", "--fail-rank", "1", "--timeout", "20"),
                         limit=90)
    assert rc != 0, out
    assert secs < 60, out


@pytest.mark.multiproc
def test_submitit_local_executor(tmp_path, monkeypatch):
    if IN_CI:
        import submitit  # CI installs the dev extras: a missing submitit is a failure there
    else:
        submitit = pytest.importorskip("submitit")
    for k in list(os.environ):
        if k in _LAUNCHER_VARS or k.startswith(_LAUNCHER_PREFIXES):
            monkeypatch.delenv(k)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # the job unpickles comm_worker.submitit_task by module name
    monkeypatch.setenv("PYTHONPATH", f"{WORKER.parent}{os.pathsep}{_env()['PYTHONPATH']}")
    monkeypatch.syspath_prepend(str(WORKER.parent))
    import comm_worker

    ex = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="local")
    ex.update_parameters(tasks_per_node=2, nodes=1, timeout_min=2)
    job = ex.submit(comm_worker.submitit_task)
    try:
        results = job.results()
    finally:
        job.cancel(check=False)
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert (r["world_size"], r["launcher"], r["backend"], r["calls"]) == (2, "submitit", "gloo", 1)
        assert r["result"] == [3.0] * 4


def test_collective_error_is_runtime_error():
    assert issubclass(CollectiveError, RuntimeError)
