"""Registry of PEFT methods and the helpers that define a client's state.

A method mutates a freshly built backbone in place: it may insert small modules
(adapters, prompts, LoRA factors) and marks which parameters are trainable. A
client's whole state is then the ordered dict of trainable tensors (``peft_params``);
the frozen backbone is shared and never sent.
"""

from __future__ import annotations

import importlib
from typing import Callable, Iterable, Protocol

import torch
from torch import nn

from fedpeft_hpc.config.schema import PeftConfig
from fedpeft_hpc.errors import ConfigError
from fedpeft_hpc.peft.parts import apply_frozen
from fedpeft_hpc.peft.state import peft_params
from fedpeft_hpc.utils.hints import did_you_mean


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
    for name in _BUILTIN:
        importlib.import_module(f"fedpeft_hpc.peft.{name}")


def registered_methods() -> list[str]:
    _load_builtin()
    return sorted(_METHODS)


def get_method(name: str) -> PeftMethod:
    """The method registered as ``name``; a ``ConfigError`` on ``peft.method`` otherwise."""
    _load_builtin()
    if name not in _METHODS:
        raise ConfigError("peft.method", f"unknown method {name!r}.{did_you_mean(name, _METHODS)} "
                                         f"Valid: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def apply_peft(model: nn.Module, cfg: PeftConfig) -> nn.Module:
    """Freeze ``model`` and let ``cfg.method`` add and unfreeze its parameters."""
    method = get_method(cfg.method)
    for p in model.parameters():
        p.requires_grad_(False)
    method(model, cfg)
    if not any(p.requires_grad for p in model.parameters()):  # pragma: no cover - method bug
        raise RuntimeError(f"PEFT method {cfg.method!r} left nothing trainable")
    apply_frozen(model, cfg)
    return model


def frozen_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if not p.requires_grad}


def unfreeze_head(model: nn.Module) -> None:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module) or not any(True for _ in head.parameters()):
        raise ValueError(f"{type(model).__name__} has no classifier head to train")
    for p in head.parameters():
        p.requires_grad_(True)


def param_bytes(params: Iterable[torch.Tensor]) -> int:
    """Bytes of ``params`` in their own dtypes: one transfer of them."""
    return sum(p.numel() * p.element_size() for p in params)


def count_params(model: nn.Module) -> dict[str, int]:
    state = peft_params(model)
    return {
        "total_params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in state.values()),
        "bytes_per_transfer": param_bytes(state.values()),
        "tensors_per_transfer": len(state),
    }
