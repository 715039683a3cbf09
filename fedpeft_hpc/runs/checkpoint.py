"""Checkpoints of the global state in safetensors (never pickle).

Tensors: ``peft/<param name>`` (the global PEFT state, loadable into the model after
``apply_peft``) and ``server/<slot>`` (server optimizer state, flat). Metadata (strings):
``format``, ``round``, and JSON blobs ``state`` (ledger, best accuracy, privacy state,
server steps) so a run resumes exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedpeft_hpc.errors import CheckpointError
from fedpeft_hpc.utils.files import atomic_write

FORMAT = "fedpeft-hpc/1"


@dataclass
class Checkpoint:
    round: int
    peft: dict[str, torch.Tensor]
    server: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict = field(default_factory=dict)


def save_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    from safetensors.torch import save_file

    tensors = {f"peft/{k}": v.detach().to("cpu").contiguous() for k, v in ckpt.peft.items()}
    tensors.update({f"server/{k}": v.detach().to("cpu").contiguous() for k, v in ckpt.server.items()})
    meta = {"format": FORMAT, "round": str(ckpt.round), "state": json.dumps(ckpt.state)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_checkpoint(path: Path) -> Checkpoint:
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}  # never alias the mapped file
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read as safetensors: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a fedpeft-hpc checkpoint (format {meta.get('format')!r})")
    peft = {k[len("peft/"):]: v for k, v in tensors.items() if k.startswith("peft/")}
    server = {k[len("server/"):]: v for k, v in tensors.items() if k.startswith("server/")}
    return Checkpoint(round=int(meta["round"]), peft=peft, server=server, state=json.loads(meta.get("state", "{}")))


def checkpoint_round(path: Path) -> int:
    """The round a checkpoint was saved after, from its metadata alone (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return int((f.metadata() or {})["round"])
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read as safetensors: {e}") from None
