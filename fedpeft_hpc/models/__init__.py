"""The backbone (timm, offline weights) and the model a client trains: backbone + PEFT."""

from __future__ import annotations

import torch
from torch import nn

from fedpeft_hpc.config.schema import ModelConfig, PeftConfig


def build_model(model_cfg: ModelConfig, peft_cfg: PeftConfig, seed: int, load_weights: bool = True):
    """Backbone with a new head plus the PEFT method, every init drawn from ``seed`` alone.

    Returns ``(model, image_spec)``. With ``load_weights`` false nothing is read or fetched
    (``inspect``). A missing ``model.checkpoint`` with a ``model.pretrain_recipe`` is built first.
    """
    from fedpeft_hpc.models.backbone import build_backbone, image_spec
    from fedpeft_hpc.peft import apply_peft

    if load_weights:
        from fedpeft_hpc.models.pretrain import ensure_pretrained

        ensure_pretrained(model_cfg)
    model: nn.Module = build_backbone(model_cfg, seed, load_weights=load_weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        try:
            apply_peft(model, peft_cfg)
        except ValueError as e:
            from fedpeft_hpc.errors import ConfigError

            raise ConfigError("peft.method", str(e)) from None
    return model, image_spec(model)
