"""Patch-classification tasks cut from the real images that scikit-image ships in its wheel.

They give a laptop, offline, tasks at a growing domain gap from the quickstart backbone (pre-trained
on sklearn's handwritten ``digits``), the axis of FedPEFT's capability analysis (CIFAR-100,
Resisc45, PCam). A sample is a square patch of one source image; its label is the image it was cut
from, so a class is one scene, texture or specimen:

- ``skimage_photos`` (medium gap, 8 classes): everyday photographs -- astronaut, camera(man),
  chelsea (a cat), coffee, rocket, clock, motorcycle (left stereo view), coins.
- ``skimage_science`` (far gap, 8 classes): textures, microscopy, pathology, fundus, astronomy --
  brick, grass, gravel, immunohistochemistry (a stained tissue section), retina, cell, hubble deep
  field, moon.

Only images inside the wheel are used (those that need ``pooch`` and a download are not).

How patches are cut (the same for both tasks, and independent of the run's seed, like the fixed
``digits`` split, so every seed and method sees the same task):

1. Each source image (uint8 RGB; grey images are repeated over 3 channels) is divided into a
   ``GRID`` x ``GRID`` grid of blocks. One block per grid row, in a column given by a fixed
   permutation per image, is a **test block**; the other 12 blocks are **training blocks**.
2. A patch is a ``PATCH_PX`` x ``PATCH_PX`` window lying entirely inside one block: training
   patches inside training blocks, test patches inside test blocks. No training pixel is ever a
   test pixel (``tests/test_patches.py`` checks every pair of footprints).
3. Positions are drawn from a fixed stream (``FIXED_SPLIT_SEED``); a window whose grey-level
   standard deviation is below ``MIN_STD`` (flat sky, black background: identical in every
   image) is redrawn.

``data.patches_per_class`` and ``data.test_patches_per_class`` set the counts; the stored images
are the 32 px windows, resized to the model's ``img_size`` per batch like any other store.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from fedpeft_hpc.config.schema import DataConfig
from fedpeft_hpc.data.datasets import DataBundle, register_dataset
from fedpeft_hpc.data.store import ImageStore
from fedpeft_hpc.data.transforms import ImageSpec
from fedpeft_hpc.errors import DataError
from fedpeft_hpc.utils.streams import FIXED_SPLIT_SEED, PATCHES, rng

PATCH_PX = 32
GRID = 4
MIN_STD = 0.04  # grey-level std (0..1) below which a window is flat and redrawn
_MAX_DRAWS = 200  # candidate windows per accepted patch before giving up
EXTRA = "images"  # pip install 'fedpeft-hpc[images]'

TASKS: dict[str, tuple[str, ...]] = {
    "skimage_photos": ("astronaut", "camera", "chelsea", "coffee", "rocket", "clock", "stereo_motorcycle",
                       "coins"),
    "skimage_science": ("brick", "grass", "gravel", "immunohistochemistry", "retina", "cell",
                        "hubble_deep_field", "moon"),
}


@dataclass(frozen=True)
class Layout:
    """Where every patch of one split lies: ``classes[i]`` is the source image, ``(ys[i], xs[i])``
    the top-left corner of its ``PATCH_PX`` window, and ``blocks[i]`` its grid block (row, col)."""

    classes: np.ndarray
    ys: np.ndarray
    xs: np.ndarray
    blocks: np.ndarray


def _skimage_data():
    try:
        import skimage.data
    except ImportError:
        raise DataError(f"data.name={'|'.join(TASKS)} needs scikit-image, which is not installed: "
                        f"pip install 'fedpeft-hpc[{EXTRA}]' (or pip install scikit-image)") from None
    return skimage.data


@lru_cache(maxsize=None)
def source_image(name: str) -> np.ndarray:
    """The bundled image ``name`` as uint8 ``[H, W, 3]`` (read-only; cached per process)."""
    loader = getattr(_skimage_data(), name, None)
    if loader is None:
        raise DataError(f"this scikit-image has no bundled image {name!r}; install scikit-image>=0.22")
    try:
        img = loader()
    except Exception as e:  # an image the installed version only fetches from the network
        raise DataError(f"scikit-image could not load its image {name!r} offline ({type(e).__name__}: {e}); "
                        f"install scikit-image>=0.22, whose wheel contains it") from None
    img = np.asarray(img[0] if isinstance(img, tuple) else img)  # stereo_motorcycle: (left, right, disparity)
    if img.dtype != np.uint8:
        raise DataError(f"scikit-image image {name!r} is {img.dtype}, expected uint8")
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    img = np.ascontiguousarray(img[:, :, :3])
    img.setflags(write=False)
    return img


def block_edges(size: int) -> np.ndarray:
    """Pixel edges of the ``GRID`` blocks along a side of ``size`` pixels."""
    return np.linspace(0, size, GRID + 1).astype(np.int64)


def held_out_blocks(class_id: int) -> np.ndarray:
    """The (row, col) test blocks of source image ``class_id``: one per grid row, a fixed column each."""
    cols = rng(FIXED_SPLIT_SEED, PATCHES, class_id, 0).permutation(GRID)
    return np.stack([np.arange(GRID), cols], axis=1)


def _draw(img: np.ndarray, class_id: int, blocks: np.ndarray, n: int, split: int) -> Layout:
    h, w, _ = img.shape
    ye, xe = block_edges(h), block_edges(w)
    if min(np.diff(ye).min(), np.diff(xe).min()) < PATCH_PX:
        raise DataError(f"source image {class_id} ({h}x{w} px) is too small for {GRID}x{GRID} blocks of "
                        f"at least {PATCH_PX} px")
    grey = img.mean(axis=2, dtype=np.float32) / 255.0
    draw = rng(FIXED_SPLIT_SEED, PATCHES, class_id, split)
    ys, xs, bs = [], [], []
    tries = 0
    while len(ys) < n:
        tries += 1
        if tries > _MAX_DRAWS * n:
            raise DataError(f"could not cut {n} non-flat patches from source image {class_id}")
        r, c = blocks[draw.integers(len(blocks))]
        y = int(draw.integers(ye[r], ye[r + 1] - PATCH_PX + 1))
        x = int(draw.integers(xe[c], xe[c + 1] - PATCH_PX + 1))
        if grey[y:y + PATCH_PX, x:x + PATCH_PX].std() < MIN_STD:
            continue
        ys.append(y)
        xs.append(x)
        bs.append((r, c))
    return Layout(np.full(n, class_id, dtype=np.int64), np.array(ys, dtype=np.int64),
                  np.array(xs, dtype=np.int64), np.array(bs, dtype=np.int64).reshape(n, 2))


def patch_layout(task: str, per_class: int, test_per_class: int) -> dict[str, Layout]:
    """Where the ``train`` and ``test`` patches of ``task`` lie (see the module docstring)."""
    parts: dict[str, list[Layout]] = {"train": [], "test": []}
    for k, name in enumerate(TASKS[task]):
        img = source_image(name)
        test = held_out_blocks(k)
        is_test = np.zeros((GRID, GRID), dtype=bool)
        is_test[test[:, 0], test[:, 1]] = True
        train = np.argwhere(~is_test)
        parts["train"].append(_draw(img, k, train, per_class, 1))
        parts["test"].append(_draw(img, k, test, test_per_class, 2))
    return {split: Layout(*(np.concatenate([getattr(p, f) for p in ps]) for f in ("classes", "ys", "xs", "blocks")))
            for split, ps in parts.items()}


def cut_patches(task: str, layout: Layout) -> np.ndarray:
    """The windows of ``layout`` as uint8 ``[N, 3, PATCH_PX, PATCH_PX]``."""
    names = TASKS[task]
    out = np.empty((len(layout.classes), 3, PATCH_PX, PATCH_PX), dtype=np.uint8)
    for i, (k, y, x) in enumerate(zip(layout.classes, layout.ys, layout.xs)):
        out[i] = source_image(names[k])[y:y + PATCH_PX, x:x + PATCH_PX].transpose(2, 0, 1)
    return out


def _build(task: str, cfg: DataConfig, spec: ImageSpec) -> DataBundle:
    _skimage_data()  # the missing extra is named before anything else
    layouts = patch_layout(task, cfg.patches_per_class, cfg.test_patches_per_class)

    def store(split: str) -> ImageStore:
        lay = layouts[split]
        return ImageStore(torch.from_numpy(cut_patches(task, lay)), lay.classes, spec, source=f"{task}/{split}")

    train = store("train")
    return DataBundle(train, store("test"), layouts["train"].classes.copy(), len(TASKS[task]), task)


@register_dataset("skimage_photos")
def _photos(cfg: DataConfig, spec: ImageSpec, seed: int) -> DataBundle:
    """Medium domain gap: patches of 8 everyday photographs (see the module docstring)."""
    return _build("skimage_photos", cfg, spec)


@register_dataset("skimage_science")
def _science(cfg: DataConfig, spec: ImageSpec, seed: int) -> DataBundle:
    """Far domain gap: patches of 8 texture, microscopy, pathology, fundus and astronomy images."""
    return _build("skimage_science", cfg, spec)
