"""Work-arounds for bugs of a compute backend, applied only on that backend.

CUDA LayerNorm with a frozen weight and a trainable bias (BitFit and the other methods that
train biases) fails its backward on large inputs: seen with torch 2.11 on an NVIDIA H200 for
ViT-B/16 at 512 x 197 tokens ("NativeLayerNormBackward0 returned an invalid gradient at index
2 - got [0] but expected shape compatible with [768]"); the fused kernel's reduction for many
rows returns no bias gradient when no weight gradient is asked for. ``split_layer_norm_bias``
computes such a LayerNorm as ``layer_norm(x, weight, no bias) + bias``: the same function, the
bias gradient then computed by autograd's add. On CPU nothing is changed (results there stay
bit for bit what they were).

The module's class is swapped for a subclass of its own class defined here (torch's
``nn.LayerNorm`` and timm's ``LayerNorm``, whose forward is the plain ``layer_norm``; other
subclasses such as ``LayerNorm2d`` compute something else and are left alone): ``isinstance``
checks, parameters and ``state_dict`` keys stay as they were, and the patched model pickles
(``torch.save(model)``) because the classes are found by name. Opacus picks a per-sample
gradient rule by the module's exact type, so a swapped class gets the rule of its original
class (``nn.LayerNorm``'s; timm's has none and goes through functorch, as before).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm as TimmLayerNorm
from torch import nn


def _layer_norm_plus_bias(self: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, self.normalized_shape, self.weight, None, self.eps) + self.bias


class SplitBiasLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` computed as ``layer_norm(x, weight, None) + bias``."""

    forward = _layer_norm_plus_bias


class SplitBiasTimmLayerNorm(TimmLayerNorm):
    """timm's ``LayerNorm`` computed as ``layer_norm(x, weight, None) + bias``."""

    forward = _layer_norm_plus_bias


SPLIT_CLASSES = {nn.LayerNorm: SplitBiasLayerNorm, TimmLayerNorm: SplitBiasTimmLayerNorm}


def _give_opacus_rules(classes: dict) -> None:
    """Each swapped class gets the per-sample gradient rule of its original (Opacus looks rules up by exact type)."""
    try:
        from opacus.grad_sample.grad_sample_module import GradSampleModule
        from opacus.grad_sample.utils import register_grad_sampler
    except ImportError:  # without Opacus there is nothing to keep in step
        return
    for original, split in classes.items():
        rule = GradSampleModule.GRAD_SAMPLERS.get(original)
        if rule is not None and GradSampleModule.GRAD_SAMPLERS.get(split) is not rule:
            register_grad_sampler(split)(rule)


def apply_device_fixes(model: nn.Module, device: torch.device | str) -> list[str]:
    """The work-arounds ``device``'s backend needs (CUDA: ``split_layer_norm_bias``); the names of
    the modules changed."""
    if torch.device(device).type == "cuda":
        return split_layer_norm_bias(model)
    return []


def split_layer_norm_bias(model: nn.Module) -> list[str]:
    """Give every LayerNorm (``SPLIT_CLASSES``) whose bias trains but whose weight does not the split forward."""
    changed = []
    for name, m in model.named_modules():
        split = SPLIT_CLASSES.get(type(m))
        if (split is not None and m.bias is not None and m.weight is not None and m.bias.requires_grad
                and not m.weight.requires_grad):
            m.__class__ = split
            changed.append(name)
    if changed:
        _give_opacus_rules(SPLIT_CLASSES)
    return changed
