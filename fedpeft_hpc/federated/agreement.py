"""Ranks agree before they train, and a resume continues the run it claims to continue.

Every rank builds its model, data, partition and resume point on its own (from its own files:
nodes may not share a file system, may see different ``data.root`` or weight files, or a
per-node pre-training cache). ``fingerprints`` reduces what must be identical to a few 63-bit
hashes; ``check_agreement`` gathers every rank's hashes with one all-reduce and stops every
rank with one message naming what differs and where. Checkpoints keep the weight and data
fingerprints so that a resume with other weights or other data is refused by name.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from fedpeft_hpc.comm.collective import Communicator
from fedpeft_hpc.config.load import dotted, to_dict
from fedpeft_hpc.config.schema import Config
from fedpeft_hpc.errors import ConfigError, RanksDisagree

# keys that may differ between the ranks of one job (paths seen per node, per-node resources)
PER_NODE_KEYS = ("data.root", "data.num_workers", "model.checkpoint", "run.threads", "run.progress",
                 "run.log_level")

WHAT = {  # name -> (what it covers, what usually causes a mismatch)
    "config": ("the resolved config", "the ranks were started with different configs or overrides"),
    "start_round": ("the round to start from", "run.dir is not the same shared directory on every node"),
    "rerun_rounds": ("how many released rounds the resume runs again",
                     "run.dir is not the same shared directory on every node"),
    "global_state": ("the global PEFT state", "run.dir is not the same shared directory on every node"),
    "partition": ("the client partition", "data.partition_file or the training data differ between nodes"),
    "backbone": ("the frozen backbone weights", "model.checkpoint points to different weights on different "
                                                "nodes (or a per-node pre-training cache)"),
    "data": ("the dataset", "data.root holds different data on different nodes"),
}


def _hash(chunks: Iterable[bytes]) -> int:
    h = hashlib.blake2b(digest_size=8)
    for c in chunks:
        h.update(len(c).to_bytes(8, "little"))
        h.update(c)
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def backbone_fingerprint(model: nn.Module) -> int:
    """Every frozen parameter and every buffer (running statistics included), by name."""
    chunks = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            chunks += [name.encode(), _tensor_bytes(p)]
    for name, b in model.named_buffers():
        chunks += [name.encode(), _tensor_bytes(b)]
    return _hash(chunks)


def _label_chunks(train_targets: np.ndarray, n_train: int, n_test: int) -> list[bytes]:
    return [np.asarray(train_targets, dtype=np.int64).tobytes(), str((n_train, n_test)).encode()]


def labels_fingerprint(train_targets: np.ndarray, n_train: int, n_test: int) -> int:
    """Training labels and both splits' sizes: the part of ``data_fingerprint`` that reads no image (a run's
    identity, ``runs/identity``, computed on a login node too)."""
    return _hash(_label_chunks(train_targets, n_train, n_test))


def data_fingerprint(train_targets: np.ndarray, train, test) -> int:
    """Labels and sizes of both splits, plus the first and last training and the first test image."""
    chunks = _label_chunks(train_targets, len(train), len(test))
    for ds, i in ((train, 0), (train, len(train) - 1), (test, 0)):
        if len(ds):
            x, y = ds[i]
            chunks += [_tensor_bytes(torch.as_tensor(x)), str(int(y)).encode()]
    return _hash(chunks)


def config_fingerprint(cfg: Config) -> int:
    flat = {k: v for k, v in dotted(to_dict(cfg)).items() if k not in PER_NODE_KEYS}
    return _hash([repr(sorted(flat.items())).encode()])


def partition_fingerprint(client_indices: list[np.ndarray]) -> int:
    return _hash(np.asarray(p, dtype=np.int64).tobytes() for p in client_indices)


def state_fingerprint(vec: torch.Tensor) -> int:
    return _hash([_tensor_bytes(vec)])


def check_agreement(comm: Communicator, fingerprints: Mapping[str, int]) -> None:
    """One all-reduce of every rank's fingerprints; ``RanksDisagree`` on every rank if any differ."""
    if comm.world_size <= 1:
        return
    names = list(fingerprints)
    table = torch.zeros(comm.world_size, len(names), dtype=torch.int64, device=comm.device)
    table[comm.rank] = torch.tensor([int(fingerprints[n]) for n in names], dtype=torch.int64)
    comm.allreduce_sum_(table, tag="agreement")
    table = table.cpu()
    for j, name in enumerate(names):
        differ = [r for r in range(comm.world_size) if table[r, j] != table[0, j]]
        if differ:
            covers, cause = WHAT.get(name, (name, ""))
            raise RanksDisagree(f"ranks disagree on {covers} ({name}): rank(s) {', '.join(map(str, differ))} differ "
                            f"from rank 0 (fingerprints {int(table[differ[0], j]):016x} vs {int(table[0, j]):016x}). "
                            f"Likely cause: {cause}. Nothing was trained.")


def check_resume(saved: Mapping[str, str], current: Mapping[str, int]) -> None:
    """Refuse a resume whose weights or data are not those the checkpoint was trained with."""
    keys = {"backbone": "model.checkpoint", "data": "data.root"}
    for name, key in keys.items():
        if name in saved and int(saved[name], 16) != int(current[name]):
            covers, _ = WHAT[name]
            raise ConfigError(key, f"{covers} differ from those the checkpoint in run.dir was trained with "
                                   f"(fingerprint {int(current[name]):016x}, checkpoint {saved[name]}); resume "
                                   "with the same weights and data, or start a new run.dir")
