"""``lora``: low-rank updates ``W + (alpha / r) * B A`` on attention qkv/proj and optionally the MLP.

A and B are plain ``nn.Linear`` modules (bias-free), so Opacus computes their per-sample
gradients with its own Linear rule, and a later batched-clients path can give them a
leading client dimension. B starts at zero (the model starts as the backbone).

Heterogeneous ranks (``peft.lora_ranks``, HetLoRA): the model holds the largest rank and
``set_active_rank`` makes every LoRA layer use only its first ``r`` components (a mask on
``A x``, so A's last rows and B's last columns get exactly zero gradient and Opacus still
sees plain Linear modules). Client-batched training gives each slot its own mask
(``rank_masks``: the LoRA layers take a ``[r_max]`` mask, batched over slots under vmap).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from fedpeft_hpc.config.schema import PeftConfig
from fedpeft_hpc.peft._blocks import transformer_blocks
from fedpeft_hpc.peft.registry import register_peft, unfreeze_head

_TARGETS = {"qkv": ("attn", "qkv"), "proj": ("attn", "proj"), "fc1": ("mlp", "fc1"), "fc2": ("mlp", "fc2")}


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        self.scaling = alpha / rank
        self.rank_mask: torch.Tensor | None = None  # ones for the active components (set_active_rank)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lora_A(x)
        if self.rank_mask is not None:
            h = h * self.rank_mask.to(h.dtype)
        return self.base(x) + self.lora_B(h) * self.scaling

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + (self.lora_B.weight @ self.lora_A.weight) * self.scaling


def set_active_rank(model: nn.Module, rank: int | None) -> None:
    """Use only the first ``rank`` LoRA components in every layer (``None``: all of them)."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            full = m.lora_A.out_features
            m.rank_mask = (None if rank is None or rank >= full
                           else components_mask(full, rank, m.lora_A.weight.device))


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def rank_components(layers: list[LoRALinear]) -> int:
    """The (largest) rank the LoRA layers hold: the length of a rank mask."""
    dims = {m.lora_A.out_features for m in layers}
    if len(dims) != 1:
        raise ValueError(f"LoRA layers of different ranks {sorted(dims)}: one rank mask cannot serve them")
    return dims.pop()


def components_mask(full: int, rank: int | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[full]`` float mask: ones for the first ``rank`` components (all of them for ``None``)."""
    return (torch.arange(full, device=device) < (full if rank is None else rank)).to(torch.float32)


@contextlib.contextmanager
def rank_masks(layers: list[LoRALinear], mask: torch.Tensor | None):
    """Within the block, every layer of ``layers`` masks ``A x`` by ``mask`` (``[r_max]``; under vmap a slot's
    or a sample's own row); ``None``: unchanged."""
    if mask is None:
        yield
        return
    before = [m.rank_mask for m in layers]
    for m in layers:
        m.rank_mask = mask
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m.rank_mask = b


def truncated_shape(name: str, shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
    """The shape a rank-``rank`` client exchanges of the tensor ``name`` (A: first rows, B: first columns)."""
    if ".lora_A." in name:
        return (min(rank, shape[0]), *shape[1:])
    if ".lora_B." in name:
        return (shape[0], min(rank, shape[1]))
    return shape


def truncation_mask(name: str, shape: tuple[int, ...], rank: int) -> torch.Tensor | None:
    """Boolean mask of the entries of ``name`` a rank-``rank`` client holds (``None``: all of them)."""
    if ".lora_A." not in name and ".lora_B." not in name:
        return None
    mask = torch.zeros(shape, dtype=torch.bool)
    if ".lora_A." in name:
        mask[:rank] = True
    else:
        mask[:, :rank] = True
    return mask


@register_peft("lora")
def lora(model: nn.Module, cfg: PeftConfig) -> None:
    for block in transformer_blocks(model, "lora"):
        for target in cfg.lora_targets:
            parent_name, child_name = _TARGETS[target]
            parent = getattr(block, parent_name, None)
            base = getattr(parent, child_name, None) if parent is not None else None
            if not isinstance(base, nn.Linear):
                raise ValueError(f"peft.lora_targets: block has no Linear {parent_name}.{child_name}")
            wrapped = LoRALinear(base, max(cfg.lora_ranks) if cfg.lora_ranks else cfg.lora_rank, cfg.lora_alpha)
            setattr(parent, child_name, wrapped)
            wrapped.lora_A.weight.requires_grad_(True)
            wrapped.lora_B.weight.requires_grad_(True)
    unfreeze_head(model)
