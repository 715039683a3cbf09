"""Decoded image stores, the image-folder cache, device-side preparation and augmentation."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeft_hpc.config.schema import DataConfig
from fedpeft_hpc.data import (BatchSources, ImageSpec, ImageStore, augment_batch, build_datasets, eval_transform,
                              iterate_batches, tensor_to_spec)
from fedpeft_hpc.data.augment import crop_padding
from fedpeft_hpc.data.cache import cached_images, scan_folder
from fedpeft_hpc.errors import ConfigError, DataError
from tests.conftest import REPO, run_cli, subprocess_env

SPEC = ImageSpec(img_size=16)


def write_images(root: Path, classes=("a", "b"), per_class=3, seed=0, sizes=((10, 12), (16, 16), (23, 19))):
    """PNG and JPEG files of several sizes and PIL modes (RGB, RGBA, L, P), as real folders hold."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = sizes[i % len(sizes)]
            arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            img = Image.fromarray(arr)
            kind = i % 5
            if kind == 1:
                img = img.convert("RGBA")
            elif kind == 2:
                img = img.convert("L")
            elif kind == 3:
                img = img.convert("P")
            path = root / c / (f"{i}.jpg" if kind == 4 else f"{i}.png")
            img.save(path)
            paths.append(path)
    return paths


def folder_cfg(root: Path, cache: Path, **kw) -> DataConfig:
    return DataConfig(name="imagefolder", root=str(root), cache_dir=str(cache), **kw)


def cache_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []


# ---------------------------------------------------------------- cache = direct decoding

@pytest.mark.parametrize("spec", [SPEC, ImageSpec(8, in_chans=1, mean=(0.5,), std=(0.5,)),
                                  ImageSpec(12, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))])
def test_cached_images_equal_decoding_the_files(tmp_path, spec):
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    write_images(tmp_path / "train", per_class=5)
    write_images(tmp_path / "test", per_class=2, seed=1)
    b = build_datasets(folder_cfg(tmp_path, tmp_path / "cache"), spec, 0)
    for store, split in ((b.train, "train"), (b.test, "test")):
        mode = "RGB" if spec.in_chans == 3 else "L"
        # the reference: torchvision's ImageFolder, file by file, with the PIL steps of eval_transform
        raw = ImageFolder(str(tmp_path / split), transform=T.Compose([lambda im: im.convert(mode),
                                                                        T.Resize((spec.img_size, spec.img_size))]))
        ref = ImageFolder(str(tmp_path / split), transform=eval_transform(spec))
        assert len(store) == len(ref) and store.labels.tolist() == ref.targets
        stored = store.stored()
        assert stored.dtype == torch.uint8
        for i in range(len(ref)):
            arr = np.asarray(raw[i][0], dtype=np.uint8)
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            assert np.array_equal(stored[i].numpy(), arr), (split, i)  # exact: uint8 storage
            x, y = store[i]
            assert y == ref[i][1] and x.shape == ref[i][0].shape
            assert torch.allclose(x, ref[i][0], rtol=0, atol=1e-6)  # after normalisation
        # batches are the same images as the single items
        xs, ys = next(iterate_batches(store, np.arange(len(store)), 64, None, shuffle=False))
        assert torch.equal(xs, torch.stack([store[i][0] for i in range(len(store))]))
        assert ys.tolist() == store.labels.tolist()


def test_cache_at_another_resolution_is_resized_per_batch(tmp_path):
    from PIL import Image

    paths = write_images(tmp_path / "f", per_class=4)
    b = build_datasets(folder_cfg(tmp_path / "f", tmp_path / "c", cache_img_size=24, test_fraction=0.25), SPEC, 0)
    full = b.train.images  # the whole folder, in file order
    assert full.shape == (8, 3, 24, 24)
    ordered = sorted(paths, key=lambda p: (p.parent.name, p.name))
    for i, p in enumerate(ordered):
        ref = np.asarray(Image.open(p).convert("RGB").resize((24, 24), Image.BILINEAR)).transpose(2, 0, 1)
        assert np.array_equal(full[i].numpy(), ref)
    x, _ = b.train[0]
    assert x.shape == (3, 16, 16)
    expect = tensor_to_spec(b.train.stored()[:1].float() / 255, SPEC)[0]
    assert torch.allclose(x, expect, atol=1e-6)


