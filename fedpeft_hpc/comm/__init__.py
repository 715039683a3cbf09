"""Process world, rendezvous, runtime and counted collectives.

Importing this package loads nothing heavy: names resolve on first use (``detect_world`` does
not import torch or mpi4py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["WorldInfo", "detect_world", "ensure_rendezvous", "Runtime", "Communicator", "LocalCommunicator",
           "CollectiveError", "CollectiveRecord"]

_WHERE = {
    "WorldInfo": "fedpeft_hpc.comm.world",
    "detect_world": "fedpeft_hpc.comm.world",
    "ensure_rendezvous": "fedpeft_hpc.comm.rendezvous",
    "Runtime": "fedpeft_hpc.comm.runtime",
    "Communicator": "fedpeft_hpc.comm.collective",
    "LocalCommunicator": "fedpeft_hpc.comm.collective",
    "CollectiveError": "fedpeft_hpc.comm.collective",
    "CollectiveRecord": "fedpeft_hpc.comm.collective",
}

if TYPE_CHECKING:  # pragma: no cover
    from fedpeft_hpc.comm.collective import CollectiveError, CollectiveRecord, Communicator, LocalCommunicator
    from fedpeft_hpc.comm.rendezvous import ensure_rendezvous
    from fedpeft_hpc.comm.runtime import Runtime
    from fedpeft_hpc.comm.world import WorldInfo, detect_world


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'fedpeft_hpc.comm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
