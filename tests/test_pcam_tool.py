"""tools/pcam_to_imagefolder.py: PCam's HDF5 files become the image folder configs/paper/pcam_vitb16.yaml reads."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, subprocess_env

h5py = pytest.importorskip("h5py")
TOOL = REPO / "tools" / "pcam_to_imagefolder.py"


def write_pcam(src, split: str, n: int, seed: int):
    """PCam's file layout and shapes: x uint8 [N, 96, 96, 3], y uint8 [N, 1, 1, 1]."""
    draw = np.random.default_rng(seed)
    x = draw.integers(0, 256, size=(n, 96, 96, 3), dtype=np.uint8)
    y = draw.integers(0, 2, size=(n, 1, 1, 1), dtype=np.uint8)
    with h5py.File(src / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as f:
        f.create_dataset("x", data=x, chunks=(min(4, n), 96, 96, 3))
    with h5py.File(src / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as f:
        f.create_dataset("y", data=y)
    return x, y.reshape(-1)


def convert(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)


def test_subsample_and_test_split_become_an_image_folder_with_exact_pixels(tmp_path):
    from fedpeft_hpc.config import load_config
    from fedpeft_hpc.data import build_datasets
    from fedpeft_hpc.data.transforms import ImageSpec

    src = tmp_path / "h5"
    src.mkdir()
    xtr, ytr = write_pcam(src, "train", 40, seed=1)
    xte, yte = write_pcam(src, "test", 9, seed=2)
    dest = tmp_path / "pcam"
    res = convert(src, dest, "--train-samples", 15, "--seed", 3)
    assert res.returncode == 0, res.stderr
    record = json.loads((dest / "pcam_subsample.json").read_text())
    keep = np.array(record["train"]["indices"])
    assert len(keep) == len(set(keep.tolist())) == 15 and (np.diff(keep) > 0).all()  # without replacement
    assert keep.tolist() == np.sort(np.random.default_rng(3).choice(40, 15, replace=False)).tolist()
    assert not (tmp_path / "pcam.partial").exists()

    # the project's own image-folder builder reads it: labels in order, pixels exact (PNG is lossless)
    from fedpeft_hpc.data.cache import scan_folder

    cfg = load_config(None, ["data.name=imagefolder", f"data.root={dest}", f"data.cache_dir={tmp_path / 'cache'}"])
    bundle = build_datasets(cfg.data, ImageSpec(img_size=96, mean=(0.0,), std=(1.0,)), seed=0)
    assert bundle.num_classes == 2 and len(bundle.train) == 15 and len(bundle.test) == 9
    # the store holds the images in the folder scan's order; the file names carry the source index
    train_ids = [int(p[-10:-4]) for p in scan_folder(dest / "train").paths]
    assert sorted(train_ids) == keep.tolist()
    assert bundle.train.labels.tolist() == [int(ytr[i]) for i in train_ids]
    i = int(keep[4])
    img, label = bundle.train[train_ids.index(i)]
    assert label == ytr[i]
    assert np.array_equal((img.numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8), xtr[i])
    test_ids = [int(p[-10:-4]) for p in scan_folder(dest / "test").paths]
    assert sorted(test_ids) == list(range(9))
    assert bundle.test.labels.tolist() == [int(yte[i]) for i in test_ids]


def test_bad_input_exits_2_and_touches_nothing(tmp_path):
    src = tmp_path / "h5"
    src.mkdir()
    res = convert(src, tmp_path / "out")
    assert res.returncode == 2 and "camelyonpatch_level_2_split_train_x.h5 does not exist" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "out").exists()
    write_pcam(src, "train", 5, seed=1)
    write_pcam(src, "test", 2, seed=2)
    assert "holds 5 images" in convert(src, tmp_path / "out", "--train-samples", 6).stderr
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    res = convert(src, existing, "--train-samples", 0)
    assert res.returncode == 2 and "exists" in res.stderr and (existing / "keep.txt").read_text() == "mine"
    assert convert(src, tmp_path / "all", "--train-samples", 0).returncode == 0  # 0: every training image
    assert len(list((tmp_path / "all" / "train").rglob("*.png"))) == 5