def test_changed_folder_rebuilds_its_cache(tmp_path):
    from PIL import Image

    root, cache = tmp_path / "f", tmp_path / "cache"
    write_images(root, per_class=3)
    scan = scan_folder(root)
    first = cached_images(scan, "RGB", 16, cache).clone()
    files = cache_files(cache)
    assert len([f for f in files if f.endswith(".npy")]) == 1
    npy = cache / next(f for f in files if f.endswith(".npy"))
    stamp = npy.stat().st_mtime_ns
    # unchanged folder: the same file is opened, not decoded again
    assert torch.equal(cached_images(scan_folder(root), "RGB", 16, cache), first)
    assert npy.stat().st_mtime_ns == stamp and cache_files(cache) == files
    # one image replaced by another one
    target = root / "a" / "0.png"
    Image.fromarray(np.full((16, 16, 3), 7, dtype=np.uint8)).save(target)
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    changed = cached_images(scan_folder(root), "RGB", 16, cache)
    assert len([f for f in cache_files(cache) if f.endswith(".npy")]) == 2
    assert torch.all(changed[0] == 7) and not torch.equal(changed[0], first[0])
    assert torch.equal(changed[1:], first[1:])
    # one image added
    Image.fromarray(np.zeros((5, 5, 3), dtype=np.uint8)).save(root / "b" / "9.png")
    grown = cached_images(scan_folder(root), "RGB", 16, cache)
    assert grown.shape[0] == first.shape[0] + 1
    assert not [f for f in cache_files(cache) if f.endswith(".tmp")]


@pytest.fixture
def eager_pool(monkeypatch):
    """Start decode workers even for a folder this small (normally decoded in-process)."""
    import fedpeft_hpc.data.decode as dec

    monkeypatch.setattr(dec, "POOL_MIN_S", 0.0)
    if dec.usable_workers(2) < 2:
        pytest.skip("needs 2 usable CPUs")


def test_workers_build_the_same_cache(tmp_path, eager_pool, caplog):
    write_images(tmp_path / "f", per_class=20)
    scan = scan_folder(tmp_path / "f")
    alone = cached_images(scan, "RGB", 16, tmp_path / "c0", workers=0)
    with caplog.at_level("INFO", logger="fedpeft_hpc.data.decode"):
        pooled = cached_images(scan, "RGB", 16, tmp_path / "c2", workers=2)
    assert "2 worker processes" in caplog.text
    assert torch.equal(alone, pooled) and alone.shape == (40, 3, 16, 16)


def test_small_folders_decode_without_starting_workers(tmp_path, caplog):
    write_images(tmp_path / "f", per_class=20)
    with caplog.at_level("INFO", logger="fedpeft_hpc.data.decode"):
        cached_images(scan_folder(tmp_path / "f"), "RGB", 16, tmp_path / "c", workers=2)
    # decode's own line says when a pool starts (the cache's line names the workers it was allowed)
    started = [r.getMessage() for r in caplog.records if r.name == "fedpeft_hpc.data.decode"]
    assert not [m for m in started if "worker processes" in m], started


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_names_the_file(tmp_path, eager_pool, workers):
    write_images(tmp_path / "f", per_class=20)
    bad = tmp_path / "f" / "b" / "7.png"  # file 27 of 40: past the first chunk, so a worker meets it
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    with pytest.raises(DataError, match="7.png") as e:
        build_datasets(folder_cfg(tmp_path / "f", tmp_path / "c", num_workers=workers), SPEC, 0)
    assert str(bad) in str(e.value) and "data.root" in str(e.value)
    assert cache_files(tmp_path / "c") == [f for f in cache_files(tmp_path / "c") if f.endswith(".lock")]


def test_corrupt_image_in_a_training_run_exits_2(tmp_path):
    write_images(tmp_path / "f" / "train", classes=[str(i) for i in range(4)], per_class=6)
    write_images(tmp_path / "f" / "test", classes=[str(i) for i in range(4)], per_class=2)
    bad = tmp_path / "f" / "train" / "2" / "5.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    res = run_cli("train", str(REPO / "configs" / "quickstart.yaml"), f"run.dir={tmp_path / 'run'}",
                  "run.progress=false", "model.pretrained=false", "data.name=imagefolder",
                  f"data.root={tmp_path / 'f'}",
                  f"data.cache_dir={tmp_path / 'c'}", "data.num_workers=2", "fed.num_clients=4",
                  "fed.clients_per_round=2", "data.min_samples=2", timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert str(bad) in res.stderr and "Traceback" not in res.stderr


def _race_script(root: Path, cache: Path, go: Path, ready: Path) -> str:
    return f"""
import logging, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
from fedpeft_hpc.data.cache import cached_images, scan_folder
scan = scan_folder(Path({str(root)!r}))
Path({str(ready)!r}).touch()
while not Path({str(go)!r}).exists():
    time.sleep(0.005)
x = cached_images(scan, "RGB", 32, {str(cache)!r})
print("SUM", int(x.sum()), tuple(x.shape))
"""


