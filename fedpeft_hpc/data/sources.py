"""What the engine iterates: batches that come out on the rank's device, prepared and augmented.

``BatchSources`` is built once per run and rank. It places each ``ImageStore`` (on a GPU,
a store of at most ``data.gpu_store_mb`` is copied to the device once, so a batch is gathered
there; larger ones stay in host memory, memory-mapped, and only each batch crosses, pinned
and asynchronous) and hands out

- ``client(generator)``: one client's training view, augmented per ``data.augment`` with the
  generator the engine draws for (seed, round, client); ``client(generator, deferred=True)``
  yields ``PendingBatch``es instead (the index list only), which ``prepare_batches`` makes for
  several clients at once: ONE gather, augmentation and preparation over all of them (client
  batching, one per step), each client's augmentation drawn from its own generator;
- ``test``: the deterministic evaluation view; ``train_eval``: the same for training samples
  (each client's held-out ones, ``personal_acc``).

Both keep the interface the engine and the DP code consume: a dataset that
``loader.iterate_batches`` / ``batches_from_index_lists`` turn into an iterator of ``(x, y)``.

A dataset that is not a decoded store (only a builder registered from outside can return
one) takes the old per-sample path, in this process (no workers are started per client);
the log says so once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

from fedpeft_hpc.data.augment import apply_augment, augment_batch, augment_draws
from fedpeft_hpc.data.datasets import TensorImageDataset
from fedpeft_hpc.data.store import Batch, BatchSource, ImageStore
from fedpeft_hpc.data.transforms import to_device, to_model_input
from fedpeft_hpc.errors import ConfigError

log = logging.getLogger(__name__)


class DeviceBatches(BatchSource):
    """A store's batches on ``device``: gathered, moved (stored dtype), augmented, prepared there
    (``deferred``: ``batch`` returns a ``PendingBatch``, made by ``prepare_batches``)."""

    def __init__(self, store: ImageStore, device: torch.device, augment: str = "none",
                 generator: torch.Generator | None = None, deferred: bool = False):
        self.store = store
        self.device = torch.device(device)
        self.augment = augment
        self.generator = generator
        self.deferred = deferred

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int):
        return self.store[i]

    def batch(self, indices: np.ndarray) -> Batch:
        if self.deferred:
            return PendingBatch(self, np.asarray(indices, dtype=np.int64))
        x, y = self.store.gather(indices)
        x, y = to_device(x, self.device), to_device(y, self.device)
        x = augment_batch(x, self.augment, self.generator)
        return to_model_input(x, self.store.spec), y

    def empty_batch(self) -> Batch:
        s = self.store.spec
        return (torch.empty((0, s.in_chans, s.img_size, s.img_size), device=self.device),
                torch.empty(0, dtype=torch.int64, device=self.device))


@dataclass
class PendingBatch:
    """A batch not made yet: its source (a deferred ``DeviceBatches``) and its indices."""

    source: DeviceBatches
    indices: np.ndarray


def prepare_batches(batches: list) -> list[Batch]:
    """``(x, y)`` for each item of ``batches``: ready ones as they are, and the ``PendingBatch``es of one store made
    together: ONE gather of all their indices, one augmentation (each batch's random numbers drawn from its own
    generator, in the order of ``batches``) and one preparation; the same numbers as each made alone."""
    out = list(batches)
    groups: dict[int, list[int]] = {}
    for i, b in enumerate(batches):
        if isinstance(b, PendingBatch):
            groups.setdefault(id(b.source.store), []).append(i)
    for members in groups.values():
        pending = [batches[i] for i in members]
        first = pending[0].source
        sizes = [len(p.indices) for p in pending]
        x, y = first.store.gather(np.concatenate([p.indices for p in pending]))
        x, y = to_device(x, first.device), to_device(y, first.device)
        if first.augment != "none" and len(y):
            h, w = x.shape[2], x.shape[3]
            draws = [augment_draws(n, h, w, first.augment, p.source.generator) for n, p in zip(sizes, pending)
                     if n]
            x = apply_augment(x, first.augment, {k: torch.cat([d[k] for d in draws]) for k in draws[0]})
        x = to_model_input(x, first.store.spec)
        for i, xi, yi in zip(members, torch.split(x, sizes), torch.split(y, sizes)):
            out[i] = (xi, yi)
    return out


class InProcessBatches(BatchSource):
    """The per-sample path for a generic ``Dataset``: ``dataset[i]`` collated in this process."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self._empty: Batch | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[i]

    def batch(self, indices: np.ndarray) -> Batch:
        x, y = default_collate([self.dataset[int(i)] for i in indices])
        return x, torch.as_tensor(y, dtype=torch.int64)

    def empty_batch(self) -> Batch:
        if self._empty is None:
            x0 = torch.as_tensor(self.dataset[0][0])
            self._empty = (torch.empty((0, *x0.shape), dtype=x0.dtype), torch.empty(0, dtype=torch.int64))
        return self._empty


class BatchSources:
    """One rank's training and evaluation data, placed once; see the module docstring."""

    def __init__(self, train: Dataset, test: Dataset, device: torch.device, augment: str = "none",
                 gpu_store_mb: float = 0.0, name: str = "data"):
        self.device = torch.device(device)
        self.augment = augment
        budget = int(gpu_store_mb * 1e6) if self.device.type == "cuda" else 0
        self._moved: dict[int, torch.Tensor] = {}  # id(stored tensor) -> its copy on the device
        self.train, budget = self._place(train, budget, name)
        test_placed, _ = self._place(test, budget, name)
        self.test = self._view(test_placed, "none", None)
        self.train_eval = self._view(self.train, "none", None)  # clients' held-out samples (personal_acc)

    def _place(self, ds: Dataset, budget: int, name: str) -> tuple[Dataset, int]:
        if isinstance(ds, ImageStore):
            if id(ds.images) in self._moved:  # train and test rows of one folder share one tensor
                return ds.with_images(self._moved[id(ds.images)]), budget
            if 0 < ds.nbytes <= budget and ds.device != self.device:
                log.info("%s: %.1f MB of decoded images copied to %s once (data.gpu_store_mb)", ds.source or name,
                         ds.nbytes / 1e6, self.device)
                placed = ds.to(self.device)
                self._moved[id(ds.images)] = placed.images
                return placed, budget - ds.nbytes
            return ds, budget
        if self.augment != "none":
            raise ConfigError("data.augment", f"{self.augment!r} needs a decoded image store; {name} yields a "
                                              f"{type(ds).__name__} of prepared tensors. Use data.augment=none")
        if isinstance(ds, TensorImageDataset):
            return ds, budget
        log.info("%s yields a generic %s, not a decoded image store: its samples are read one by one in "
                 "this process (no device-side batching)", name, type(ds).__name__)
        return InProcessBatches(ds), budget

    def _view(self, ds: Dataset, augment: str, generator: torch.Generator | None, deferred: bool = False
              ) -> Dataset:
        if isinstance(ds, ImageStore):
            return DeviceBatches(ds, self.device, augment, generator, deferred)
        return ds  # a TensorImageDataset (sliced, moved by local_train) or the in-process path

    def client(self, generator: torch.Generator | None, deferred: bool = False) -> Dataset:
        """One client's training batches for one round; ``generator`` drives its augmentation; ``deferred``:
        ``PendingBatch``es for ``prepare_batches``."""
        return self._view(self.train, self.augment, generator, deferred)
