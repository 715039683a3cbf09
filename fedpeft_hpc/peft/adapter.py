"""``adapter``: a bottleneck adapter after the MLP of EVERY block (one module per block).

down-projection with a random (Kaiming-uniform) init, activation, up-projection
initialised to zero, so the model starts exactly as the backbone and every adapter
tensor receives gradient (unlike the original FedPEFT code, which zeroed both
projections and shared one module across blocks).
"""

from __future__ import annotations

import torch
from torch import nn

from fedpeft_hpc.config.schema import PeftConfig
from fedpeft_hpc.peft._blocks import embed_dim, transformer_blocks
from fedpeft_hpc.peft.registry import register_peft, unfreeze_head


class Adapter(nn.Module):
    def __init__(self, dim: int, bottleneck: int, bias: bool = False, scale: float = 1.0):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck, bias=bias)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, dim, bias=bias)
        self.scale = scale
        nn.init.zeros_(self.up.weight)
        if bias:
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x))) * self.scale


class MlpWithAdapter(nn.Module):
    """``mlp(x) + adapter(mlp(x))``: the sequential (Houlsby/Pfeiffer) placement."""

    def __init__(self, mlp: nn.Module, adapter: Adapter):
        super().__init__()
        self.mlp = mlp
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mlp(x)
        return h + self.adapter(h)


@register_peft("adapter")
def adapter(model: nn.Module, cfg: PeftConfig) -> None:
    dim = embed_dim(model)
    for block in transformer_blocks(model, "adapter"):
        if not hasattr(block, "mlp"):
            raise ValueError("peft.method=adapter needs blocks with an .mlp")
        ad = Adapter(dim, cfg.adapter_dim, bias=cfg.adapter_bias, scale=cfg.adapter_scale)
        block.mlp = MlpWithAdapter(block.mlp, ad)
        for p in ad.parameters():
            p.requires_grad_(True)
    unfreeze_head(model)
