"""Registry of PEFT methods and the helpers that define a client's state.

A method mutates a freshly built backbone in place: it may insert small modules
(adapters, prompts, LoRA factors) and marks which parameters are trainable. A
client's whole state is then the ordered dict of trainable tensors (``peft_params``);
the frozen backbone is shared and never sent.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Protocol

from torch import nn

from fedpeft_hpc.config.schema import PeftConfig


class PeftMethod(Protocol):
    def __call__(self, model: nn.Module, cfg: PeftConfig) -> None: ...


_METHODS: dict[str, PeftMethod] = {}
_BUILTIN = ("full", "head", "bias", "adapter", "prompt", "lora")


def register_peft(name: str) -> Callable[[PeftMethod], PeftMethod]:
    """Decorator: ``@register_peft("lora")`` on ``fn(model, cfg)``."""

    def deco(fn: PeftMethod) -> PeftMethod:
        if name in _METHODS and _METHODS[name] is not fn:
            raise ValueError(f"PEFT method {name!r} registered twice")
        _METHODS[name] = fn
        return fn

    return deco


def _load_builtin() -> None:
    import importlib

    for name in _BUILTIN:
        importlib.import_module(f"fedpeft_hpc.peft.{name}")


def registered_methods() -> list[str]:
    _load_builtin()
    return sorted(_METHODS)


def apply_peft(model: nn.Module, cfg: PeftConfig) -> nn.Module:
    """Freeze ``model`` and let ``cfg.method`` add and unfreeze its parameters."""
    _load_builtin()
    if cfg.method not in _METHODS:
        raise KeyError(cfg.method)
    # what full fine-tuning of this backbone would exchange, before any PEFT module is added
    model.fedpeft_full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    _METHODS[cfg.method](model, cfg)
    if not any(p.requires_grad for p in model.parameters()):  # pragma: no cover - method bug
        raise RuntimeError(f"PEFT method {cfg.method!r} left nothing trainable")
    return model


def peft_params(model: nn.Module) -> "OrderedDict[str, nn.Parameter]":
    """The trainable tensors (a client's state), in a fixed order (sorted by name)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return OrderedDict(sorted(named, key=lambda kv: kv[0]))


def frozen_params(model: nn.Module) -> "OrderedDict[str, nn.Parameter]":
    return OrderedDict((n, p) for n, p in model.named_parameters() if not p.requires_grad)


def unfreeze_head(model: nn.Module) -> None:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module) or not any(True for _ in head.parameters()):
        raise ValueError(f"{type(model).__name__} has no classifier head to train")
    for p in head.parameters():
        p.requires_grad_(True)


def count_params(model: nn.Module) -> dict[str, int]:
    state = peft_params(model)
    return {
        "total_params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in state.values()),
        "bytes_per_transfer": sum(p.numel() * p.element_size() for p in state.values()),
        "tensors_per_transfer": len(state),
    }
