"""Tests of fedpeft_hpc.data: datasets, partitions, batch iteration."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from fedpeft_hpc.config.schema import DataConfig
from fedpeft_hpc.data import (DATASETS, ImageSpec, ImageStore, TensorImageDataset, batches_from_index_lists,
                              build_datasets, digits_split_indices, digits_splits, iterate_batches, load_partition,
                              make_partition, num_batches, partition_stats, save_partition, tensor_to_spec)
from fedpeft_hpc.data.partition import partition_dirichlet, partition_iid
from fedpeft_hpc.errors import ConfigError, DataError

SPEC = ImageSpec(img_size=16)


@pytest.fixture(scope="module")
def digits_targets() -> np.ndarray:
    return digits_splits()["train"][1]


def _assert_cover(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert len(allidx) == n
    assert np.array_equal(np.sort(allidx), np.arange(n))
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)  # sorted ascending, no duplicates


# ---------------------------------------------------------------- partitions

def test_dirichlet_deterministic(digits_targets):
    a = partition_dirichlet(digits_targets, 10, 0.1, 10, seed=3)
    b = partition_dirichlet(digits_targets, 10, 0.1, 10, seed=3)
    c = partition_dirichlet(digits_targets, 10, 0.1, 10, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("alpha,clients,min_samples", [(0.05, 10, 10), (0.5, 20, 15), (100.0, 7, 1)])
def test_dirichlet_cover_and_min(digits_targets, alpha, clients, min_samples):
    parts = partition_dirichlet(digits_targets, clients, alpha, min_samples, seed=0)
    assert len(parts) == clients
    _assert_cover(parts, len(digits_targets))
    assert min(len(p) for p in parts) >= min_samples


def test_smaller_alpha_more_skew(digits_targets):
    def skew(alpha: float) -> float:
        shares = []
        for seed in range(3):
            hist = partition_stats(partition_dirichlet(digits_targets, 10, alpha, 5, seed), digits_targets,
                                   10)["class_hist"]
            shares += [max(h) / sum(h) for h in hist]
        return float(np.mean(shares))

    low, high = skew(0.05), skew(100.0)
    assert low > 0.5 > 0.25 > high
    assert low > high + 0.3


def test_dirichlet_errors(digits_targets):
    n = len(digits_targets)
    with pytest.raises(ConfigError) as e:
        partition_dirichlet(digits_targets, n + 1, 0.1, 1, 0)
    assert e.value.key == "fed.num_clients"
    with pytest.raises(ConfigError) as e:
        partition_dirichlet(digits_targets, 10, 0.1, n // 10 + 1, 0)
    assert e.value.key == "data.min_samples"
    # feasible in count but (practically) impossible with such skew: gives up with advice
    with pytest.raises(ConfigError, match="alpha") as e:
        partition_dirichlet(digits_targets, 40, 0.001, 20, 0)
    assert e.value.key == "data.min_samples"


def test_iid_sizes_and_determinism():
    parts = partition_iid(103, 10, seed=1)
    _assert_cover(parts, 103)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(np.array_equal(x, y) for x, y in zip(parts, partition_iid(103, 10, seed=1)))
    assert not all(np.array_equal(x, y) for x, y in zip(parts, partition_iid(103, 10, seed=2)))
    with pytest.raises(ConfigError):
        partition_iid(5, 6, seed=0)


def test_partition_file_round_trip(tmp_path, digits_targets):
    parts = partition_dirichlet(digits_targets, 8, 0.3, 5, seed=0)
    path = tmp_path / "sub" / "partition.json"
    save_partition(path, parts, {"alpha": np.float64(0.3), "seed": np.int64(0)})
    assert [p.name for p in path.parent.iterdir()] == ["partition.json"]  # no tmp file left behind
    doc = json.loads(path.read_text())
    assert doc["num_clients"] == 8 and doc["meta"] == {"alpha": 0.3, "seed": 0}
    back = load_partition(path)
    assert all(np.array_equal(x, y) for x, y in zip(parts, back))
    cfg = DataConfig(name="digits", partition_file=str(path))
    got = make_partition(cfg, digits_targets, 8, seed=123)
    assert all(np.array_equal(x, y) for x, y in zip(parts, got))


def test_partition_file_errors(tmp_path, digits_targets):
    n = len(digits_targets)

    def cfg_for(doc) -> DataConfig:
        p = tmp_path / "bad.json"
        p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        return DataConfig(partition_file=str(p))

    with pytest.raises(DataError, match="missing.json"):
        make_partition(DataConfig(partition_file=str(tmp_path / "missing.json")), digits_targets, 2, 0)
    cases = [
        ("{not json", "bad.json"),
        ({"clients": "x"}, "clients"),
        ({"clients": [[0, 1], ["a"]]}, "integers"),
        ({"clients": [[0, 1], [2, 3]]}, "fed.num_clients"),                 # 2 clients, 3 expected
        ({"clients": [[0, 1], [2, n], [4]]}, "outside"),
        ({"clients": [[0, 1], [1, 2], [4]]}, "more than once"),
    ]
    for doc, msg in cases:
        with pytest.raises(DataError, match=msg) as e:
            make_partition(cfg_for(doc), digits_targets, 3, 0)
        assert "bad.json" in str(e.value)


def test_make_partition_dispatch(digits_targets):
    iid = make_partition(DataConfig(partition="iid"), digits_targets, 4, seed=0)
    dir_ = make_partition(DataConfig(partition="dirichlet", alpha=0.1, min_samples=5), digits_targets, 4, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(iid, partition_iid(len(digits_targets), 4, 0)))
    assert all(np.array_equal(x, y) for x, y in zip(dir_, partition_dirichlet(digits_targets, 4, 0.1, 5, 0)))


# ---------------------------------------------------------------- datasets

def test_digits_splits_disjoint_and_sizes():
    from sklearn.datasets import load_digits

    ids = digits_split_indices()
    for a, b in (("pretrain", "train"), ("pretrain", "test"), ("train", "test")):
        assert len(np.intersect1d(ids[a], ids[b])) == 0, (a, b)
    assert np.array_equal(np.sort(np.concatenate(list(ids.values()))), np.arange(1797))
    sizes = {k: len(v) for k, v in ids.items()}
    assert sizes == {"pretrain": 599, "train": 838, "test": 360}
    d = load_digits()
    s = digits_splits()
    for k, (x, y) in s.items():
        assert x.dtype == np.float32 and x.shape == (sizes[k], 1, 8, 8) and 0 <= x.min() and x.max() <= 1
        assert np.array_equal(x[:, 0] * 16, d.images[ids[k]]) and np.array_equal(y, d.target[ids[k]])
        assert y.dtype == np.int64
        # stratified: class shares match the full set within one sample per class and split
        expect = np.bincount(d.target) * len(y) / len(d.target)
        assert np.all(np.abs(np.bincount(y, minlength=10) - expect) <= 1.5)
    # fixed: the same on every call (no seed involved)
    again = digits_split_indices()
    assert all(np.array_equal(ids[k], again[k]) for k in ids)


def test_digits_dataset():
    b = build_datasets(DataConfig(name="digits"), SPEC, seed=0)
    tr = digits_splits()["train"]
    assert b.num_classes == 10 and len(b.train) == len(tr[1]) and np.array_equal(b.train_targets, tr[1])
    # decoded once as the 8x8 floats; batches are prepared to the model's 3x16x16, normalised
    assert isinstance(b.train, ImageStore) and b.train.images.shape[1:] == (1, 8, 8)
    assert torch.equal(b.train.stored(), torch.from_numpy(tr[0]))
    x, y = next(iterate_batches(b.train, np.arange(len(b.train)), 1000, None, shuffle=False))
    assert x.shape[1:] == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, tensor_to_spec(torch.from_numpy(tr[0]), SPEC))
    assert np.array_equal(y.numpy(), b.train_targets) and np.array_equal(b.train.labels, b.train_targets)
    # the split does not move with the run seed
    b2 = build_datasets(DataConfig(name="digits"), SPEC, seed=5)
    assert torch.equal(b.test.stored(), b2.test.stored())


def test_synthetic_deterministic():
    cfg = DataConfig(name="synthetic", synthetic_samples=200, synthetic_test_samples=50)
    a, b = build_datasets(cfg, SPEC, 0), build_datasets(cfg, SPEC, 0)
    c = build_datasets(cfg, SPEC, 1)
    assert torch.equal(a.train.images, b.train.images) and np.array_equal(a.train_targets, b.train_targets)
    assert torch.equal(a.test.images, b.test.images)
    assert not torch.equal(a.train.images, c.train.images)
    assert a.train.images.shape == (200, 3, 16, 16) and a.test.images.shape == (50, 3, 16, 16)
    assert a.train[0][0].shape == (3, 16, 16) and torch.equal(a.train[0][0], (a.train.images[0] - 0.5) / 0.5)
    assert a.num_classes == 10 and set(a.train_targets.tolist()) == set(range(10))
    assert a.train_targets.dtype == np.int64
    # the test set does not depend on the number of training samples
    d = build_datasets(replace(cfg, synthetic_samples=300), SPEC, 0)
    assert torch.equal(a.test.images, d.test.images)
    # learnable: nearest class mean beats chance (10%) clearly, but it is not trivial
    big = build_datasets(replace(cfg, synthetic_samples=1000, synthetic_test_samples=500), SPEC, 0)
    x, y = big.train.images.flatten(1), big.train.targets
    means = torch.stack([x[y == k].mean(0) for k in range(10)])
    xt, yt = big.test.images.flatten(1), big.test.targets
    acc = (torch.cdist(xt, means).argmin(1) == yt).float().mean().item()
    assert 0.4 < acc < 0.9


def test_max_train_samples():
    cfg = DataConfig(name="synthetic", synthetic_samples=100, synthetic_test_samples=10)
    full = build_datasets(cfg, SPEC, 0)
    sub = build_datasets(replace(cfg, max_train_samples=30), SPEC, 0)
    assert len(sub.train) == 30 and len(sub.train_targets) == 30
    # a sorted subset of the full train set, in order
    rows = {x.numpy().tobytes(): i for i, x in enumerate(full.train.stored())}
    ids = [rows[x.numpy().tobytes()] for x in sub.train.stored()]
    assert ids == sorted(ids) and len(set(ids)) == 30
    assert np.array_equal(sub.train_targets, full.train_targets[ids])
    with pytest.raises(DataError, match="max_train_samples"):
        build_datasets(replace(cfg, max_train_samples=101), SPEC, 0)


def test_registry_and_unknown():
    assert {"synthetic", "digits", "cifar10", "cifar100", "imagefolder"} <= set(DATASETS)
    with pytest.raises(ConfigError) as e:
        build_datasets(DataConfig(name="nope"), SPEC, 0)
    assert e.value.key == "data.name"


@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_cifar_missing(tmp_path, name, folder):
    with pytest.raises(DataError) as e:
        build_datasets(DataConfig(name=name, root=str(tmp_path), download=False), SPEC, 0)
    msg = str(e.value)
    assert "data.root" in msg and str(tmp_path) in msg and "data.download" in msg and folder in msg


def _write_pngs(root, classes, per_class, size=(10, 12)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")


def test_imagefolder_split_layout(tmp_path):
    _write_pngs(tmp_path / "train", ["cat", "dog"], 4)
    _write_pngs(tmp_path / "val", ["cat", "dog"], 2)
    cache = str(tmp_path / "cache")
    b = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path), cache_dir=cache), SPEC, 0)
    assert b.num_classes == 2 and len(b.train) == 8 and len(b.test) == 4
    assert b.train_targets.tolist() == [0] * 4 + [1] * 4
    x, y = b.train[0]
    assert x.shape == (3, 16, 16) and y == 0
    xs, ys = next(iterate_batches(b.test, np.arange(4), 3, None, shuffle=False))
    assert xs.shape == (3, 3, 16, 16) and ys.dtype == torch.int64
    # in_chans=1 works through the PIL transform
    g = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path), cache_dir=cache),
                       ImageSpec(8, in_chans=1, mean=(0.5,), std=(0.5,)), 0)
    assert g.train[0][0].shape == (1, 8, 8)


def test_imagefolder_single_layout(tmp_path):
    cfg = DataConfig(name="imagefolder", root=str(tmp_path / "a"), test_fraction=0.4, cache_dir=str(tmp_path / "c"))
    _write_pngs(tmp_path / "a", ["a", "b", "c"], 5)
    b = build_datasets(cfg, SPEC, 0)
    assert b.num_classes == 3 and len(b.train) + len(b.test) == 15
    assert np.bincount(b.train_targets).tolist() == [3, 3, 3]  # stratified
    assert np.array_equal(b.train.labels, b.train_targets)
    rows_tr, rows_te = set(b.train.rows.tolist()), set(b.test.rows.tolist())
    assert rows_tr.isdisjoint(rows_te) and len(rows_tr | rows_te) == 15
    assert b.train.images is b.test.images or b.train.images.data_ptr() == b.test.images.data_ptr()  # one cache
    b2 = build_datasets(cfg, SPEC, 99)  # fixed split, independent of the run seed
    assert torch.equal(b.train.rows, b2.train.rows)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="data.root.*ROOT/train/CLASS"):
        build_datasets(DataConfig(name="imagefolder", root=str(tmp_path / "none")), SPEC, 0)
    _write_pngs(tmp_path / "x" / "train", ["a", "b"], 2)
    _write_pngs(tmp_path / "x" / "test", ["a", "c"], 2)
    with pytest.raises(DataError, match="class folders differ"):
        build_datasets(DataConfig(name="imagefolder", root=str(tmp_path / "x"), cache_dir=str(tmp_path / "c")),
                       SPEC, 0)
    assert not (tmp_path / "c").exists()  # checked before anything is decoded
    _write_pngs(tmp_path / "y" / "train", ["a"], 2)
    with pytest.raises(DataError, match="test/ nor val/"):
        build_datasets(DataConfig(name="imagefolder", root=str(tmp_path / "y")), SPEC, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="data.root"):
        build_datasets(DataConfig(name="imagefolder", root=str(tmp_path / "empty")), SPEC, 0)


def test_tensor_to_spec():
    x = torch.rand(5, 1, 8, 8)
    y = tensor_to_spec(x, ImageSpec(12, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    assert y.shape == (5, 3, 12, 12) and y.dtype == torch.float32
    assert torch.equal(y[:, 0], y[:, 2])
    same = tensor_to_spec(x, ImageSpec(8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    assert torch.allclose(same[:, 1:2], (x - 0.5) / 0.25)
    with pytest.raises(DataError):
        tensor_to_spec(x, ImageSpec(8, in_chans=3, mean=(0.1, 0.2)))


# ---------------------------------------------------------------- loader

class _Wrapped(Dataset):
    """A plain Dataset (not a TensorImageDataset): forces the DataLoader path."""

    def __init__(self, inner: TensorImageDataset):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        return self.inner[i]


@pytest.fixture(scope="module")
def tds() -> TensorImageDataset:
    n = 37
    return TensorImageDataset(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone(),
                              torch.arange(n) % 5)


def _ids(batches) -> list[list[int]]:
    return [x[:, 0, 0, 0].long().tolist() for x, _ in batches]


def test_iterate_batches_deterministic_and_covering(tds):
    idx = np.arange(3, 37, dtype=np.int64)
    runs = [_ids(iterate_batches(tds, idx, 8, torch.Generator().manual_seed(s))) for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    flat = sum(runs[0], [])
    assert sorted(flat) == idx.tolist() and flat != idx.tolist()
    assert [len(b) for b in runs[0]] == [8, 8, 8, 8, 2] and num_batches(len(idx), 8) == 5
    # a generator advances between epochs: two epochs differ, each covers every index once
    g = torch.Generator().manual_seed(1)
    e1, e2 = sum(_ids(iterate_batches(tds, idx, 8, g)), []), sum(_ids(iterate_batches(tds, idx, 8, g)), [])
    assert e1 != e2 and sorted(e2) == idx.tolist()
    dl = _ids(iterate_batches(tds, idx, 8, torch.Generator().manual_seed(1), drop_last=True))
    assert [len(b) for b in dl] == [8] * 4 == [8] * num_batches(len(idx), 8, drop_last=True)
    assert _ids(iterate_batches(tds, idx, 10, None, shuffle=False)) == [idx[i:i + 10].tolist()
                                                                        for i in range(0, 34, 10)]
    for x, y in iterate_batches(tds, idx, 8, torch.Generator().manual_seed(0)):
        assert y.dtype == torch.int64 and torch.equal(y, x[:, 0, 0, 0].long() % 5)
    assert list(iterate_batches(tds, np.zeros(0, dtype=np.int64), 8, torch.Generator())) == []


@pytest.mark.parametrize("drop_last", [False, True])
def test_iterate_batches_dataloader_path_same_order(tds, drop_last):
    idx = np.arange(0, 37, 2, dtype=np.int64)
    fast = list(iterate_batches(tds, idx, 4, torch.Generator().manual_seed(7), drop_last=drop_last))
    slow = list(iterate_batches(_Wrapped(tds), idx, 4, torch.Generator().manual_seed(7), drop_last=drop_last))
    assert len(fast) == len(slow) == num_batches(len(idx), 4, drop_last)
    for (xf, yf), (xs, ys) in zip(fast, slow):
        assert torch.equal(xf, xs) and torch.equal(yf, ys) and ys.dtype == torch.int64


def test_batches_from_index_lists(tds):
    lists = [[3, 1, 4], [], [36]]
    for ds in (tds, _Wrapped(tds)):
        out = list(batches_from_index_lists(ds, iter(lists)))
        assert [x[:, 0, 0, 0].long().tolist() for x, _ in out] == lists
        assert out[1][0].shape == (0, 1, 2, 2) and out[1][1].shape == (0,) and out[1][1].dtype == torch.int64
        assert torch.equal(out[0][1], torch.tensor([3, 1, 4]) % 5)


@pytest.mark.parametrize("wrap", [False, True])
def test_epochs_in_one_call_equal_consecutive_calls(tds, wrap):
    ds = _Wrapped(tds) if wrap else tds
    idx = np.arange(1, 30, dtype=np.int64)
    g = torch.Generator().manual_seed(5)
    separate = _ids(iterate_batches(ds, idx, 8, g)) + _ids(iterate_batches(ds, idx, 8, g))
    together = _ids(iterate_batches(ds, idx, 8, torch.Generator().manual_seed(5), epochs=2))
    assert together == separate and len(together) == 2 * num_batches(len(idx), 8)
