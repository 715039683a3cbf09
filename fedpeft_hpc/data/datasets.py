"""Dataset registry: each builder turns a ``DataConfig`` into train/test datasets plus labels.

Every built-in builder decodes its data once into an ``ImageStore`` (compact tensors at the
stored resolution; see ``store.py``): synthetic data and digits as float images, CIFAR from
its own uint8 arrays, image folders through the memory-mapped uint8 cache of ``cache.py``.
Resizing, normalisation and augmentation then run per batch on the rank's device.

Paper datasets as image folders (``data.name=imagefolder``):
- Resisc45 (NWPU-RESISC45, 45 classes x 700 JPEGs of 256 px): its archive unpacks to
  ``NWPU-RESISC45/CLASS/*.jpg``; point ``data.root`` there (``data.test_fraction`` holds out a
  stratified test share, fixed across seeds) or arrange ``train/`` and ``test/`` class folders
  from a split list of your own.
- PCam (PatchCamelyon, 96 px patches in HDF5 files): write the patches of the training and
  test files as ``ROOT/train/{0,1}/*.png`` and ``ROOT/test/{0,1}/*.png`` once (README shows a
  few lines of h5py); the paper's 20k training subset is ``data.max_train_samples=20000``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from fedpeft_hpc.config.schema import DataConfig
from fedpeft_hpc.data.cache import LAYOUT as _LAYOUT
from fedpeft_hpc.data.cache import FolderScan, cached_images, scan_folder
from fedpeft_hpc.data.store import ImageStore
from fedpeft_hpc.data.transforms import ImageSpec
from fedpeft_hpc.errors import ConfigError, DataError
from fedpeft_hpc.utils.files import expand_path
from fedpeft_hpc.utils.hints import did_you_mean
from fedpeft_hpc.utils.streams import FIXED_SPLIT_SEED, SUBSAMPLE, SYNTHETIC_DATA, rng

SYNTHETIC_CLASSES = 10


class TensorImageDataset(Dataset):
    """In-memory images (float32, normalised) and int64 labels; batches are sliced directly."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor):
        if images.ndim != 4 or targets.ndim != 1 or images.shape[0] != targets.shape[0]:
            raise DataError(f"TensorImageDataset needs images [N,C,H,W] and targets [N], "
                            f"got {tuple(images.shape)} and {tuple(targets.shape)}")
        self.images = images.to(torch.float32)
        self.targets = targets.to(torch.int64)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.targets[i])


@dataclass
class DataBundle:
    """Train/test datasets, the train labels in dataset order, and the class count."""

    train: Dataset
    test: Dataset
    train_targets: np.ndarray
    num_classes: int
    name: str


Builder = Callable[[DataConfig, ImageSpec, int], DataBundle]
DATASETS: dict[str, Builder] = {}


def register_dataset(name: str) -> Callable[[Builder], Builder]:
    """Decorator: make a builder available as ``data.name=<name>``."""
    def deco(fn: Builder) -> Builder:
        DATASETS[name] = fn
        return fn
    return deco


