"""``fedpeft_hpc.load_run(DIR)``: open a finished (or interrupted) run for evaluation and deployment."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

from torch import nn

from fedpeft_hpc.config.load import load_config
from fedpeft_hpc.config.schema import Config
from fedpeft_hpc.data import build_datasets
from fedpeft_hpc.errors import UserError
from fedpeft_hpc.models import BuiltModel, build_model
from fedpeft_hpc.peft.state import load_peft_state, peft_params
from fedpeft_hpc.runs.checkpoint import load_checkpoint
from fedpeft_hpc.utils.files import read_jsonl


class LoadedRun:
    """A run directory: ``config``, ``model`` (backbone + latest global PEFT state, eval, CPU),
    ``test_dataset()``, ``summary`` and ``metrics``."""

    def __init__(self, path: Path, config: Config):
        self.path = path
        self.config = config

    @cached_property
    def _built(self) -> tuple[BuiltModel, int]:
        cfg = self.config
        built = build_model(cfg.model, cfg.peft, cfg.seed)
        ckpt = load_checkpoint(self.path / "checkpoints" / "latest.safetensors")
        try:
            load_peft_state(peft_params(built.model), ckpt.peft)
        except ValueError as e:
            raise UserError(f"{self.path}: checkpoint does not fit peft.method={cfg.peft.method}: {e}") from None
        built.model.eval()
        return built, ckpt.round

    @property
    def model(self) -> nn.Module:
        return self._built[0].model

    @property
    def round(self) -> int:
        """The round whose global state ``model`` carries."""
        return self._built[1]

    def test_dataset(self):
        return build_datasets(self.config.data, self._built[0].image, self.config.seed).test

    @property
    def summary(self) -> dict | None:
        p = self.path / "summary.json"
        return json.loads(p.read_text()) if p.is_file() else None

    @property
    def metrics(self) -> list[dict]:
        return read_jsonl(self.path / "metrics.jsonl")


def load_run(path: str | Path) -> LoadedRun:
    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise UserError(f"{path} is not a run directory (no config.yaml)")
    if not (path / "checkpoints" / "latest.safetensors").is_file():
        raise UserError(f"{path} has no checkpoints/latest.safetensors yet")
    return LoadedRun(path, load_config(path / "config.yaml"))
