"""A client's state as one flat vector, and back into the model.

``FlatLayout`` fixes an order (the names of the trainable tensors, sorted) so that a dict of
tensors becomes one flat vector (what is trained, summed, all-reduced and checkpointed) and a
vector becomes tensors again. ``load_vector`` copies a vector into the model's trainable
parameters; ``load_peft_state`` loads a checkpoint's named tensors into a freshly built model,
which is how both the engine (resume) and ``load_run`` restore a fine-tuned model.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import torch
from torch import nn


class FlatLayout:
    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.names = list(tensors)
        self.shapes = [tuple(t.shape) for t in tensors.values()]
        self.numels = [t.numel() for t in tensors.values()]
        self.size = sum(self.numels)

    def flatten(self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.cat([tensors[n].detach().reshape(-1).to(dtype) for n in self.names])

    def unflatten(self, vec: torch.Tensor, dtype: torch.dtype | None = None) -> "OrderedDict[str, torch.Tensor]":
        out = OrderedDict()
        for name, chunk, shape in zip(self.names, torch.split(vec[: self.size], self.numels), self.shapes):
            out[name] = chunk.reshape(shape).to(dtype) if dtype is not None else chunk.reshape(shape)
        return out

    def mismatch(self, names) -> list[str]:
        """Names in one of ``names`` / this layout but not the other (sorted)."""
        return sorted(set(self.names) ^ set(names))


@torch.no_grad()
def load_vector(params: Mapping[str, torch.Tensor], layout: FlatLayout, vec: torch.Tensor) -> None:
    """Copy the flat ``vec`` into the tensors ``params`` (by the names of ``layout``)."""
    for name, value in layout.unflatten(vec).items():
        params[name].copy_(value)


def load_peft_state(params: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> FlatLayout:
    """Load named tensors (a checkpoint's ``peft/`` part) into ``params``; returns the layout.

    Raises ``ValueError`` naming the tensors that are in one and not the other.
    """
    layout = FlatLayout(params)
    diff = layout.mismatch(tensors)
    if diff:
        raise ValueError(f"the PEFT state does not match the model: differs in {diff[:4]}")
    load_vector(params, layout, layout.flatten(tensors, torch.float32))
    return layout


def peft_params(model: nn.Module) -> "OrderedDict[str, nn.Parameter]":
    """The trainable tensors (a client's state), in a fixed order (sorted by name)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return OrderedDict(sorted(named, key=lambda kv: kv[0]))
