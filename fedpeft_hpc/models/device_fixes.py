"""Work-arounds for bugs of a compute backend, applied only on that backend.

CUDA LayerNorm with a frozen weight and a trainable bias (BitFit and the other methods that
train biases) fails its backward on large inputs: seen with torch 2.11 on an NVIDIA H200 for
ViT-B/16 at 512 x 197 tokens ("NativeLayerNormBackward0 returned an invalid gradient at index
2 - got [0] but expected shape compatible with [768]"); the fused kernel's reduction for many
rows returns no bias gradient when no weight gradient is asked for. ``split_layer_norm_bias``
computes such a LayerNorm as ``layer_norm(x, weight, no bias) + bias``: the same function, the
bias gradient then computed by autograd's add. On CPU nothing is changed (results there stay
bit for bit what they were).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def _layer_norm_plus_bias(self: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, self.normalized_shape, self.weight, None, self.eps) + self.bias


def apply_device_fixes(model: nn.Module, device: torch.device | str) -> list[str]:
    """The work-arounds ``device``'s backend needs (CUDA: ``split_layer_norm_bias``); the names of
    the modules changed."""
    if torch.device(device).type == "cuda":
        return split_layer_norm_bias(model)
    return []


def split_layer_norm_bias(model: nn.Module) -> list[str]:
    """Give every LayerNorm whose bias trains but whose weight does not the split forward."""
    changed = []
    for name, m in model.named_modules():
        if (isinstance(m, nn.LayerNorm) and m.bias is not None and m.weight is not None and m.bias.requires_grad
                and not m.weight.requires_grad):
            m.forward = types.MethodType(_layer_norm_plus_bias, m)
            changed.append(name)
    return changed
