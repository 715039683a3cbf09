"""The frozen timm backbone: creation, offline weights, a new head, input normalisation."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from fedpeft_hpc.config.schema import ModelConfig
from fedpeft_hpc.data.transforms import ImageSpec
from fedpeft_hpc.errors import CheckpointError, ConfigError
from fedpeft_hpc.utils.files import expand_path
from fedpeft_hpc.utils.hints import did_you_mean

log = logging.getLogger(__name__)


def _create(cfg: ModelConfig) -> nn.Module:
    import timm

    if not timm.is_model(cfg.name):
        hint = did_you_mean(cfg.name, timm.list_models(), 3)
        raise ConfigError("model.name", f"{cfg.name!r} is not a timm model.{hint}")
    kwargs = dict(cfg.kwargs)
    if cfg.img_size is not None:
        kwargs["img_size"] = cfg.img_size  # ViTs build their patch grid for it
    use_timm_weights = cfg.pretrained and not cfg.checkpoint
    try:
        try:
            return timm.create_model(cfg.name, pretrained=use_timm_weights, num_classes=cfg.num_classes, **kwargs)
        except TypeError as e:
            if "img_size" not in str(e) or "img_size" in cfg.kwargs:
                raise
            # CNNs take any input size and have no img_size argument: model.img_size is then only the
            # resolution the data is brought to (image_spec)
            kwargs.pop("img_size")
            return timm.create_model(cfg.name, pretrained=use_timm_weights, num_classes=cfg.num_classes, **kwargs)
    except TypeError as e:
        raise ConfigError("model.kwargs", f"timm.create_model({cfg.name!r}) rejected an argument: {e}") from None
    except (OSError, RuntimeError, ValueError) as e:
        if use_timm_weights:
            raise CheckpointError(
                f"model.pretrained=true: could not get {cfg.name} weights from timm's source ({e}). On nodes "
                "without internet, download them elsewhere and set model.checkpoint=PATH") from None
        raise ConfigError("model.kwargs", f"timm.create_model({cfg.name!r}) failed: {e}") from None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"model.checkpoint={path}: no state dict inside")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_backbone_weights(model: nn.Module, path: Path) -> None:
    """Load a local weights file; the classifier head is never taken from it (a new head is trained)."""
    if not path.is_file():
        raise CheckpointError(f"model.checkpoint={path} does not exist (a local weights file: .safetensors, "
                              ".pth/.bin, or a JAX .npz)")
    if path.suffix == ".npz":
        if not hasattr(model, "load_pretrained"):
            raise CheckpointError(f"model.checkpoint={path}: .npz weights need a timm ViT")
        num_classes = model.num_classes
        model.load_pretrained(str(path))
        model.reset_classifier(num_classes)
        return
    try:
        state = _read_state_dict(path)
    except CheckpointError:
        raise
    except Exception as e:  # unreadable file of any kind
        raise CheckpointError(f"model.checkpoint={path} cannot be read: {e}") from None
    module = __import__(type(model).__module__, fromlist=["checkpoint_filter_fn"])
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as e:
            raise CheckpointError(f"model.checkpoint={path} does not fit {type(model).__name__}: {e}") from None
    head_names = {n for n, _ in model.get_classifier().named_parameters(prefix=_head_prefix(model))}
    state = {k: v for k, v in state.items() if k not in head_names}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"model.checkpoint={path} does not fit model.name: {e}") from None
    missing = [k for k in missing if k not in head_names]
    if missing or unexpected:
        raise CheckpointError(f"model.checkpoint={path} does not fit the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")


def _head_prefix(model: nn.Module) -> str:
    head = model.get_classifier()
    for name, mod in model.named_modules():
        if mod is head:
            return name
    raise CheckpointError("model has no classifier head")  # pragma: no cover


def build_backbone(cfg: ModelConfig, seed: int, load_weights: bool = True) -> nn.Module:
    """Create the model with a new ``num_classes`` head, initialised from ``seed`` alone.

    The same seed gives the same head on every rank; weights come from ``model.checkpoint``
    (offline) or timm's source when ``model.pretrained`` and no checkpoint is given.
    """
    if load_weights and cfg.checkpoint and not cfg.pretrained:
        log.warning("model.checkpoint=%s is ignored because model.pretrained=false", cfg.checkpoint)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _create(cfg if load_weights else _without_weights(cfg))
        if load_weights and cfg.pretrained and cfg.checkpoint:
            load_backbone_weights(model, expand_path(cfg.checkpoint))
    return model


def _without_weights(cfg: ModelConfig) -> ModelConfig:
    return replace(cfg, pretrained=False, checkpoint=None)


def image_spec(model: nn.Module, img_size: int | None = None) -> ImageSpec:
    """Input size and normalisation the model expects (in21k ViTs: mean = std = 0.5).

    The size is the patch grid's for a ViT, else ``img_size`` (``model.img_size``) when given,
    else timm's default for the model.
    """
    from timm.data import resolve_data_config

    dc = resolve_data_config({}, model=model)
    in_chans, h, _ = dc["input_size"]
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None):
        h = pe.img_size[0]
    elif img_size is not None:
        h = img_size
    return ImageSpec(img_size=int(h), in_chans=int(in_chans), mean=tuple(dc["mean"]), std=tuple(dc["std"]))
