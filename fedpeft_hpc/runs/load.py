"""``fedpeft_hpc.load_run(DIR)``: open a finished (or interrupted) run for evaluation and deployment."""

from __future__ import annotations

import json
import copy
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from fedpeft_hpc.config.load import load_config
from fedpeft_hpc.config.schema import Config
from fedpeft_hpc.data import build_datasets, make_partition
from fedpeft_hpc.data.partition import hold_out
from fedpeft_hpc.errors import UserError
from fedpeft_hpc.models import BuiltModel, build_model
from fedpeft_hpc.peft.lora import set_active_rank
from fedpeft_hpc.peft.parts import state_parts
from fedpeft_hpc.peft.ranks import assign_ranks, truncate_
from fedpeft_hpc.peft.state import load_peft_state, peft_params
from fedpeft_hpc.runs.checkpoint import load_checkpoint
from fedpeft_hpc.runs.client_state import ClientStateStore
from fedpeft_hpc.utils.files import read_jsonl


class LoadedRun:
    """A run directory: ``config``, ``model`` (backbone + latest global PEFT state, eval, CPU),
    ``test_dataset()``, ``summary`` and ``metrics``; ``client_model(c)`` and ``client_test_dataset(c)``
    for a client's personalized model and its held-out samples.

    With ``peft.local`` parts, ``model`` holds them at their seeded initialisation (what a client that
    never trained has): the global model is the shared state alone, and its accuracy is ``final_acc``."""

    def __init__(self, path: Path, config: Config):
        self.path = path
        self.config = config

    @cached_property
    def _built(self) -> tuple[BuiltModel, int]:
        cfg = self.config
        built = build_model(cfg.model, cfg.peft, cfg.seed)
        ckpt = load_checkpoint(self.path / "checkpoints" / "latest.safetensors")
        parts = state_parts(built.model, cfg.peft)
        sent = {n: p for n, p in peft_params(built.model).items() if n in parts.sent}
        try:
            load_peft_state(sent, ckpt.peft)
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

    def client_model(self, client: int) -> nn.Module:
        """Client ``client``'s personalized model (a new module, eval, CPU): the global state of
        ``checkpoints/latest.safetensors``, the client's local parts as of that round (``client_state/``) and,
        with ``peft.lora_ranks``, its rank (its own truncation of the global LoRA state)."""
        cfg = self.config
        if not 0 <= client < cfg.fed.num_clients:
            raise UserError(f"client {client} outside 0..{cfg.fed.num_clients - 1} (fed.num_clients)")
        model = copy.deepcopy(self.model)
        params = dict(model.named_parameters())
        parts = state_parts(model, cfg.peft)
        if parts.local:
            init = {n: params[n].detach() for n in parts.local}
            store = ClientStateStore(self.path / "client_state", init, cfg.fed.num_clients, read_only=True,
                                     upto_round=self.round)
            try:
                with torch.no_grad():
                    for n, v in store.get(client).items():
                        params[n].copy_(v)
            finally:
                store.close()
        if cfg.peft.lora_ranks:
            rank = int(assign_ranks(cfg.peft.lora_ranks, cfg.fed.num_clients, cfg.seed)[client])
            set_active_rank(model, rank)
            truncate_({n: params[n] for n in parts.sent}, rank)
        return model.eval()

    def client_test_dataset(self, client: int):
        """Client ``client``'s held-out samples (``data.client_test_fraction``), as ``test_dataset()`` yields them."""
        cfg = self.config
        if cfg.data.client_test_fraction <= 0:
            raise UserError(f"{self.path}: data.client_test_fraction is 0, clients hold no samples out")
        data = build_datasets(cfg.data, self._built[0].image, cfg.seed)
        parts = make_partition(cfg.data, data.train_targets, cfg.fed.num_clients, cfg.seed)
        _, test = hold_out(parts, cfg.data.client_test_fraction, cfg.seed)
        return Subset(data.train, np.asarray(test[client]).tolist())

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
