"""Batch iteration over dataset indices.

A ``BatchSource`` (an ``ImageStore`` or its device views) makes each batch itself in one
gather; a ``TensorImageDataset`` is sliced; any other dataset goes through a DataLoader.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from fedpeft_hpc.data.datasets import TensorImageDataset
from fedpeft_hpc.data.store import BatchSource

Batch = tuple[torch.Tensor, torch.Tensor]


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches that ``iterate_batches`` yields for ``n`` indices."""
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def _order(indices: np.ndarray, generator: torch.Generator | None, shuffle: bool) -> np.ndarray:
    indices = np.asarray(indices, dtype=np.int64)
    if not shuffle:
        return indices
    if generator is None:
        raise ValueError("iterate_batches(shuffle=True) needs a seeded torch.Generator (global RNG is not used)")
    return indices[torch.randperm(len(indices), generator=generator).numpy()]


def _index_batches(indices: np.ndarray, batch_size: int, generator: torch.Generator | None, shuffle: bool,
                   drop_last: bool, epochs: int) -> Iterator[np.ndarray]:
    for _ in range(epochs):
        order = _order(indices, generator, shuffle)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if drop_last and len(idx) < batch_size:
                break
            yield idx


def iterate_batches(dataset: Dataset, indices: np.ndarray, batch_size: int, generator: torch.Generator | None,
                    shuffle: bool = True, drop_last: bool = False, num_workers: int = 0,
                    epochs: int = 1) -> Iterator[Batch]:
    """Yield ``(x, y)`` over ``indices`` for ``epochs`` passes, each shuffled anew by ``generator``.

    A ``BatchSource`` (an ``ImageStore`` or the engine's device views of one) makes each batch
    in one gather and ignores ``num_workers``; a ``TensorImageDataset`` is sliced; any other
    dataset goes through ONE DataLoader for all epochs. The order is the same on every path.
    """
    return batches_from_index_lists(
        dataset, _index_batches(indices, batch_size, generator, shuffle, drop_last, epochs), num_workers)


def _collate_or_none(items: list[Any]) -> Any:
    return default_collate(items) if items else None


def batches_from_index_lists(dataset: Dataset, index_lists: Iterable[Sequence[int]],
                             num_workers: int = 0) -> Iterator[Batch]:
    """Yield one ``(x, y)`` per index list (e.g. Poisson batches); empty lists give empty tensors."""
    empty: Batch | None = None

    def empty_batch() -> Batch:
        nonlocal empty
        if empty is None:
            x0 = torch.as_tensor(dataset[0][0])
            empty = (torch.empty((0, *x0.shape), dtype=x0.dtype), torch.empty(0, dtype=torch.int64))
        return empty

    if isinstance(dataset, BatchSource):
        for idx in index_lists:
            yield dataset.batch(np.asarray(idx, dtype=np.int64)) if len(idx) else dataset.empty_batch()
        return
    if isinstance(dataset, TensorImageDataset):
        for idx in index_lists:
            if len(idx) == 0:
                yield empty_batch()
                continue
            t = torch.as_tensor(np.asarray(idx, dtype=np.int64))
            yield dataset.images[t], dataset.targets[t]
        return
    lists = ([int(i) for i in idx] for idx in index_lists)
    loader = DataLoader(dataset, batch_sampler=lists, num_workers=num_workers, collate_fn=_collate_or_none)
    for batch in loader:
        if batch is None:
            yield empty_batch()
        else:
            x, y = batch
            yield x, torch.as_tensor(y, dtype=torch.int64)
