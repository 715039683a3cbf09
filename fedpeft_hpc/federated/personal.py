"""Personalized evaluation (``data.client_test_fraction``): each client's own model on its own held-out samples.

A client's model is the global (sent) state, its local parts and its LoRA rank
(``ClientParts.as_client``). Client ``c`` is evaluated by rank ``c % world_size``; every rank
fills its clients' ``[correct | count]`` entries of one vector over the whole population,
which is all-reduced: integer counts, so the result is the same for any number of ranks.
``personal_acc`` is the sample-weighted mean (all correct over all held-out samples); the
percentiles are over the clients that hold samples out.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from fedpeft_hpc.federated.client_parts import ClientParts
from fedpeft_hpc.federated.evaluate import evaluate_indices

PERCENTILES = (10, 50, 90)


def personal_counts(model: nn.Module, parts: ClientParts, load_global: Callable[[], None], dataset,
                    test_indices: Sequence[np.ndarray], rank: int, world_size: int, batch_size: int,
                    device: torch.device) -> torch.Tensor:
    """``[correct per client | held-out samples per client]`` (fp64, 2 x clients) for this rank's clients."""
    n = len(test_indices)
    out = torch.zeros(2 * n, dtype=torch.float64, device=device)
    for client in range(rank, n, world_size):
        idx = test_indices[client]
        if len(idx) == 0:
            continue
        load_global()
        parts.as_client(client)
        _, correct, count = evaluate_indices(model, dataset, idx, batch_size, device)
        out[client] = correct
        out[n + client] = count
    parts.as_global()
    load_global()
    return out


def personal_metrics(counts: torch.Tensor) -> dict[str, float]:
    """``personal_acc`` and its percentiles across clients from the all-reduced counts."""
    n = counts.numel() // 2
    correct, count = counts[:n].cpu().numpy(), counts[n:].cpu().numpy()
    held = count > 0
    if not held.any():
        return {}
    per_client = correct[held] / count[held]
    out = {"personal_acc": float(correct.sum() / count.sum())}
    for q, v in zip(PERCENTILES, np.percentile(per_client, PERCENTILES)):
        out[f"personal_acc_p{q}"] = float(v)
    return out
