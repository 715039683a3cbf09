"""A fixed layout that turns a dict of tensors into one flat vector and back."""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import torch


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
