"""The numbers we report can be trusted: a frozen backbone stays frozen (BatchNorm too), ranks
agree before they train, a resume continues the run it claims to continue, stochastic layers
do not depend on the process layout, FedAdam follows its paper, partition files are checked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeft_hpc.comm import LocalCommunicator
from fedpeft_hpc.config import load_config
from fedpeft_hpc.runs.checkpoint import load_checkpoint
from fedpeft_hpc.utils.files import read_jsonl
from tests.conftest import QUICKSTART, REPO, subprocess_env, tiny_overrides

RESNET = ("model.name=resnet18", "model.kwargs={}", "model.img_size=16", "peft.method=bias")


def torchrun(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fedpeft_hpc",
           "train", str(QUICKSTART), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=REPO)
    if expect == 0:
        assert res.returncode == 0, res.stderr[-3000:]
    else:
        assert res.returncode != 0
    return res


def single(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "fedpeft_hpc", "train", str(QUICKSTART), *args],
                         capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=REPO)
    assert res.returncode == expect, res.stderr[-3000:]
    return res


def state(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / "latest.safetensors").peft


# -- frozen means frozen ----------------------------------------------------------------------
def test_batchnorm_statistics_stay_frozen_and_results_do_not_depend_on_ranks(tmp_path):
    from fedpeft_hpc.federated.engine import FederatedTrainer
    from fedpeft_hpc.federated.evaluate import accuracy
    from fedpeft_hpc.runs.load import load_run

    cfg = load_config(QUICKSTART, tiny_overrides(tmp_path / "one", *RESNET))
    trainer = FederatedTrainer(cfg, LocalCommunicator())
    buffers = {n: b.clone() for n, b in trainer.model.named_buffers()}
    assert any("running_mean" in n for n in buffers)  # the test really has BatchNorm statistics
    start = trainer.global_vec.clone()
    summary = trainer.fit()
    assert not torch.equal(start, trainer.global_vec)  # the biases did train
    assert all(torch.equal(buffers[n], b) for n, b in trainer.model.named_buffers())

    torchrun(*tiny_overrides(tmp_path / "two", *RESNET))
    one, two = state(tmp_path / "one"), state(tmp_path / "two")
    assert max(float((one[k] - two[k]).abs().max()) for k in one) <= 1e-6
    acc_two = json.loads((tmp_path / "two" / "summary.json").read_text())["final_acc"]
    assert acc_two == summary["final_acc"]
    run = load_run(tmp_path / "one")
    assert accuracy(run.model, run.test_dataset()) == summary["final_acc"]


# -- ranks agree or stop ----------------------------------------------------------------------
def _weights(tmp_path: Path, name: str, scale: float) -> Path:
    """A weights file for the quickstart ViT (random init, scaled: other weights)."""
    from safetensors.torch import save_file

    from fedpeft_hpc.models import build_backbone

    cfg = load_config(QUICKSTART, ["model.pretrained=false"])
    model = build_backbone(cfg.model, 0, load_weights=False)
    path = tmp_path / name
    save_file({k: (v * scale).contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_ranks_with_different_weights_stop_before_training(tmp_path):
    for rank, scale in ((0, 1.0), (1, 0.5)):
        shutil.copy(_weights(tmp_path, f"tmp{rank}.safetensors", scale), tmp_path / f"w{rank}.safetensors")
    run_dir = tmp_path / "r"
    res = torchrun(*tiny_overrides(run_dir, "model.pretrained=true", "model.pretrain_recipe=null",
                                   f"model.checkpoint={tmp_path}/w$LOCAL_RANK.safetensors"), expect=2)
    assert "ranks disagree on the frozen backbone weights" in res.stderr and "rank(s) 1" in res.stderr
    # every worker ends with the message and exit status 2, not a traceback (torchrun prints its own)
    assert res.stderr.count("fedpeft-hpc: error: ranks disagree") == 2
    assert "[rank0]: Traceback" not in res.stderr and "[rank1]: Traceback" not in res.stderr
    assert "exitcode  : 2" in res.stderr
    assert not (run_dir / "metrics.jsonl").exists()


def test_ranks_with_different_data_stop_before_training(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for rank in (0, 1):
        for k in range(3):
            folder = tmp_path / f"root{rank}" / f"class{k}"
            folder.mkdir(parents=True)
            for i in range(8 + rank * k):  # rank 1 sees more images of classes 1 and 2
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    res = torchrun(*tiny_overrides(tmp_path / "r", "data.name=imagefolder", f"data.root={tmp_path}/root$LOCAL_RANK",
                                   "data.min_samples=1", "model.num_classes=3", "fed.num_clients=4",
                                   "fed.clients_per_round=2"), expect=2)
    assert "ranks disagree on the dataset (data)" in res.stderr


def test_resume_with_other_weights_is_refused_by_name(tmp_path):
    w = _weights(tmp_path, "w.safetensors", 1.0)
    args = tiny_overrides(tmp_path / "r", "model.pretrained=true", "model.pretrain_recipe=null",
                          f"model.checkpoint={w}")
    single(*args)
    ckpts = tmp_path / "r" / "checkpoints"
    os.replace(ckpts / "round_00001.safetensors", ckpts / "latest.safetensors")  # as if killed after round 1
    (tmp_path / "r" / "summary.json").unlink()
    shutil.copy(_weights(tmp_path, "other.safetensors", 0.5), w)  # someone swapped the weights file
    res = single(*args, expect=2)
    assert "model.checkpoint" in res.stderr and "frozen backbone weights differ" in res.stderr
    assert read_jsonl(tmp_path / "r" / "metrics.jsonl")[-1]["round"] == 2  # nothing was overwritten



def _image_folder(root: Path, seed: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k in range(3):
        (root / f"class{k}").mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / f"class{k}" / f"{i}.png")
    return root


def test_resume_with_other_data_is_refused_by_name(tmp_path):
    first, other = _image_folder(tmp_path / "a", 0), _image_folder(tmp_path / "b", 1)  # same layout, other pixels
    args = tiny_overrides(tmp_path / "r", "data.name=imagefolder", "data.min_samples=1", "model.num_classes=3",
                          "fed.num_clients=4", "fed.clients_per_round=2", f"data.cache_dir={tmp_path / 'cache'}")
    single(*args, f"data.root={first}")
    ckpts = tmp_path / "r" / "checkpoints"
    os.replace(ckpts / "round_00001.safetensors", ckpts / "latest.safetensors")  # as if killed after round 1
    (tmp_path / "r" / "summary.json").unlink()
    res = single(*args, f"data.root={other}", expect=2)
    assert "data.root" in res.stderr and "dataset" in res.stderr and "Traceback" not in res.stderr
    assert read_jsonl(tmp_path / "r" / "metrics.jsonl")[-1]["round"] == 2  # nothing was overwritten
    single(*args, f"data.root={first}")  # the data it was trained with resumes
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["rounds"] == 2

# -- stochastic layers ------------------------------------------------------------------------
def test_drop_path_keeps_world_size_invariance_and_exact_resume(tmp_path):
    extra = ("model.kwargs.drop_path_rate=0.1", "peft.method=lora")
    single(*tiny_overrides(tmp_path / "one", *extra))
    torchrun(*tiny_overrides(tmp_path / "two", *extra))
    single(*tiny_overrides(tmp_path / "nodrop", "peft.method=lora"))
    one, two, nodrop = state(tmp_path / "one"), state(tmp_path / "two"), state(tmp_path / "nodrop")
    assert max(float((one[k] - two[k]).abs().max()) for k in one) <= 1e-6
    assert any(not torch.equal(one[k], nodrop[k]) for k in one)  # drop path was really active
    # killed after round 1 and resumed: the same final state, bit for bit
    shutil.copytree(tmp_path / "one", tmp_path / "resumed")
    ckpts = tmp_path / "resumed" / "checkpoints"
    os.replace(ckpts / "round_00001.safetensors", ckpts / "latest.safetensors")
    (tmp_path / "resumed" / "summary.json").unlink()
    single(*tiny_overrides(tmp_path / "resumed", *extra))
    resumed = state(tmp_path / "resumed")
    assert all(torch.equal(one[k], resumed[k]) for k in one)


# -- FedAdam ----------------------------------------------------------------------------------
def test_fedadam_follows_reddi_et_al_algorithm_2():
    """Written from the paper, independently of the implementation: m_0 = 0, v_0 = tau^2,
    m = b1 m + (1 - b1) d, v = b2 v + (1 - b2) d^2, x = x + eta m / (sqrt(v) + tau)."""
    from fedpeft_hpc.config import ServerConfig
    from fedpeft_hpc.federated.server_opt import build_server_optimizer

    cfg = ServerConfig(optimizer="fedadam", beta1=0.9, beta2=0.99, eps=1e-3)
    opt = build_server_optimizer(cfg, 6, torch.device("cpu"))
    assert opt.lr == 1e-2  # FedAdam's own default, not FedAvg's 1.0
    x = torch.linspace(-1, 1, 6)
    ref_x = x.double().clone()
    m = np.zeros(6)
    v = np.full(6, 1e-3 ** 2)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        d = torch.randn(6, generator=g) * 1e-3  # small deltas: where v_0 matters
        opt.step(x, d)
        dn = d.double().numpy()
        m = 0.9 * m + 0.1 * dn
        v = 0.99 * v + 0.01 * dn ** 2
        ref_x = ref_x + 1e-2 * torch.from_numpy(m / (np.sqrt(v) + 1e-3))
    torch.testing.assert_close(x.double(), ref_x, atol=1e-6, rtol=1e-5)
    assert build_server_optimizer(ServerConfig(optimizer="fedavg"), 2, torch.device("cpu")).lr == 1.0


# -- partition files --------------------------------------------------------------------------
def test_a_partition_file_with_an_empty_client_is_a_clear_error(tmp_path):
    p = tmp_path / "partition.json"
    p.write_text(json.dumps({"num_clients": 3, "clients": [[0, 1, 2], [], [3, 4]]}))
    res = single(*tiny_overrides(tmp_path / "r", f"data.partition_file={p}", "fed.num_clients=3",
                                 "fed.clients_per_round=2"), expect=2)
    assert "client(s) 1 hold no samples" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "r").exists()
