"""The slot store: K clients' PEFT tensors and per-client buffers as flat ``[K, P]`` tensors.

Client batching (``federated.batched``) trains K clients at once, one row (slot) each. Here
every per-client quantity lives in ONE flat fp32 buffer of shape ``[K, P]`` (``P``: the
client's state size, in the order of a ``FlatLayout``): the PEFT tensors themselves
(``params``) and any named buffer registered with ``add_buffer`` (the optimizer's momentum or
AdamW moments; later a client's error-feedback residual). Per-name views ``[K, *shape]``
(``views``) are what the model sees; the optimizer works on the flat buffers in a handful of
whole-buffer kernels instead of a loop over PEFT tensors.

A client taking a slot, a reset and reading a result are integer indexing and ``copy_``: no
Python-data tensor, no host round trip. The API, for code that keeps a client's own state
across rounds (persistent PEFT parts, residuals):

- ``load(slot, tensors)``: copy named tensors (all of the layout's names or a subset) into a
  slot's row of ``params``; ``load_flat(slot, vec)`` copies a whole flat ``[P]`` state.
- ``read(slot)``: the slot's named tensors (copies, ``[*shape]`` each); ``read_flat(slot)``
  its flat ``[P]`` row (a copy).
- ``add_buffer(name)``: a zero ``[K, P]`` buffer kept with the slots (``buffer(name)``);
  ``load_buffer`` / ``read_buffer`` move one slot's row of it in and out.
- ``reset_buffers(slot)``: zeroes the slot's row of every buffer (a new client's fresh
  optimizer state); ``on_reset`` hooks (e.g. AdamW's per-slot step count) run with it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Mapping

import torch

from fedpeft_hpc.peft.state import FlatLayout


class SlotStore:
    """``slots`` rows of a client's flat state (``layout``) on ``device``, plus named per-slot buffers."""

    def __init__(self, layout: FlatLayout, slots: int, device: torch.device | str):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.layout = layout
        self.slots = slots
        self.size = layout.size
        self.device = torch.device(device)
        self.offsets = {}
        at = 0
        for name, n in zip(layout.names, layout.numels):
            self.offsets[name] = (at, at + n)
            at += n
        self.params = torch.zeros((slots, self.size), dtype=torch.float32, device=self.device)
        self._buffers: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self._on_reset: list[Callable[[int], None]] = []

    # -- views -----------------------------------------------------------------------------
    def views(self, flat: torch.Tensor | None = None) -> "OrderedDict[str, torch.Tensor]":
        """Per-name ``[rows, *shape]`` views of ``flat`` (default: ``params``), sharing its memory."""
        flat = self.params if flat is None else flat
        rows = flat.shape[0]
        return OrderedDict((name, flat[:, a:b].view(rows, *shape)) for (name, (a, b)), shape
                           in zip(self.offsets.items(), self.layout.shapes))

    # -- params ----------------------------------------------------------------------------
    @torch.no_grad()
    def load_flat(self, slot: int, vec: torch.Tensor) -> None:
        self.params[slot].copy_(vec)

    @torch.no_grad()
    def load(self, slot: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (named as the layout, any subset) into ``slot``'s row of ``params``."""
        unknown = sorted(set(tensors) - set(self.offsets))
        if unknown:
            raise KeyError(f"not in the slot layout: {unknown[:4]}")
        for name, value in tensors.items():
            a, b = self.offsets[name]
            self.params[slot, a:b].copy_(value.reshape(-1))

    def read_flat(self, slot: int) -> torch.Tensor:
        return self.params[slot].detach().clone()

    def read(self, slot: int) -> "OrderedDict[str, torch.Tensor]":
        row = self.read_flat(slot)
        return OrderedDict((name, row[a:b].view(shape)) for (name, (a, b)), shape
                           in zip(self.offsets.items(), self.layout.shapes))

    # -- per-slot buffers ------------------------------------------------------------------
    def add_buffer(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if name in self._buffers:
            raise ValueError(f"slot buffer {name!r} exists already")
        self._buffers[name] = torch.zeros((self.slots, self.size), dtype=dtype, device=self.device)
        return self._buffers[name]

    def buffer(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    @property
    def buffer_names(self) -> list[str]:
        return list(self._buffers)

    @torch.no_grad()
    def load_buffer(self, name: str, slot: int, vec: torch.Tensor) -> None:
        self._buffers[name][slot].copy_(vec)

    def read_buffer(self, name: str, slot: int) -> torch.Tensor:
        return self._buffers[name][slot].detach().clone()

    def on_reset(self, hook: Callable[[int], None]) -> None:
        """``hook(slot)`` runs in every ``reset_buffers(slot)`` (per-slot state that is not a ``[K, P]`` buffer)."""
        self._on_reset.append(hook)

    @torch.no_grad()
    def reset_buffers(self, slot: int) -> None:
        """Zero ``slot``'s row of every buffer (a new client's fresh optimizer state) and run the reset hooks."""
        for t in self._buffers.values():
            t[slot].zero_()
        for hook in self._on_reset:
            hook(slot)
