"""``fedpeft_hpc.load_run(DIR)``: open a finished (or interrupted) run for evaluation and deployment."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from fedpeft_hpc.config.schema import Config
from fedpeft_hpc.errors import UserError
from fedpeft_hpc.runs.files import read_jsonl


class Run:
    """A run directory: ``config``, ``model`` (backbone + latest global PEFT state, eval, CPU),
    ``test_dataset()``, ``summary`` and ``metrics``."""

    def __init__(self, path: Path, config: Config):
        self.path = path
        self.config = config

    @cached_property
    def _built(self):
        from fedpeft_hpc.federated.client import load_flat
        from fedpeft_hpc.federated.flat import FlatLayout
        from fedpeft_hpc.models import build_model
        from fedpeft_hpc.peft import peft_params
        from fedpeft_hpc.runs.checkpoint import load_checkpoint

        cfg = self.config
        model, spec = build_model(cfg.model, cfg.peft, cfg.seed)
        ckpt = load_checkpoint(self.path / "checkpoints" / "latest.safetensors")
        params = peft_params(model)
        if set(params) != set(ckpt.peft):
            raise UserError(f"{self.path}: checkpoint tensors do not match peft.method={cfg.peft.method}")
        layout = FlatLayout(params)
        load_flat(params, layout, layout.flatten(ckpt.peft, torch.float32))
        model.eval()
        return model, spec, ckpt.round

    @property
    def model(self) -> nn.Module:
        return self._built[0]

    @property
    def round(self) -> int:
        """The round whose global state ``model`` carries."""
        return self._built[2]

    def test_dataset(self):
        from fedpeft_hpc.data import build_datasets

        return build_datasets(self.config.data, self._built[1], self.config.seed).test

    @property
    def summary(self) -> dict | None:
        import json

        p = self.path / "summary.json"
        return json.loads(p.read_text()) if p.is_file() else None

    @property
    def metrics(self) -> list[dict]:
        return read_jsonl(self.path / "metrics.jsonl")


def load_run(path: str | Path) -> Run:
    from fedpeft_hpc.config import load_config

    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise UserError(f"{path} is not a run directory (no config.yaml)")
    if not (path / "checkpoints" / "latest.safetensors").is_file():
        raise UserError(f"{path} has no checkpoints/latest.safetensors yet")
    return Run(path, load_config(path / "config.yaml"))
