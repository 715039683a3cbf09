"""``prompt``: visual prompt tuning (VPT), shallow or deep.

Learnable tokens are inserted right after the prefix (class/register) tokens. Deep
VPT gives every block its own tokens (replacing the previous block's prompt outputs);
shallow VPT inserts them once before the first block. The prompt outputs are stripped
after the last block so pooling (token or average) sees the usual sequence. Tokens
live in their own ``PromptTokens`` submodule, never on the root module (Opacus would
otherwise fall back to functorch for the whole model).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedpeft_hpc.config.schema import PeftConfig
from fedpeft_hpc.peft._blocks import embed_dim, transformer_blocks
from fedpeft_hpc.peft.registry import register_peft, unfreeze_head


class PromptTokens(nn.Module):
    """Puts ``num_tokens`` learnable tokens at positions ``[prefix, prefix + num_tokens)``."""

    def __init__(self, num_tokens: int, dim: int, prefix: int, replace: bool, init_val: float):
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(num_tokens, dim).uniform_(-init_val, init_val))
        self.prefix = prefix
        self.replace = replace

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.tokens.unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype)
        skip = self.num_tokens if self.replace else 0
        return torch.cat([x[:, : self.prefix], p, x[:, self.prefix + skip:]], dim=1)


class PromptedBlock(nn.Module):
    def __init__(self, block: nn.Module, prompt: PromptTokens):
        super().__init__()
        self.prompt = prompt
        self.block = block

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.block(self.prompt(x), *args, **kwargs)


class PromptStrip(nn.Module):
    def __init__(self, prefix: int, num_tokens: int):
        super().__init__()
        self.prefix = prefix
        self.num_tokens = num_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, : self.prefix], x[:, self.prefix + self.num_tokens:]], dim=1)


@register_peft("prompt")
def prompt(model: nn.Module, cfg: PeftConfig) -> None:
    blocks = transformer_blocks(model, "prompt")
    dim = embed_dim(model)
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", (16, 16))
    init_val = math.sqrt(6.0 / float(3 * patch[0] * patch[1] + dim))  # VPT's Xavier-uniform bound
    n = cfg.prompt_tokens
    new_blocks = []
    for i, block in enumerate(blocks):
        if i == 0 or cfg.prompt_deep:
            tokens = PromptTokens(n, dim, prefix, replace=i > 0, init_val=init_val)
            tokens.tokens.requires_grad_(True)
            block = PromptedBlock(block, tokens)
        new_blocks.append(block)
    new_blocks.append(PromptStrip(prefix, n))
    model.blocks = nn.Sequential(*new_blocks)
    unfreeze_head(model)