def test_concurrent_builds_give_one_valid_cache(tmp_path):
    root, cache, go = tmp_path / "f", tmp_path / "cache", tmp_path / "go"
    write_images(root, classes=[str(i) for i in range(4)], per_class=150, sizes=((48, 48), (40, 56)))
    procs = []
    for k in range(2):
        script = _race_script(root, cache, go, tmp_path / f"ready{k}")
        procs.append(subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=subprocess_env(), cwd=REPO))
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{k}").exists() for k in range(2)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), procs[0].stderr.read()
        time.sleep(0.01)
    go.touch()
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    sums = [next(line for line in o.splitlines() if line.startswith("SUM")) for o, _ in outs]
    assert sums[0] == sums[1] and "(600, 3, 32, 32)" in sums[0]
    builds = sum(o.count("decoding 600 images") for o, _ in outs)
    assert builds == 1, outs  # the lock: one process decodes, the other waits and opens its file
    names = cache_files(cache)
    assert len([n for n in names if n.endswith(".npy")]) == 1 and not [n for n in names if n.endswith(".tmp")]
    ref = cached_images(scan_folder(root), "RGB", 32, tmp_path / "fresh")
    assert torch.equal(ref, torch.from_numpy(np.load(cache / next(n for n in names if n.endswith(".npy")))))


# ---------------------------------------------------------------- CIFAR from its own arrays

