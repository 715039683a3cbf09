"""Datasets, client partitions and batch iteration."""

from __future__ import annotations

from fedpeft_hpc.data.augment import AUGMENTS, augment_batch
from fedpeft_hpc.data.datasets import (DATASETS, DataBundle, TensorImageDataset, build_datasets,
                                       digits_split_indices, digits_splits, get_builder, register_dataset)
from fedpeft_hpc.data.loader import batches_from_index_lists, iterate_batches, num_batches
from fedpeft_hpc.data import patches as _patches  # noqa: F401  (registers skimage_photos, skimage_science)
from fedpeft_hpc.data.partition import (load_partition, make_partition, partition_dirichlet, partition_iid,
                                        partition_stats, save_partition)
from fedpeft_hpc.data.sources import BatchSources
from fedpeft_hpc.data.store import BatchSource, ImageStore
from fedpeft_hpc.data.transforms import ImageSpec, eval_transform, tensor_to_spec, to_model_input

__all__ = [
    "AUGMENTS", "BatchSource", "BatchSources", "DATASETS", "DataBundle", "ImageSpec", "ImageStore",
    "TensorImageDataset", "augment_batch", "batches_from_index_lists", "build_datasets", "digits_split_indices",
    "digits_splits", "eval_transform", "get_builder", "iterate_batches", "load_partition", "make_partition",
    "num_batches", "partition_dirichlet", "partition_iid", "partition_stats", "register_dataset",
    "save_partition", "tensor_to_spec", "to_model_input",
]
