"""Dataset registry: each builder turns a ``DataConfig`` into train/test datasets plus labels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from fedpeft_hpc.config.schema import DataConfig
from fedpeft_hpc.data.transforms import ImageSpec, eval_transform, tensor_to_spec
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
    if isinstance(ds, TensorImageDataset):
        idx = torch.as_tensor(keep, dtype=torch.int64)
        return TensorImageDataset(ds.images[idx], ds.targets[idx])
    return Subset(ds, keep.tolist())


def _tensor_ds(images: np.ndarray, labels: np.ndarray, spec: ImageSpec) -> TensorImageDataset:
    return TensorImageDataset(tensor_to_spec(torch.from_numpy(images), spec), torch.from_numpy(labels))


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
    return DataBundle(_tensor_ds(xtr, ytr, spec), _tensor_ds(xte, yte, spec), ytr, SYNTHETIC_CLASSES, "synthetic")


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
    return DataBundle(_tensor_ds(xtr, ytr, spec), _tensor_ds(xte, yte, spec), ytr, 10, "digits")


# ---------------------------------------------------------------- CIFAR

def _cifar(cfg: DataConfig, spec: ImageSpec, name: str) -> DataBundle:
    from torchvision import datasets as tvd

    cls, folder, k = ((tvd.CIFAR10, "cifar-10-batches-py", 10) if name == "cifar10"
                      else (tvd.CIFAR100, "cifar-100-python", 100))
    root = expand_path(cfg.root)
    tf = eval_transform(spec)
    try:
        train = cls(root=str(root), train=True, download=cfg.download, transform=tf)
        test = cls(root=str(root), train=False, download=cfg.download, transform=tf)
    except RuntimeError:
        raise DataError(f"{name} not found or corrupted in data.root={str(root)!r} (looked for "
                        f"{str(root / folder)!r}). Set data.download=true on a machine with network access, "
                        f"or copy the {folder!r} folder into data.root") from None
    except OSError as e:  # download failed: no network, unwritable root, ...
        raise DataError(f"could not download {name} into data.root={str(root)!r}: {e}. Copy the {folder!r} "
                        f"folder there from a machine with network access") from None
    return DataBundle(train, test, np.asarray(train.targets, dtype=np.int64), k, name)


@register_dataset("cifar10")
def _cifar10(cfg: DataConfig, spec: ImageSpec, seed: int) -> DataBundle:
    return _cifar(cfg, spec, "cifar10")


@register_dataset("cifar100")
def _cifar100(cfg: DataConfig, spec: ImageSpec, seed: int) -> DataBundle:
    return _cifar(cfg, spec, "cifar100")


# ---------------------------------------------------------------- imagefolder

_LAYOUT = "ROOT/train/CLASS/*.jpg + ROOT/test/CLASS/*.jpg (or ROOT/val/...), or ROOT/CLASS/*.jpg"


def _image_folder(path: Path, tf: Any) -> Any:
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(path), transform=tf)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"data.root: no usable images in {str(path)!r} ({e}); expected layout {_LAYOUT}") from None


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
    root = expand_path(cfg.root)
    if not root.is_dir():
        raise DataError(f"data.root={str(root)!r} is not a directory; expected layout {_LAYOUT}")
    tf = eval_transform(spec)
    if (root / "train").is_dir():
        test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
        if test_dir is None:
            raise DataError(f"data.root={str(root)!r} has train/ but neither test/ nor val/; "
                            f"expected layout {_LAYOUT}")
        train, test = _image_folder(root / "train", tf), _image_folder(test_dir, tf)
        if train.classes != test.classes:
            raise DataError(f"data.root={str(root)!r}: class folders differ between train/ {train.classes} "
                            f"and {test_dir.name}/ {test.classes}; both need the same class folders")
        return DataBundle(train, test, np.asarray(train.targets, dtype=np.int64), len(train.classes),
                          "imagefolder")
    full = _image_folder(root, tf)
    targets = np.asarray(full.targets, dtype=np.int64)
    tr, te = _stratified_split(targets, cfg.test_fraction)
    if len(te) == 0:
        raise DataError(f"data.root={str(root)!r}: too few images to hold out data.test_fraction="
                        f"{cfg.test_fraction} for testing; add images (>= 2 per class) or a test/ folder")
    return DataBundle(Subset(full, tr.tolist()), Subset(full, te.tolist()), targets[tr], len(full.classes),
                      "imagefolder")
