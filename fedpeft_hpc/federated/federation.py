"""What a run is made of, built before anything is written: the model with its weights, the data,
the partition, the cohort schedule and the privacy calibration (``build_federation``). The
engine trains it; the preflight of ``submit``/``sweep`` builds it on the login node to check a
config fully."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedpeft_hpc.config.schema import Config
from fedpeft_hpc.data import DataBundle, build_datasets, make_partition
from fedpeft_hpc.data.partition import hold_out
from fedpeft_hpc.errors import ConfigError
from fedpeft_hpc.federated.sampling import Schedule, cohort_sampling
from fedpeft_hpc.models import BuiltModel, build_model
from fedpeft_hpc.peft import count_params
from fedpeft_hpc.peft.parts import split_counts
from fedpeft_hpc.peft.ranks import assign_ranks
from fedpeft_hpc.privacy import PrivacyMechanism, build_privacy


@dataclass
class Federation:
    """Everything a run is made of, built (and every user input checked) before a file is written."""

    built: BuiltModel
    counts: dict  # total/trainable parameters, bytes per transfer
    data: DataBundle
    client_indices: list[np.ndarray]  # training-set indices of each client
    sizes: np.ndarray  # samples per client
    schedule: Schedule
    privacy: PrivacyMechanism
    client_test_indices: list[np.ndarray] | None = None  # each client's held-out samples (client_test_fraction)
    lora_ranks: np.ndarray | None = None  # each client's LoRA rank (peft.lora_ranks)


def build_federation(cfg: Config, device: torch.device, built: BuiltModel | None = None,
                     data: DataBundle | None = None) -> Federation:
    """Model (weights loaded), data, partition, schedule and privacy calibration; writes nothing.

    ``built`` and ``data`` may be given when already built for this config (the preflight of a
    sweep builds each distinct model and dataset once); they are not modified.
    """
    built = built if built is not None else build_model(cfg.model, cfg.peft, cfg.seed)
    data = data if data is not None else build_datasets(cfg.data, built.image, cfg.seed)
    if data.num_classes > cfg.model.num_classes:
        raise ConfigError("model.num_classes", f"{cfg.model.num_classes} is fewer than the "
                                               f"{data.num_classes} classes of data.name={cfg.data.name}")
    client_indices, client_test = client_split(cfg, data)
    sizes = np.array([len(p) for p in client_indices], dtype=np.int64)
    schedule = Schedule(cfg.seed, cfg.fed.num_clients, cfg.fed.clients_per_round, cfg.fed.dropout,
                        cohort_sampling(cfg.fed.sampling, cfg.privacy.mode))
    privacy = build_privacy(cfg, client_sizes=sizes, schedule=schedule, device=device)
    counts = {**count_params(built.model), **split_counts(built.model, cfg.peft)}
    ranks = assign_ranks(cfg.peft.lora_ranks, cfg.fed.num_clients, cfg.seed) if cfg.peft.lora_ranks else None
    return Federation(built=built, counts=counts, data=data, client_indices=client_indices, sizes=sizes,
                      schedule=schedule, privacy=privacy, client_test_indices=client_test, lora_ranks=ranks)


def client_split(cfg: Config, data: DataBundle) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Each client's training indices and (``data.client_test_fraction`` > 0) its held-out ones."""
    parts = make_partition(cfg.data, data.train_targets, cfg.fed.num_clients, cfg.seed)
    if cfg.data.client_test_fraction <= 0:
        return parts, None
    return hold_out(parts, cfg.data.client_test_fraction, cfg.seed)