def _fake_cifar10(root: Path, n_per_batch: int = 3) -> np.ndarray:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    allx = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, size=(n_per_batch, 3 * 32 * 32), dtype=np.uint8)
        allx.append(x)
        with open(base / name, "wb") as f:
            pickle.dump({"data": x, "labels": rng.integers(0, 10, n_per_batch).tolist()}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return np.concatenate(allx[:5]).reshape(-1, 3, 32, 32)


def test_cifar_is_held_as_its_uint8_arrays(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tvc

    monkeypatch.setattr(tvc, "check_integrity", lambda *a, **k: True)
    train_x = _fake_cifar10(tmp_path)
    b = build_datasets(DataConfig(name="cifar10", root=str(tmp_path)), ImageSpec(32), 0)
    assert isinstance(b.train, ImageStore) and b.train.images.dtype == torch.uint8
    assert np.array_equal(b.train.stored().numpy(), train_x) and len(b.test) == 3
    ref = tvc.CIFAR10(str(tmp_path), train=True, transform=eval_transform(ImageSpec(32)))
    for i in range(len(ref)):
        assert torch.allclose(b.train[i][0], ref[i][0], rtol=0, atol=1e-6) and b.train[i][1] == ref[i][1]


# ---------------------------------------------------------------- augmentation on the device

def _numbered(n=6, c=2, h=5, w=7) -> torch.Tensor:
    return (torch.arange(n * c * h * w) % 251 + 1).to(torch.uint8).view(n, c, h, w)  # no zeros: padding shows


def test_flip_mirrors_about_half_the_images():
    x = _numbered(n=400)
    out = augment_batch(x, "flip", torch.Generator().manual_seed(0))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 150 < int(mirrored.sum()) < 250
    again = augment_batch(x, "flip", torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert not torch.equal(out, augment_batch(x, "flip", torch.Generator().manual_seed(1)))


def test_crop_flip_is_a_window_of_the_padded_image():
    x = _numbered(n=300)
    n, c, h, w = x.shape
    ph, pw = crop_padding(h), crop_padding(w)
    out = augment_batch(x, "crop_flip", torch.Generator().manual_seed(3))
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    offsets, flips = set(), 0
    for i in range(n):
        hits = [(oy, ox, f) for oy in range(2 * ph + 1) for ox in range(2 * pw + 1) for f in (False, True)
                if torch.equal(out[i], (lambda win: win.flip(-1) if f else win)(
                    padded[i, :, oy:oy + h, ox:ox + w]))]
        assert hits, i
        offsets.add(hits[0][:2])
        flips += hits[0][2]
    assert len(offsets) == (2 * ph + 1) * (2 * pw + 1)  # every offset occurs
    assert 100 < flips < 200
    # float images get the same moves from the same generator state
    outf = augment_batch(x.float() / 255, "crop_flip", torch.Generator().manual_seed(3))
    assert torch.equal(outf, out.float() / 255)
    assert torch.equal(augment_batch(x, "none", None), x)
    with pytest.raises(ValueError, match="Generator"):
        augment_batch(x, "flip", None)


def test_client_views_augment_training_only_and_follow_their_generator():
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    store = ImageStore(images, torch.arange(40) % 4, SPEC)
    test = store.subset(np.arange(30, 40))
    plain = BatchSources(store, test, torch.device("cpu"))
    aug = BatchSources(store, test, torch.device("cpu"), augment="crop_flip")
    idx = np.arange(0, 40, 3)
    x0, y0 = plain.client(None).batch(idx)
    assert torch.equal(x0, store.batch(idx)[0]) and torch.equal(y0, torch.as_tensor(idx % 4))
    xa, ya = aug.client(torch.Generator().manual_seed(5)).batch(idx)
    xb, _ = aug.client(torch.Generator().manual_seed(5)).batch(idx)
    xc, _ = aug.client(torch.Generator().manual_seed(6)).batch(idx)
    assert torch.equal(xa, xb) and not torch.equal(xa, xc) and not torch.equal(xa, x0)
    assert torch.equal(ya, y0) and xa.shape == (len(idx), 3, 16, 16)
    # evaluation never augments
    assert torch.equal(aug.test.batch(np.arange(10))[0], test.batch(np.arange(10))[0])
    # an empty (Poisson) batch has the model's shape
    ex, ey = aug.client(torch.Generator()).empty_batch()
    assert ex.shape == (0, 3, 16, 16) and ey.shape == (0,) and ey.dtype == torch.int64


def test_augment_needs_a_decoded_store():
    from fedpeft_hpc.data import TensorImageDataset

    tds = TensorImageDataset(torch.zeros(4, 3, 16, 16), torch.arange(4))
    with pytest.raises(ConfigError) as e:
        BatchSources(tds, tds, torch.device("cpu"), augment="flip")
    assert e.value.key == "data.augment"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_batches_equal_cpu_batches():
    images = torch.randint(0, 256, (64, 3, 12, 12), dtype=torch.uint8)
    store = ImageStore(images, torch.arange(64) % 10, SPEC)
    dev = torch.device("cuda", 0)
    resident = BatchSources(store, store, dev, "crop_flip", gpu_store_mb=100)
    streamed = BatchSources(store, store, dev, "crop_flip", gpu_store_mb=0)
    cpu = BatchSources(store, store, torch.device("cpu"), "crop_flip")
    assert resident.train.device.type == "cuda" and streamed.train.device.type == "cpu"
    idx = np.random.default_rng(0).permutation(64)[:32]
    outs = [s.client(torch.Generator().manual_seed(1)).batch(idx) for s in (resident, streamed, cpu)]
    assert outs[0][0].device == dev and outs[1][0].device == dev
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1].cpu(), outs[2][1])
    assert torch.allclose(outs[0][0].cpu(), outs[2][0], atol=1e-6)
    # train and test rows of one folder share one stored tensor: it is copied to the GPU once
    split = BatchSources(store.subset(np.arange(48)), store.subset(np.arange(48, 64)), dev, gpu_store_mb=100)
    assert split.train.images.data_ptr() == split.test.store.images.data_ptr()
    on_gpu, on_cpu = split.test.batch(np.arange(16))[0], cpu.test.batch(np.arange(48, 64))[0]
    assert torch.allclose(on_gpu.cpu(), on_cpu, atol=1e-6)


@pytest.mark.parametrize("augment", ["none", "crop_flip"])
def test_deferred_batches_of_several_clients_are_made_in_one_gather(augment, monkeypatch):
    """Client batching's data path: the pending batches of several clients (one empty) are made by ONE gather,
    and equal, bit for bit, each client's batch made alone with its own generator (the same draws)."""
    from fedpeft_hpc.data.sources import PendingBatch, prepare_batches

    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    store = ImageStore(images, torch.arange(40) % 4, SPEC)
    src = BatchSources(store, store.subset(np.arange(30, 40)), torch.device("cpu"), augment=augment)
    lists = [np.arange(0, 20, 3), np.array([], dtype=np.int64), np.arange(5, 30, 2), np.array([7, 1])]
    alone = [src.client(torch.Generator().manual_seed(c)).batch(idx) if len(idx) else None
             for c, idx in enumerate(lists)]
    pending = [src.client(torch.Generator().manual_seed(c), deferred=True).batch(idx) for c, idx in enumerate(lists)]
    assert all(isinstance(p, PendingBatch) for p in pending)
    calls = []
    gather = ImageStore.gather
    monkeypatch.setattr(ImageStore, "gather", lambda self, idx: calls.append(len(idx)) or gather(self, idx))
    made = prepare_batches(pending)
    assert calls == [sum(len(i) for i in lists)]
    for a, (x, y) in zip(alone, made):
        if a is None:
            assert x.shape == (0, 3, 16, 16) and y.shape == (0,)
        else:
            assert torch.equal(a[0], x) and torch.equal(a[1], y)
