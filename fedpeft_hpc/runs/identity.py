"""A run known by what it computes: its resolved config, its weights and its data.

A run's identity is a hash of its fully resolved config without the keys that do not change
what it computes (``run.*``: its directory, progress bar, threads, checkpointing; ``comm.*``;
per-node paths and resources, which are fingerprinted or irrelevant instead), plus the
fingerprint of its weights file (``model.checkpoint``, by content) and of its data (its labels and
split sizes: ``federated.agreement.labels_fingerprint``, the part of the fingerprint the ranks agree
on that reads no image, so a login node computes it too). Its *setting* is the same
without the seed: the report averages the runs of one setting, never runs that differ in anything
else (``fed.rounds`` included).

The training writes ``identity.json`` into its run directory (rank 0, at its start); a sweep
computes the same from its preflight, so a finished run is found whatever its directory's name,
and a run of other weights or data is never taken for it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from fedpeft_hpc.config.load import dotted, load_config, to_dict
from fedpeft_hpc.config.schema import Config
from fedpeft_hpc.errors import UserError
from fedpeft_hpc.utils.files import atomic_write_json, expand_path

IDENTITY = "identity.json"
# keys that never change what a run computes (paths are fingerprinted by content instead)
NOT_IDENTITY = ("run.", "comm.", "data.num_workers", "data.root", "data.cache_dir", "data.gpu_store_mb",
                "data.download", "model.checkpoint")


@dataclass(frozen=True)
class Identity:
    config: str  # hash of the resolved config without NOT_IDENTITY keys
    setting: str  # the same without the seed
    weights: str | None  # content hash of model.checkpoint (None: no weights file)
    data: str | None  # data fingerprint (None: not known yet)

    @property
    def run_id(self) -> str:
        return _digest([self.config, self.weights, self.data])

    @property
    def setting_id(self) -> str:
        return _digest([self.setting, self.weights, self.data])

    def as_dict(self) -> dict:
        return {**asdict(self), "id": self.run_id, "setting_id": self.setting_id}

    def same_setting(self, other: "Identity") -> bool:
        """One setting (averaged over seeds): same config but the seed, weights and data (unknowns match)."""
        return self.setting == other.setting and not [d for d in self.differs_in(other) if d != "config"]

    def differs_in(self, other: "Identity") -> list[str]:
        """What makes two runs different computations: ``config``, ``weights``, ``data`` (unknowns match)."""
        out = [] if self.config == other.config else ["config"]
        for name in ("weights", "data"):
            a, b = getattr(self, name), getattr(other, name)
            if a is not None and b is not None and a != b:
                out.append(name)
        return out


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _keys(cfg: Config) -> dict:
    return {k: v for k, v in dotted(to_dict(cfg)).items() if not k.startswith(NOT_IDENTITY)}


def file_fingerprint(path: str | None) -> str | None:
    """Content hash of a weights file; ``None`` without one (or not there yet: a recipe builds it)."""
    if not path:
        return None
    p = expand_path(path)
    if not p.is_file():
        return None
    h = hashlib.blake2b(digest_size=8)
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def identity_of(cfg: Config, data_fingerprint: int | str | None, weights: str | None = None) -> Identity:
    """``cfg``'s identity; ``weights``: its weights file's fingerprint if already known."""
    keys = _keys(cfg)
    if weights is None and cfg.model.pretrained:  # without pretrained weights model.checkpoint is not read
        weights = file_fingerprint(cfg.model.checkpoint)
    data = None if data_fingerprint is None else (f"{data_fingerprint:016x}" if isinstance(data_fingerprint, int)
                                                   else str(data_fingerprint))
    return Identity(config=_digest(keys), setting=_digest({k: v for k, v in keys.items() if k != "seed"}),
                    weights=weights,
                    data=data)


def write_identity(run_dir: Path, ident: Identity) -> None:
    atomic_write_json(Path(run_dir) / IDENTITY, ident.as_dict())


def saved_identity(run_dir: Path) -> Identity | None:
    """The identity of the run in ``run_dir``: ``identity.json``, else (a run from before identities were
    recorded) its ``config.yaml`` without weights and data; ``None`` without either."""
    try:
        d = json.loads((Path(run_dir) / IDENTITY).read_text())
        return Identity(str(d["config"]), str(d["setting"]), d.get("weights"), d.get("data"))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    cfg_path = Path(run_dir) / "config.yaml"
    if not cfg_path.is_file():
        return None
    try:
        cfg = load_config(cfg_path)
    except UserError:
        return None  # a config this version cannot read is nobody's identity
    keys = _keys(cfg)
    return Identity(_digest(keys), _digest({k: v for k, v in keys.items() if k != "seed"}), None, None)
