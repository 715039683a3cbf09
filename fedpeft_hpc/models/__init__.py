"""The backbone (timm, offline weights) and the model a client trains: backbone + PEFT."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedpeft_hpc.config.schema import ModelConfig, PeftConfig
from fedpeft_hpc.data.transforms import ImageSpec
from fedpeft_hpc.errors import ConfigError
from fedpeft_hpc.models.backbone import build_backbone, image_spec
from fedpeft_hpc.models.pretrain import ensure_pretrained
from fedpeft_hpc.peft import apply_peft, param_bytes


@dataclass
class BuiltModel:
    """A backbone with its PEFT method applied, and what the rest of a run needs to know of it."""

    model: nn.Module
    image: ImageSpec  # input size and normalisation the backbone expects
    full_bytes_per_transfer: int  # what full fine-tuning of the backbone exchanges (before PEFT modules)


def build_model(model_cfg: ModelConfig, peft_cfg: PeftConfig, seed: int, load_weights: bool = True) -> BuiltModel:
    """Backbone with a new head plus the PEFT method, every init drawn from ``seed`` alone.

    With ``load_weights`` false nothing is read or fetched (``inspect``). A missing
    ``model.checkpoint`` with a ``model.pretrain_recipe`` is built first.
    """
    if load_weights:
        ensure_pretrained(model_cfg)
    model: nn.Module = build_backbone(model_cfg, seed, load_weights=load_weights)
    full_bytes = param_bytes(model.parameters())  # every parameter: what full fine-tuning sends
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        try:
            apply_peft(model, peft_cfg)
        except ValueError as e:
            raise ConfigError("peft.method", str(e)) from None
    return BuiltModel(model=model, image=image_spec(model, model_cfg.img_size), full_bytes_per_transfer=full_bytes)


__all__ = ["BuiltModel", "build_model", "build_backbone", "image_spec", "ensure_pretrained"]
