"""``lora``: low-rank updates ``W + (alpha / r) * B A`` on attention qkv/proj and optionally the MLP.

A and B are plain ``nn.Linear`` modules (bias-free), so Opacus computes their per-sample
gradients with its own Linear rule, and a later batched-clients path can give them a
leading client dimension. B starts at zero (the model starts as the backbone).
"""

from __future__ import annotations

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
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + (self.lora_B.weight @ self.lora_A.weight) * self.scaling


@register_peft("lora")
def lora(model: nn.Module, cfg: PeftConfig) -> None:
    for block in transformer_blocks(model, "lora"):
        for target in cfg.lora_targets:
            parent_name, child_name = _TARGETS[target]
            parent = getattr(block, parent_name, None)
            base = getattr(parent, child_name, None) if parent is not None else None
            if not isinstance(base, nn.Linear):
                raise ValueError(f"peft.lora_targets: block has no Linear {parent_name}.{child_name}")
            wrapped = LoRALinear(base, cfg.lora_rank, cfg.lora_alpha)
            setattr(parent, child_name, wrapped)
            wrapped.lora_A.weight.requires_grad_(True)
            wrapped.lora_B.weight.requires_grad_(True)
    unfreeze_head(model)
