"""One client's local training: a small, replaceable step.

In: the shared model (its PEFT parameters get the global state), batches, an optimizer.
Out: the update (local - global) as a flat fp32 vector, sample count and metric sums.
DP-SGD plugs in from outside by wrapping the model, the optimizer and the batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fedpeft_hpc.config.schema import OptimConfig
from fedpeft_hpc.federated.flat import FlatLayout
from fedpeft_hpc.models.precision import compute_precision


@dataclass
class LocalResult:
    delta: torch.Tensor  # flat fp32, local - global
    loss_sum: float
    seen: int  # samples processed over all local steps
    correct: int
    steps: int


def make_optimizer(params: Iterable[torch.Tensor], cfg: OptimConfig) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


@torch.no_grad()
def load_flat(params: Mapping[str, torch.Tensor], layout: FlatLayout, vec: torch.Tensor) -> None:
    for name, value in layout.unflatten(vec).items():
        params[name].copy_(value)


def local_train(model: nn.Module, params: Mapping[str, nn.Parameter], layout: FlatLayout,
                start: torch.Tensor, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                optimizer: torch.optim.Optimizer, device: torch.device, precision: str = "fp32") -> LocalResult:
    """Train from ``start`` on ``batches``; the forward/backward run in ``precision`` (``model.precision``)."""
    load_flat(params, layout, start)
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = steps = 0
    for x, y in batches:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with compute_precision(precision, device):
            out = model(x)
            # sum / n is the mean for a non-empty batch and a zero loss for an empty (Poisson) one
            loss = F.cross_entropy(out, y, reduction="sum") / max(1, y.numel())
            loss.backward()
        optimizer.step()
        steps += 1
        seen += y.numel()
        loss_sum += loss.detach().double() * y.numel()
        correct += (out.detach().argmax(dim=1) == y).sum()
    optimizer.zero_grad(set_to_none=True)
    delta = layout.flatten(params, torch.float32) - start
    return LocalResult(delta=delta, loss_sum=float(loss_sum), seen=seen, correct=int(correct), steps=steps)
