"""CUDA/NCCL paths: skipped on machines without a GPU (CI); run them where one is lent."""

from __future__ import annotations

import sys

import pytest
import torch

from fedpeft_hpc.runs.checkpoint import load_checkpoint
from fedpeft_hpc.utils.files import read_jsonl
from tests.conftest import QUICKSTART, REPO, subprocess_env

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _train(launcher, run_dir, ckpt, *extra):
    import subprocess

    cmd = [*launcher, "-m", "fedpeft_hpc", "train", str(QUICKSTART), f"run.dir={run_dir}",
           f"model.checkpoint={ckpt}", "run.progress=false", "fed.rounds=3", "fed.local_epochs=1",
           "peft.method=lora", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=subprocess_env(), cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    return load_checkpoint(run_dir / "checkpoints" / "latest.safetensors").peft


def test_cuda_single_process_learns_like_cpu(tmp_path, pretrained_ckpt):
    gpu = _train([sys.executable], tmp_path / "gpu", pretrained_ckpt, "comm.device=cuda")
    cpu = _train([sys.executable], tmp_path / "cpu", pretrained_ckpt, "comm.device=cpu")
    # different kernels: close, not bitwise
    assert max(float((gpu[k] - cpu[k]).abs().max()) for k in gpu) < 1e-2
    acc_gpu = read_jsonl(tmp_path / "gpu" / "metrics.jsonl")[-1]["test_acc"]
    acc_cpu = read_jsonl(tmp_path / "cpu" / "metrics.jsonl")[-1]["test_acc"]
    assert abs(acc_gpu - acc_cpu) < 0.05


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL across processes needs 2 GPUs")
def test_nccl_two_ranks_match_one_gpu(tmp_path, pretrained_ckpt):
    one = _train([sys.executable], tmp_path / "one", pretrained_ckpt, "comm.device=cuda")
    two = _train([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
                 tmp_path / "two", pretrained_ckpt, "comm.device=cuda")
    assert max(float((one[k] - two[k]).abs().max()) for k in one) <= 1e-5
    rows = read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert {r["allreduce_backend"] for r in rows} == {"nccl"}
    assert all(r["allreduce_calls"] == 1 for r in rows)
