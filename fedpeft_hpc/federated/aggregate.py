"""In-rank accumulation of weighted client updates into ONE flat fp64 buffer.

Layout: ``[sum_k w_k * delta_k (P values) | weight_sum | loss_sum | seen | correct | returned | rejected]``.
The whole buffer is all-reduced once per round (a sum), so updates, weights and metric
sums travel together. Accumulating in fp64 (fp32 updates times integer sample counts are
exact in fp64) makes the result independent of how clients are spread over ranks up to
fp64 rounding, far below fp32 resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STATS = ("weight_sum", "loss_sum", "seen", "correct", "returned", "rejected")


@dataclass
class RoundStats:
    weight_sum: float
    loss_sum: float
    seen: int
    correct: int
    returned: int
    rejected: int

    @property
    def train_loss(self) -> float | None:
        return self.loss_sum / self.seen if self.seen else None

    @property
    def train_acc(self) -> float | None:
        return self.correct / self.seen if self.seen else None


def update_is_valid(vec: torch.Tensor, max_norm: float | None) -> bool:
    """Reject NaN/Inf updates and, optionally, updates whose L2 norm exceeds ``max_norm``."""
    if not bool(torch.isfinite(vec).all()):
        return False
    return max_norm is None or float(vec.norm()) <= max_norm


class RoundBuffer:
    """This rank's share of a round: ``values`` is the one flat fp64 tensor that gets all-reduced."""

    def __init__(self, num_params: int, device: torch.device):
        self.num_params = num_params
        self.values = torch.zeros(num_params + len(STATS), dtype=torch.float64, device=device)

    def _stat(self, name: str, value: float | torch.Tensor) -> None:
        self.values[self.num_params + STATS.index(name)] += value

    def add(self, update: torch.Tensor, weight: float, loss_sum: float | torch.Tensor, seen: int,
            correct: int | torch.Tensor) -> None:
        """``loss_sum`` and ``correct`` may be 0-d device tensors: they are summed on the device, never read."""
        self.values[: self.num_params].add_(update.to(self.values), alpha=float(weight))
        self._stat("weight_sum", float(weight))
        self._stat("loss_sum", loss_sum)
        self._stat("seen", seen)
        self._stat("correct", correct)
        self._stat("returned", 1)

    def reject(self) -> None:
        self._stat("rejected", 1)

    def split(self) -> tuple[torch.Tensor, RoundStats]:
        tail = self.values[self.num_params:].cpu().tolist()
        values = dict(zip(STATS, tail))
        stats = RoundStats(weight_sum=values["weight_sum"], loss_sum=values["loss_sum"], seen=int(values["seen"]),
                           correct=int(values["correct"]), returned=int(values["returned"]),
                           rejected=int(values["rejected"]))
        return self.values[: self.num_params], stats