def get_builder(name: str) -> Builder:
    """The builder registered as ``name``; a ``ConfigError`` on ``data.name`` otherwise."""
    if name not in DATASETS:
        raise ConfigError("data.name", f"unknown dataset {name!r}.{did_you_mean(name, DATASETS)} "
                                       f"Valid: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def build_datasets(cfg: DataConfig, spec: ImageSpec, seed: int) -> DataBundle:
    """Build ``cfg.name`` and apply ``max_train_samples`` (seeded subsample, order kept)."""
    bundle = get_builder(cfg.name)(cfg, spec, seed)
    n = len(bundle.train_targets)
    m = cfg.max_train_samples
    if m is not None and m != n:
        if m > n:
            raise DataError(f"data.max_train_samples={m} but dataset {cfg.name!r} has only {n} training "
                            f"samples; use a value <= {n} or leave it unset")
        keep = np.sort(rng(seed, SUBSAMPLE).choice(n, size=m, replace=False))
        bundle.train = _subset(bundle.train, keep)
        bundle.train_targets = bundle.train_targets[keep]
    return bundle


def _subset(ds: Dataset, keep: np.ndarray) -> Dataset:
    if isinstance(ds, ImageStore):
        return ds.subset(keep)
    if isinstance(ds, TensorImageDataset):
        idx = torch.as_tensor(keep, dtype=torch.int64)
        return TensorImageDataset(ds.images[idx], ds.targets[idx])
    return Subset(ds, keep.tolist())


def _store(images: np.ndarray, labels: np.ndarray, spec: ImageSpec, source: str) -> ImageStore:
    return ImageStore(torch.from_numpy(images), labels, spec, source=source)


# ---------------------------------------------------------------- synthetic

def _synthetic_split(templates: np.ndarray, n: int, draw: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Template of the label, cyclically shifted by up to 2 px, contrast/brightness jitter, Gaussian noise."""
    k, c, h, w = templates.shape
    labels = draw.permutation(np.arange(n) % k).astype(np.int64)
    dy, dx = draw.integers(-2, 3, size=(2, n))
    rows = (np.arange(h)[None, :] - dy[:, None]) % h
    cols = (np.arange(w)[None, :] - dx[:, None]) % w
    x = templates[labels[:, None, None, None], np.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]
    x = 0.5 + draw.uniform(0.6, 1.4, size=(n, 1, 1, 1)) * (x - 0.5)
    x = x + draw.normal(0.0, 0.1, size=(n, 1, 1, 1)) + draw.normal(0.0, 0.4, size=x.shape)
    return np.clip(x, 0.0, 1.0).astype(np.float32), labels


@register_dataset("synthetic")
def _synthetic(cfg: DataConfig, spec: ImageSpec, seed: int) -> DataBundle:
    """10 classes: random smooth templates (8x8x3 upsampled to 16x16) plus shift, jitter and noise.

    Depends only on ``seed`` and the sample counts; a linear probe reaches roughly 80% test accuracy.
    """
    t_seq, train_seq, test_seq = np.random.SeedSequence([seed, SYNTHETIC_DATA]).spawn(3)
    low = 0.5 + 0.6 * (np.random.default_rng(t_seq).random((SYNTHETIC_CLASSES, 3, 8, 8)) - 0.5)
    templates = torch.nn.functional.interpolate(torch.from_numpy(low.astype(np.float32)), size=(16, 16),
                                                mode="bilinear", align_corners=False).numpy()
    xtr, ytr = _synthetic_split(templates, cfg.synthetic_samples, np.random.default_rng(train_seq))
    xte, yte = _synthetic_split(templates, cfg.synthetic_test_samples, np.random.default_rng(test_seq))
    return DataBundle(_store(xtr, ytr, spec, "synthetic"), _store(xte, yte, spec, "synthetic"), ytr,
                      SYNTHETIC_CLASSES, "synthetic")


# ---------------------------------------------------------------- digits

def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images.astype(np.float32) / 16.0)[:, None], d.target.astype(np.int64)


def digits_split_indices() -> dict[str, np.ndarray]:
    """Fixed stratified split of sklearn digits (seed 0): ``pretrain`` 1/3, ``test`` 20%, ``train`` the rest."""
    from sklearn.model_selection import train_test_split

    _, y = _load_digits()
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=0.2, stratify=y, random_state=FIXED_SPLIT_SEED)
    n_pre = int(round(len(y) / 3))
    train, pre = train_test_split(rest, test_size=n_pre, stratify=y[rest], random_state=FIXED_SPLIT_SEED)
    return {"pretrain": np.sort(pre), "train": np.sort(train), "test": np.sort(test)}


def digits_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The digits splits as (images float32 ``[N, 1, 8, 8]`` in [0, 1], labels int64); seed-independent."""
    x, y = _load_digits()
    return {k: (x[ids], y[ids]) for k, ids in digits_split_indices().items()}


@register_dataset("digits")
def _digits(cfg: DataConfig, spec: ImageSpec, seed: int) -> DataBundle:
    s = digits_splits()
    (xtr, ytr), (xte, yte) = s["train"], s["test"]
    return DataBundle(_store(xtr, ytr, spec, "digits"), _store(xte, yte, spec, "digits"), ytr, 10, "digits")


# ---------------------------------------------------------------- CIFAR

def _cifar(cfg: DataConfig, spec: ImageSpec, name: str) -> DataBundle:
    """CIFAR from torchvision's own uint8 arrays (no per-sample PIL path)."""
    from torchvision import datasets as tvd

    cls, folder, k = ((tvd.CIFAR10, "cifar-10-batches-py", 10) if name == "cifar10"
                      else (tvd.CIFAR100, "cifar-100-python", 100))
    root = expand_path(cfg.root)
    try:
        train = cls(root=str(root), train=True, download=cfg.download)
        test = cls(root=str(root), train=False, download=cfg.download)
    except RuntimeError:
        raise DataError(f"{name} not found or corrupted in data.root={str(root)!r} (looked for "
                        f"{str(root / folder)!r}). Set data.download=true on a machine with network access, "
                        f"or copy the {folder!r} folder into data.root") from None
    except OSError as e:  # download failed: no network, unwritable root, ...
        raise DataError(f"could not download {name} into data.root={str(root)!r}: {e}. Copy the {folder!r} "
                        f"folder there from a machine with network access") from None

    def store(ds, split: str) -> ImageStore:
        images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))  # NHWC -> NCHW uint8
        return ImageStore(images, np.asarray(ds.targets, dtype=np.int64), spec, source=f"{name}/{split}")

    tr = store(train, "train")
    return DataBundle(tr, store(test, "test"), tr.labels, k, name)


