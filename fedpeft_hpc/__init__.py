"""fedpeft-hpc: federated parameter-efficient fine-tuning of pre-trained ViTs at HPC scale.

Importing the package does nothing but define names; heavy modules load on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__", "load_run"]


def __getattr__(name: str):
    if name == "load_run":
        from fedpeft_hpc.runs.load import load_run

        return load_run
    raise AttributeError(f"module 'fedpeft_hpc' has no attribute {name!r}")
