"""World-size invariance and failure behaviour of `fedpeft-hpc train` under real launchers (CPU, gloo)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedpeft_hpc.runs.checkpoint import load_checkpoint
from fedpeft_hpc.utils.files import read_jsonl
from tests.conftest import BIN, QUICKSTART, REPO, subprocess_env

pytestmark = pytest.mark.multiproc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(run_dir: Path, ckpt: Path, *extra: str) -> list[str]:
    return [f"run.dir={run_dir}", f"model.checkpoint={ckpt}", "run.progress=false", "run.threads=1",
            "fed.rounds=3", "fed.local_epochs=1", "comm.timeout_s=60", *extra]


def train_cmd(launcher: list[str], run_dir: Path, ckpt: Path, *extra: str) -> list[str]:
    return [*launcher, "-m", "fedpeft_hpc", "train", str(QUICKSTART), *overrides(run_dir, ckpt, *extra)]


def torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]


def mpiexec(n: int) -> list[str]:
    return [str(BIN / "mpiexec"), "-n", str(n), sys.executable]


def run(cmd: list[str], timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=subprocess_env(), cwd=REPO, **kw)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "latest.safetensors").peft


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def single(tmp_path_factory, pretrained_ckpt):
    """The reference: one process, LoRA with dropout (clients of unequal size, some dropped)."""
    d = tmp_path_factory.mktemp("single") / "run"
    run(train_cmd([sys.executable], d, pretrained_ckpt, *EXTRA))
    return d


EXTRA = ("peft.method=lora", "fed.dropout=0.2", "server.optimizer=fedavgm")


@pytest.mark.parametrize("name, launcher", [("torchrun2", torchrun(2)), ("torchrun4", torchrun(4)),
                                            ("mpiexec2", mpiexec(2))])
def test_same_result_whatever_the_number_of_processes(tmp_path, pretrained_ckpt, single, name, launcher):
    d = tmp_path / name
    run(train_cmd(launcher, d, pretrained_ckpt, *EXTRA))
    ref, got = final_state(single), final_state(d)
    assert max_diff(ref, got) <= 1e-6
    ref_rows, rows = read_jsonl(single / "metrics.jsonl"), read_jsonl(d / "metrics.jsonl")
    assert [r["test_acc"] for r in rows] == [r["test_acc"] for r in ref_rows]
    assert [r["clients"] for r in rows] == [r["clients"] for r in ref_rows]
    assert [r["bytes_up_total"] for r in rows] == [r["bytes_up_total"] for r in ref_rows]
    world = int(launcher[launcher.index("-n") + 1]) if "-n" in launcher else int(launcher[-1].split("=")[1])
    num_params = sum(t.numel() for t in got.values())
    for r in rows:
        assert r["world_size"] == world and r["allreduce_backend"] == "gloo"
        assert r["allreduce_calls"] == 1  # ONE collective carries the aggregation each round
        assert r["allreduce_bytes"] == (num_params + 6) * 8 * world  # updates + 6 stats, fp64, every rank
        assert r["allreduce_ms"] > 0
    assert "allreduce_bytes" not in ref_rows[0]


def test_mpi_backend_aggregates_through_mpi4py(tmp_path, pretrained_ckpt, single):
    d = tmp_path / "mpi"
    run(train_cmd(mpiexec(2), d, pretrained_ckpt, *EXTRA, "comm.backend=mpi"))
    assert max_diff(final_state(single), final_state(d)) <= 1e-6
    assert {r["allreduce_backend"] for r in read_jsonl(d / "metrics.jsonl")} == {"mpi"}


def test_two_node_rendezvous_on_localhost(tmp_path, pretrained_ckpt, single):
    d = tmp_path / "2nodes"
    port = free_port()
    procs = []
    for node in (0, 1):
        env = subprocess_env(NNODES="2", NODE_RANK=str(node), NPROC="1", RDZV_ENDPOINT=f"127.0.0.1:{port}",
                             RDZV_ID=f"test{port}", PYTHON=sys.executable)
        procs.append(subprocess.Popen(["bash", str(REPO / "launch/torchrun_multinode.sh"), str(QUICKSTART),
                                       *overrides(d, pretrained_ckpt, *EXTRA)], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert max_diff(final_state(single), final_state(d)) <= 1e-6
    assert {r["world_size"] for r in read_jsonl(d / "metrics.jsonl")} == {2}


def _worker_pid(parent: int, rank: int) -> int | None:
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(child)
    return None


def test_a_killed_rank_ends_the_job_quickly(tmp_path, pretrained_ckpt):
    d = tmp_path / "killed"
    cmd = train_cmd(torchrun(2), d, pretrained_ckpt, "fed.rounds=200", "comm.timeout_s=30")
    proc = subprocess.Popen(cmd, env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 120
        while not read_jsonl(d / "metrics.jsonl") and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            time.sleep(0.5)
        assert read_jsonl(d / "metrics.jsonl"), "the run never finished a round"
        victim = _worker_pid(proc.pid, rank=1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        t0 = time.time()
        _, err = proc.communicate(timeout=60)
        assert time.time() - t0 < 60
        assert proc.returncode != 0
        # torchrun's failure report names the killed worker (rank 1) and its signal (SIGKILL: -9)
        assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s+exitcode\s*:\s*-9", err), err[-2000:]
        assert (d / "checkpoints" / "latest.safetensors").is_file()  # what was written survives
    finally:
        if proc.poll() is None:
            proc.kill()
