"""Server evaluation on the global test set, sharded by whole batches over ranks.

Batch b goes to rank ``b % world_size``; the batches themselves are the same for any
world size, so each sample's logits (and the accuracy) do not depend on it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedpeft_hpc.data.loader import iterate_batches
from fedpeft_hpc.models.precision import compute_precision


def shard_indices(n: int, batch_size: int, rank: int, world_size: int) -> np.ndarray:
    starts = range(rank * batch_size, n, world_size * batch_size)
    parts = [np.arange(s, min(s + batch_size, n)) for s in starts]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@torch.no_grad()
def evaluate_shard(model: nn.Module, dataset, batch_size: int, device: torch.device, rank: int = 0,
                   world_size: int = 1, num_workers: int = 0) -> torch.Tensor:
    """``[loss_sum, correct, count]`` (fp64) over this rank's batches. The forward runs in fp32 whatever
    ``model.precision`` (which applies to client training only), so the accuracy a run reports is the one
    its fine-tuned model gets in fp32 (``load_run``)."""
    return evaluate_indices(model, dataset, shard_indices(len(dataset), batch_size, rank, world_size), batch_size,
                            device, num_workers)


@torch.no_grad()
def evaluate_indices(model: nn.Module, dataset, idx: np.ndarray, batch_size: int, device: torch.device,
                     num_workers: int = 0) -> torch.Tensor:
    """``[loss_sum, correct, count]`` (fp64) of ``model`` (in fp32) on the samples ``idx`` of ``dataset``."""
    was_training = model.training
    model.eval()
    out = torch.zeros(3, dtype=torch.float64, device=device)
    if len(idx):
        for x, y in iterate_batches(dataset, idx, batch_size, None, shuffle=False, num_workers=num_workers):
            x, y = x.to(device), y.to(device)
            with compute_precision("fp32", device):  # on CUDA: no TF32 either
                logits = model(x).float()
            out[0] += F.cross_entropy(logits, y, reduction="sum").double()
            out[1] += (logits.argmax(dim=1) == y).sum()
            out[2] += y.numel()
    model.train(was_training)
    return out


def accuracy(model: nn.Module, dataset, batch_size: int = 256, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` in one process (as the run reports it)."""
    loss_sum, correct, count = evaluate_shard(model, dataset, batch_size, torch.device(device)).tolist()
    return correct / count if count else float("nan")
