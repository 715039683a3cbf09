"""The skimage_photos / skimage_science patch tasks: offline, disjoint train/test regions, fixed."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from fedpeft_hpc.config.schema import DataConfig
from fedpeft_hpc.data import ImageSpec, build_datasets
from fedpeft_hpc.data.patches import (GRID, MIN_STD, PATCH_PX, TASKS, block_edges, cut_patches, held_out_blocks,
                                      patch_layout, source_image)
from tests.conftest import QUICKSTART, REPO, run_cli, tiny_overrides

SPEC = ImageSpec(16)
needs_skimage = pytest.mark.skipif(importlib.util.find_spec("skimage") is None,
                                   reason="scikit-image is not installed (pip install -e '.[images]')")


@needs_skimage
@pytest.mark.parametrize("task", sorted(TASKS))
def test_train_and_test_footprints_never_overlap(task):
    lay = patch_layout(task, 100, 40)
    tr, te = lay["train"], lay["test"]
    for k in range(len(TASKS[task])):
        a, b = tr.classes == k, te.classes == k
        dy = np.abs(tr.ys[a][:, None] - te.ys[b][None, :])
        dx = np.abs(tr.xs[a][:, None] - te.xs[b][None, :])
        overlap = (dy < PATCH_PX) & (dx < PATCH_PX)  # two P x P windows share a pixel
        assert not overlap.any(), f"{TASKS[task][k]}: a training patch shares pixels with a test patch"
        # no block holds both; one test block per grid row (the test region is spread over the image)
        held_out = set(map(tuple, held_out_blocks(k).tolist()))
        assert sorted(r for r, _ in held_out) == list(range(GRID))
        assert set(map(tuple, te.blocks[b].tolist())) <= held_out
        assert not set(map(tuple, tr.blocks[a].tolist())) & held_out


@needs_skimage
@pytest.mark.parametrize("task", sorted(TASKS))
def test_patches_inside_their_block_and_not_flat(task):
    lay = patch_layout(task, 100, 40)
    for split in ("train", "test"):
        s = lay[split]
        x = cut_patches(task, s)
        assert x.shape == (len(s.classes), 3, PATCH_PX, PATCH_PX) and x.dtype == np.uint8
        assert (x.astype(np.float32).mean(1) / 255).std(axis=(1, 2)).min() >= MIN_STD
        for k, name in enumerate(TASKS[task]):
            h, w, _ = source_image(name).shape
            ye, xe = block_edges(h), block_edges(w)
            m = s.classes == k
            r, c = s.blocks[m, 0], s.blocks[m, 1]
            assert (s.ys[m] >= ye[r]).all() and (s.ys[m] + PATCH_PX <= ye[r + 1]).all()
            assert (s.xs[m] >= xe[c]).all() and (s.xs[m] + PATCH_PX <= xe[c + 1]).all()


@needs_skimage
@pytest.mark.parametrize("task", sorted(TASKS))
def test_dataset_balanced_fixed_and_seed_independent(task):
    cfg = DataConfig(name=task, patches_per_class=30, test_patches_per_class=10)
    a, b = build_datasets(cfg, SPEC, 42), build_datasets(cfg, SPEC, 3407)
    assert a.num_classes == len(TASKS[task]) == 8 and a.name == task
    assert np.bincount(a.train_targets).tolist() == [30] * 8
    assert np.bincount(a.test.labels).tolist() == [10] * 8
    for split in ("train", "test"):
        xa, xb = getattr(a, split).stored(), getattr(b, split).stored()
        assert xa.shape == (240 if split == "train" else 80, 3, PATCH_PX, PATCH_PX)
        assert bool((xa == xb).all())
    x, y = a.test[0]
    assert tuple(x.shape) == (3, 16, 16) and y == 0


@needs_skimage
def test_train_and_inspect_on_a_patch_task(tmp_path, pretrained_ckpt):
    run = tmp_path / "run"
    r = run_cli("train", str(QUICKSTART), *tiny_overrides(run, "data.name=skimage_science", "model.num_classes=8",
                                                           "data.patches_per_class=20", "data.test_patches_per_class=5",
                                                           "model.pretrained=true", f"model.checkpoint={pretrained_ckpt}"))
    assert r.returncode == 0, r.stderr
    s = json.loads((run / "summary.json").read_text())
    assert s["dataset"] == "skimage_science" and s["rounds"] == 2 and 0.0 <= s["final_acc"] <= 1.0
    i = run_cli("inspect", str(QUICKSTART), "data.name=skimage_photos", "model.num_classes=8",
                f"model.checkpoint={pretrained_ckpt}", "--json")
    assert i.returncode == 0, i.stderr
    assert json.loads(i.stdout)["trainable_params"] > 0


def test_without_scikit_image_exit_2_names_the_extra(tmp_path):
    fake = tmp_path / "no_skimage"
    fake.mkdir()
    (fake / "skimage.py").write_text("raise ImportError(\"No module named 'skimage'\")\n")
    run = tmp_path / "run"
    r = run_cli("train", str(QUICKSTART), *tiny_overrides(run, "data.name=skimage_photos", "model.num_classes=8"),
                PYTHONPATH=f"{fake}:{REPO}")
    assert r.returncode == 2, r.stderr
    assert "fedpeft-hpc[images]" in r.stderr and "scikit-image" in r.stderr
    assert "Traceback" not in r.stderr
