"""Where PEFT modules attach in a timm vision transformer."""

from __future__ import annotations

from torch import nn


def transformer_blocks(model: nn.Module, method: str) -> nn.Sequential:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        raise ValueError(f"peft.method={method} needs a timm vision transformer with .blocks; "
                         f"{type(model).__name__} has none (use head, bias or full)")
    return blocks


def embed_dim(model: nn.Module) -> int:
    dim = getattr(model, "embed_dim", None) or getattr(model, "num_features", None)
    if not dim:
        raise ValueError(f"cannot tell the embedding width of {type(model).__name__}")
    return int(dim)
