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
from fedpeft_hpc.models.precision import compute_precision
from fedpeft_hpc.peft.state import FlatLayout, load_vector


@dataclass
class LocalResult:
    delta: torch.Tensor  # flat fp32, local - global
    loss_sum: float | torch.Tensor  # batched training: a 0-d device tensor (read with the round's sums)
    seen: int  # samples processed over all local steps
    correct: int | torch.Tensor
    steps: int


def make_optimizer(params: Iterable[torch.Tensor], cfg: OptimConfig) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def train_mode(model: nn.Module) -> None:
    """Training mode for local training, with the backbone's statistics frozen: BatchNorm layers
    stay in eval mode (their running statistics belong to the shared frozen backbone; updating
    them would make the model depend on which clients a rank trained). Dropout and drop-path stay
    active, drawn from the client's own seeded stream (``local_train``)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def local_train(model: nn.Module, params: Mapping[str, nn.Parameter], layout: FlatLayout,
                start: torch.Tensor, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                optimizer: torch.optim.Optimizer, device: torch.device, layers_seed: int = 0,
                precision: str = "fp32") -> LocalResult:
    """Train from ``start``; stochastic layers (dropout, drop-path) draw from ``layers_seed`` only,
    never from the global random state (which is restored afterwards); the forward/backward run
    in ``precision`` (``model.precision``)."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(layers_seed)
        return _train(model, params, layout, start, batches, optimizer, device, precision)


def _train(model: nn.Module, params: Mapping[str, nn.Parameter], layout: FlatLayout, start: torch.Tensor,
           batches: Iterable[tuple[torch.Tensor, torch.Tensor]], optimizer: torch.optim.Optimizer,
           device: torch.device, precision: str) -> LocalResult:
    load_vector(params, layout, start)
    train_mode(model)
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
