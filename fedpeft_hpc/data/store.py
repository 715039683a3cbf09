"""Decoded images held once as one tensor: the form every built-in dataset takes.

An ``ImageStore`` is ``images`` ``[N, C, h, w]`` at the stored resolution (uint8 0..255 for
decoded files and CIFAR, float32 0..1 for digits and synthetic data; in memory or memory-mapped
from an image-folder cache), the labels, and the ``ImageSpec`` that says what the model takes.
A batch is one ``index_select`` on that tensor plus ``to_model_input``: no per-sample Python,
no DataLoader, no worker processes. Subsets (train/test of one folder, ``max_train_samples``)
are row maps into the same tensor, so a memory-mapped cache is never copied whole.

``BatchSource`` is what the batch iterators in ``loader`` recognise: anything that turns an
index array into one ``(x, y)`` batch. Iterating an ``ImageStore`` itself gives evaluation
batches on the store's device; ``sources.py`` adds device views with augmentation.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from fedpeft_hpc.data.transforms import ImageSpec, to_device, to_model_input
from fedpeft_hpc.errors import DataError

Batch = tuple[torch.Tensor, torch.Tensor]


class BatchSource(Dataset):
    """A dataset that yields whole batches: ``batch(indices)`` and ``empty_batch()``."""

    def batch(self, indices: np.ndarray) -> Batch:
        raise NotImplementedError

    def empty_batch(self) -> Batch:
        raise NotImplementedError


def _index_tensor(indices, device: torch.device) -> torch.Tensor:
    return to_device(torch.as_tensor(np.asarray(indices, dtype=np.int64)), device)


class ImageStore(BatchSource):
    """Decoded images + labels; ``store[i]`` and its batches are model input (evaluation path)."""

    def __init__(self, images: torch.Tensor, targets, spec: ImageSpec, rows: torch.Tensor | None = None,
                 source: str = ""):
        what = source or "ImageStore"
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise DataError(f"{what}: images must be [N, 1 or 3, H, W], got {tuple(images.shape)}")
        if images.dtype not in (torch.uint8, torch.float32):
            raise DataError(f"{what}: images must be uint8 or float32, got {images.dtype}")
        targets = torch.as_tensor(np.asarray(targets), dtype=torch.int64)
        if targets.ndim != 1 or targets.shape[0] != images.shape[0]:
            raise DataError(f"{what}: {images.shape[0]} images but {tuple(targets.shape)} labels")
        self.images = images
        self.targets = targets.to(images.device)
        self.rows = None if rows is None else rows.to(device=images.device, dtype=torch.int64)
        self.spec = spec
        self.source = source

    # -- shape ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.images.shape[0] if self.rows is None else self.rows.shape[0])

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def labels(self) -> np.ndarray:
        """Labels of this store's rows, in order (int64)."""
        t = self.targets if self.rows is None else self.targets[self.rows]
        return t.cpu().numpy()

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensor behind this store (shared by its subsets)."""
        return self.images.numel() * self.images.element_size()

    # -- access --------------------------------------------------------------------------
    def gather(self, indices) -> Batch:
        """Stored images and labels of ``indices`` (positions in this store), on the store's device."""
        pos = _index_tensor(indices, self.device)
        if self.rows is not None:
            pos = self.rows[pos]
        return self.images.index_select(0, pos), self.targets.index_select(0, pos)

    def batch(self, indices: np.ndarray) -> Batch:
        x, y = self.gather(indices)
        return to_model_input(x, self.spec), y

    def empty_batch(self) -> Batch:
        s = self.spec
        return (torch.empty((0, s.in_chans, s.img_size, s.img_size), device=self.device),
                torch.empty(0, dtype=torch.int64, device=self.device))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        x, y = self.batch(np.array([i % len(self)]))
        return x[0], int(y[0])

    # -- derived stores ------------------------------------------------------------------
    def subset(self, keep) -> "ImageStore":
        """The rows ``keep`` (positions in this store), sharing the stored tensor."""
        pos = torch.as_tensor(np.asarray(keep, dtype=np.int64))
        rows = pos if self.rows is None else self.rows.cpu()[pos]
        return ImageStore(self.images, self.targets, self.spec, rows=rows, source=self.source)

    def stored(self) -> torch.Tensor:
        """All stored images of this store's rows, in order (a copy)."""
        return self.gather(np.arange(len(self)))[0]

    def to(self, device: torch.device) -> "ImageStore":
        """The same store with its tensor on ``device`` (one copy of the whole stored tensor)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return self.with_images(self.images.to(device))

    def with_images(self, images: torch.Tensor) -> "ImageStore":
        """This store's rows and labels over ``images`` (the same tensor elsewhere, e.g. on a GPU)."""
        if images.shape != self.images.shape:
            raise ValueError(f"with_images needs a tensor shaped {tuple(self.images.shape)}, "
                             f"got {tuple(images.shape)}")
        return ImageStore(images, self.targets, self.spec, rows=self.rows, source=self.source)
