"""The parts of a PEFT state: which tensors a client sends, keeps for itself, or nobody trains.

Every trainable tensor of a method belongs to one named part (``head``; ``lora_a``, ``lora_b``;
``adapter``; ``prompt``; ``bias``; a method's other tensors, e.g. ``full``'s backbone, have no
part name and are always sent). ``peft.frozen`` parts are set back to non-trainable right after
the method is applied, so they keep their seeded initialisation and are neither trained, sent
nor checkpointed (``load_run`` rebuilds them from the seed). ``peft.local`` parts stay
trainable but are split off the exchanged state: ``StateParts`` names the sent and the local
tensors, and the engine keeps the local ones per client (``runs.client_state``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from torch import nn

from fedpeft_hpc.config.schema import PeftConfig
from fedpeft_hpc.errors import ConfigError

_SUBSTRINGS = (("lora_a", ".lora_A."), ("lora_b", ".lora_B."), ("adapter", ".adapter."), ("prompt", ".prompt.tokens"))


def head_names(model: nn.Module) -> set[str]:
    """Names of the classifier head's parameters (timm's ``get_classifier``)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module):
        return set()
    ids = {id(p) for p in head.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def part_of(name: str, method: str, heads: set[str]) -> str | None:
    """The part ``name`` belongs to under ``method`` (``None``: no part name, always sent)."""
    if name in heads:
        return "head"
    for part, needle in _SUBSTRINGS:
        if needle in name:
            return part
    if method == "bias" and (name.endswith(".bias") or name == "bias"):
        return "bias"
    return None


def method_parts(model: nn.Module, method: str) -> dict[str, str | None]:
    """``{name: part}`` for the trainable tensors of ``model`` right after ``method`` was applied."""
    heads = head_names(model)
    return {n: part_of(n, method, heads) for n, p in model.named_parameters() if p.requires_grad}


def apply_frozen(model: nn.Module, cfg: PeftConfig) -> None:
    """Check ``peft.local``/``peft.frozen`` against the parts ``cfg.method`` has; freeze ``peft.frozen``."""
    parts = method_parts(model, cfg.method)
    have = sorted({p for p in parts.values() if p is not None})
    for key, wanted in (("peft.local", cfg.local), ("peft.frozen", cfg.frozen)):
        missing = [w for w in wanted if w not in have]
        if missing:
            raise ConfigError(key, f"peft.method={cfg.method} has no part {', '.join(missing)}; its parts: "
                                   f"{', '.join(have) or 'none'}")
    if cfg.frozen:
        for name, p in model.named_parameters():
            if parts.get(name) in cfg.frozen:
                p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("peft.frozen", f"{cfg.frozen!r} freezes everything peft.method={cfg.method} trains; "
                                         "leave at least one part trainable")
    sent = [n for n, p in model.named_parameters() if p.requires_grad and parts.get(n) not in cfg.local]
    if not sent:
        raise ConfigError("peft.local", f"{cfg.local!r} keeps every trained part of peft.method={cfg.method} "
                                        "local: nothing would be federated; leave at least one part shared")


@dataclass(frozen=True)
class StateParts:
    """Names of the sent (global), local (per client) and frozen tensors of a built model."""

    sent: tuple[str, ...]
    local: tuple[str, ...]
    frozen: tuple[str, ...]

    @property
    def split(self) -> bool:
        """Some part is kept per client or frozen: the state is not simply 'everything trainable is sent'."""
        return bool(self.local or self.frozen)


def state_parts(model: nn.Module, cfg: PeftConfig) -> StateParts:
    """Split ``model``'s tensors (after ``apply_peft``) by ``cfg.local`` / ``cfg.frozen`` (sorted names)."""
    heads = head_names(model)
    sent, local, frozen = [], [], []
    for name, p in sorted(model.named_parameters()):
        part = part_of(name, cfg.method, heads)
        if p.requires_grad:
            (local if part in cfg.local else sent).append(name)
        elif part is not None and part in cfg.frozen:
            frozen.append(name)
    return StateParts(tuple(sent), tuple(local), tuple(frozen))


def select(tensors: Mapping, names) -> dict:
    """``{name: tensors[name]}`` for ``names``, in that order."""
    return {n: tensors[n] for n in names}


def split_counts(model: nn.Module, cfg: PeftConfig) -> dict[str, int]:
    """Parameters sent, kept local and frozen, and the bytes of one transfer (the sent tensors only)."""
    parts = state_parts(model, cfg)
    named = dict(model.named_parameters())
    return {"sent_params": sum(named[n].numel() for n in parts.sent),
            "local_params": sum(named[n].numel() for n in parts.local),
            "frozen_params": sum(named[n].numel() for n in parts.frozen),
            "bytes_per_transfer": sum(named[n].numel() * named[n].element_size() for n in parts.sent),
            "tensors_per_transfer": len(parts.sent)}
