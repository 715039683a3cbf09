"""Splitting training indices over clients: IID, Dirichlet label skew, or a saved partition file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft_hpc.config.schema import DataConfig
from fedpeft_hpc.errors import ConfigError, DataError
from fedpeft_hpc.utils.files import atomic_write_text
from fedpeft_hpc.utils.streams import CLIENT_TEST, PARTITION_DIRICHLET, PARTITION_IID, rng

MAX_DIRICHLET_TRIES = 1000


def _check_clients(num_samples: int, num_clients: int) -> None:
    if num_clients > num_samples:
        raise ConfigError("fed.num_clients", f"{num_clients} clients but only {num_samples} training samples; "
                          f"use at most {num_samples} clients")


def partition_iid(num_samples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Random permutation cut into ``num_clients`` near-equal sorted parts."""
    _check_clients(num_samples, num_clients)
    perm = rng(seed, PARTITION_IID).permutation(num_samples)
    return [np.sort(p).astype(np.int64) for p in np.array_split(perm, num_clients)]


def partition_dirichlet(targets: np.ndarray, num_clients: int, alpha: float, min_samples: int,
                        seed: int) -> list[np.ndarray]:
    """Per-class Dirichlet(alpha) label skew with balancing; redrawn until each client has ``min_samples``."""
    targets = np.asarray(targets)
    n = len(targets)
    _check_clients(n, num_clients)
    if num_clients * min_samples > n:
        raise ConfigError("data.min_samples", f"{num_clients} clients x {min_samples} samples exceeds the "
                          f"{n} training samples; use data.min_samples <= {n // num_clients}")
    draw = rng(seed, PARTITION_DIRICHLET)
    classes = [np.flatnonzero(targets == k) for k in np.unique(targets)]
    cap = n / num_clients
    for _ in range(MAX_DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for idx_k in classes:
            idx_k = draw.permutation(idx_k)
            p = draw.dirichlet(np.full(num_clients, alpha))
            p = p * (sizes < cap)
            if p.sum() <= 0:  # all mass underflowed onto full clients: spread over the others
                p = (sizes < cap).astype(np.float64)
            p = p / p.sum()
            cuts = (np.cumsum(p) * len(idx_k)).astype(np.int64)[:-1]
            for c, chunk in enumerate(np.split(idx_k, cuts)):
                parts[c].append(chunk)
                sizes[c] += len(chunk)
        if sizes.min() >= min_samples:
            return [np.sort(np.concatenate(ch)).astype(np.int64) for ch in parts]
    raise ConfigError("data.min_samples", f"no Dirichlet draw in {MAX_DIRICHLET_TRIES} tries gave every one of "
                      f"{num_clients} clients >= {min_samples} samples with data.alpha={alpha}; "
                      f"lower data.min_samples or raise data.alpha")


def make_partition(cfg: DataConfig, targets: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """Client index lists from ``cfg.partition_file`` if set, else drawn per ``cfg.partition``."""
    n = len(targets)
    if cfg.partition_file:
        parts = load_partition(cfg.partition_file)
        _validate(parts, n, num_clients, cfg.partition_file)
        return parts
    if cfg.partition == "iid":
        return partition_iid(n, num_clients, seed)
    if cfg.partition == "dirichlet":
        return partition_dirichlet(targets, num_clients, cfg.alpha, cfg.min_samples, seed)
    raise ConfigError("data.partition", f"unknown partition {cfg.partition!r}; valid: iid, dirichlet")


def _validate(parts: list[np.ndarray], n: int, num_clients: int, path: str | os.PathLike) -> None:
    where = f"data.partition_file={str(path)!r}"
    if len(parts) != num_clients:
        raise DataError(f"{where} holds {len(parts)} clients but fed.num_clients={num_clients}; "
                        f"set fed.num_clients={len(parts)} or draw a new partition")
    allidx = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if len(allidx) and (allidx.min() < 0 or allidx.max() >= n):
        raise DataError(f"{where} has indices outside [0, {n}) for a training set of {n} samples; "
                        f"it was made for another dataset or data.max_train_samples")
    empty = [k for k, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise DataError(f"{where}: client(s) {', '.join(map(str, empty[:8]))} hold no samples; every client "
                        "needs at least one (drop them and lower fed.num_clients, or draw a new partition)")
    if len(np.unique(allidx)) != len(allidx):
        raise DataError(f"{where}: some indices are assigned more than once; each sample may belong "
                        f"to one client only")


def hold_out(parts: list[np.ndarray], fraction: float, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split each client's indices into (training, held-out test): ``round(fraction * n)`` samples drawn
    from ``(seed, CLIENT_TEST, client)``, at most ``n - 1`` (a client keeps one sample to train on)."""
    train, test = [], []
    for client, p in enumerate(parts):
        n_test = min(len(p) - 1, int(round(fraction * len(p)))) if fraction > 0 else 0
        chosen = np.zeros(len(p), dtype=bool)
        if n_test > 0:
            chosen[rng(seed, CLIENT_TEST, client).permutation(len(p))[:n_test]] = True
        train.append(p[~chosen])
        test.append(p[chosen])
    return train, test


def save_partition(path: str | os.PathLike, parts: list[np.ndarray], meta: dict[str, Any],
                   extra: dict[str, Any] | None = None) -> None:
    """Write ``{"num_clients", "meta", "clients", **extra}`` JSON atomically (``extra``: e.g. each client's
    held-out samples, ``client_test``, and LoRA rank, ``lora_rank``)."""
    doc = {"num_clients": len(parts), "meta": meta, "clients": [[int(i) for i in p] for p in parts],
           **(extra or {})}
    atomic_write_text(Path(path), json.dumps(doc, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def load_partition(path: str | os.PathLike) -> list[np.ndarray]:
    """Read a partition written by ``save_partition``; DataError naming the file when malformed."""
    where = f"data.partition_file={str(path)!r}"
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{where} does not exist; give an existing partition.json or unset it") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{where} is not readable JSON ({e})") from None
    clients = doc.get("clients") if isinstance(doc, dict) else None
    if not isinstance(clients, list) or not all(isinstance(c, list) for c in clients):
        raise DataError(f"{where} needs a JSON object with \"clients\": a list of index lists per client")
    if not all(isinstance(i, int) and not isinstance(i, bool) for c in clients for i in c):
        raise DataError(f"{where}: client index lists must hold integers only")
    if "num_clients" in doc and doc["num_clients"] != len(clients):
        raise DataError(f"{where} says num_clients={doc['num_clients']} but lists {len(clients)} clients")
    return [np.sort(np.asarray(c, dtype=np.int64)) for c in clients]


def partition_stats(parts: list[np.ndarray], targets: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Client sizes and per-client class histograms (plain lists, for logs/JSON)."""
    targets = np.asarray(targets)
    return {"sizes": [int(len(p)) for p in parts],
            "class_hist": [np.bincount(targets[p], minlength=num_classes).tolist() for p in parts]}