@register_dataset("cifar10")
def _cifar10(cfg: DataConfig, spec: ImageSpec, seed: int) -> DataBundle:
    return _cifar(cfg, spec, "cifar10")


@register_dataset("cifar100")
def _cifar100(cfg: DataConfig, spec: ImageSpec, seed: int) -> DataBundle:
    return _cifar(cfg, spec, "cifar100")


# ---------------------------------------------------------------- imagefolder

def _folder_store(scan: FolderScan, cfg: DataConfig, spec: ImageSpec) -> ImageStore:
    if spec.in_chans not in (1, 3):
        raise DataError(f"image inputs need 1 or 3 channels, the model takes in_chans={spec.in_chans}")
    mode = "RGB" if spec.in_chans == 3 else "L"
    size = cfg.cache_img_size or spec.img_size
    images = cached_images(scan, mode, size, cfg.cache_dir, cfg.num_workers)
    return ImageStore(images, scan.targets, spec, source=str(scan.root))


def _stratified_split(targets: np.ndarray, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    draw = rng(FIXED_SPLIT_SEED)
    train, test = [], []
    for k in np.unique(targets):
        ids = draw.permutation(np.flatnonzero(targets == k))
        n_test = min(max(int(round(len(ids) * test_fraction)), 1), len(ids) - 1) if len(ids) > 1 else 0
        test.append(ids[:n_test])
        train.append(ids[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


@register_dataset("imagefolder")
def _imagefolder(cfg: DataConfig, spec: ImageSpec, seed: int) -> DataBundle:
    """Class folders of image files, decoded once into the cache under ``data.cache_dir``."""
    root = expand_path(cfg.root)
    if not root.is_dir():
        raise DataError(f"data.root={str(root)!r} is not a directory; expected layout {_LAYOUT}")
    if (root / "train").is_dir():
        test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
        if test_dir is None:
            raise DataError(f"data.root={str(root)!r} has train/ but neither test/ nor val/; "
                            f"expected layout {_LAYOUT}")
        train, test = scan_folder(root / "train"), scan_folder(test_dir)  # both checked before decoding
        if train.classes != test.classes:
            raise DataError(f"data.root={str(root)!r}: class folders differ between train/ {train.classes} "
                            f"and {test_dir.name}/ {test.classes}; both need the same class folders")
        return DataBundle(_folder_store(train, cfg, spec), _folder_store(test, cfg, spec), train.targets.copy(),
                          len(train.classes), "imagefolder")
    scan = scan_folder(root)
    tr, te = _stratified_split(scan.targets, cfg.test_fraction)
    if len(te) == 0:
        raise DataError(f"data.root={str(root)!r}: too few images to hold out data.test_fraction="
                        f"{cfg.test_fraction} for testing; add images (>= 2 per class) or a test/ folder")
    full = _folder_store(scan, cfg, spec)
    return DataBundle(full.subset(tr), full.subset(te), scan.targets[tr], len(scan.classes), "imagefolder")
