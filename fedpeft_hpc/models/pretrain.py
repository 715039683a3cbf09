"""Built-in pre-training recipes for offline machines (no hub is reachable).

``digits``: trains the configured ViT on the ``pretrain`` split of sklearn's digits,
which is disjoint from the split the federated clients and the test set use. The result
is an ordinary weights file at ``model.checkpoint``; a later run finds it and skips this.
Concurrent processes (torchrun ranks) build it once, under a file lock.
"""

from __future__ import annotations

import fcntl
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from fedpeft_hpc.config.schema import ModelConfig
from fedpeft_hpc.models.backbone import build_backbone, image_spec
from fedpeft_hpc.data import digits_splits
from fedpeft_hpc.data.transforms import tensor_to_spec
from fedpeft_hpc.utils.files import atomic_write, expand_path
from fedpeft_hpc.utils.streams import FIXED_SPLIT_SEED

log = logging.getLogger(__name__)

RECIPES: dict[str, Callable[[ModelConfig, Path], dict]] = {}
RECIPE_SEED = FIXED_SPLIT_SEED  # the pre-trained backbone is a fixed artifact, independent of the run's seed


def register_recipe(name: str):
    def deco(fn):
        RECIPES[name] = fn
        return fn

    return deco


def ensure_pretrained(cfg: ModelConfig, force: bool = False) -> Path | None:
    """Build ``model.checkpoint`` with ``model.pretrain_recipe`` if it does not exist yet."""
    if cfg.pretrain_recipe is None or not cfg.pretrained or not cfg.checkpoint:
        return None
    path = expand_path(cfg.checkpoint)
    if path.is_file() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file() and not force:
            return path
        t0 = time.perf_counter()
        info = RECIPES[cfg.pretrain_recipe](cfg, path)
        log.info("pre-trained %s with recipe %s in %.1f s (%s) -> %s", cfg.name, cfg.pretrain_recipe,
                 time.perf_counter() - t0, ", ".join(f"{k}={v}" for k, v in info.items()), path)
    return path


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (zero fill), one shift per sample."""
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    return torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


@register_recipe("digits")
def pretrain_digits(cfg: ModelConfig, path: Path, epochs: int = 60, batch_size: int = 64,
                    lr: float = 2e-3) -> dict:
    from safetensors.torch import save_file

    images, labels = digits_splits()["pretrain"]
    base = replace(cfg, pretrained=False, checkpoint=None, pretrain_recipe=None, num_classes=10)
    model = build_backbone(base, RECIPE_SEED, load_weights=False)
    spec = image_spec(model)
    x8 = torch.as_tensor(images, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.int64)
    gen = torch.Generator().manual_seed(RECIPE_SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * ((len(y) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    correct = seen = 0
    for epoch in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch_size):
            idx = perm[i:i + batch_size]
            xb = tensor_to_spec(_shift(x8[idx], gen), spec)
            out = model(xb)
            loss = F.cross_entropy(out, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if epoch == epochs - 1:
                correct += int((out.argmax(1) == y[idx]).sum())
                seen += len(idx)
    info = {"epochs": epochs, "samples": len(y), "last_epoch_train_acc": round(correct / seen, 4)}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"recipe": "digits", "model": cfg.name, "kwargs": repr(sorted(cfg.kwargs.items())),
            **{k: str(v) for k, v in info.items()}}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))
    return info
