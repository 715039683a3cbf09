"""Device-side augmentation does not depend on the number of processes (torchrun, gloo, CPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedpeft_hpc.runs.checkpoint import load_checkpoint
from fedpeft_hpc.utils.files import read_jsonl
from tests.conftest import QUICKSTART, REPO, subprocess_env, tiny_overrides
from tests.test_data_store import write_images

pytestmark = pytest.mark.multiproc


def _train(launcher: list[str], run_dir: Path, folder: Path, cache: Path, *extra: str) -> dict:
    cmd = [*launcher, "-m", "fedpeft_hpc", "train", str(QUICKSTART),
           *tiny_overrides(run_dir, "data.name=imagefolder", f"data.root={folder}", f"data.cache_dir={cache}",
                           "data.min_samples=4", "comm.timeout_s=60", *extra)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=subprocess_env(), cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    return load_checkpoint(run_dir / "checkpoints" / "latest.safetensors").peft


def test_crop_flip_training_is_the_same_for_1_and_2_processes(tmp_path):
    classes = [f"c{i}" for i in range(10)]
    folder = tmp_path / "images"
    write_images(folder / "train", classes=classes, per_class=8, sizes=((12, 12), (20, 14)))
    write_images(folder / "test", classes=classes, per_class=2, seed=1, sizes=((12, 12),))
    cache = tmp_path / "cache"  # shared: the two ranks open (and one of them builds) the same cache
    one = _train([sys.executable], tmp_path / "one", folder, cache, "data.augment=crop_flip")
    two = _train([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
                 tmp_path / "two", folder, cache, "data.augment=crop_flip")
    plain = _train([sys.executable], tmp_path / "plain", folder, cache)
    assert one.keys() == two.keys() == plain.keys()
    assert max(float((one[k] - two[k]).abs().max()) for k in one) <= 1e-6
    rows_one = read_jsonl(tmp_path / "one" / "metrics.jsonl")
    rows_two = read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [r["test_acc"] for r in rows_one] == [r["test_acc"] for r in rows_two]
    assert {r["world_size"] for r in rows_two} == {2}
    # the augmentation really ran in training: without it the same run ends elsewhere
    assert max(float((one[k] - plain[k]).abs().max()) for k in one) > 1e-4
    assert len([p for p in cache.iterdir() if p.suffix == ".npy"]) == 2  # train/ and test/, built once
    assert np.isfinite([r["train_loss"] for r in rows_one]).all()
