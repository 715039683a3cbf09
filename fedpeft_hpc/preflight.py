"""Checks of a config against what it names, without training and without writing anything.

``check_names`` asks the registries (PEFT methods, datasets) about the names a config uses;
it is cheap and runs for every command that takes a config. Deeper checks (weights, data
files, privacy calibration) build the parts of a run: ``federated.engine.build_federation``.
"""

from __future__ import annotations

from fedpeft_hpc.config.schema import Config
from fedpeft_hpc.data import DATASETS, get_builder
from fedpeft_hpc.peft import get_method, registered_methods


def check_names(cfg: Config) -> Config:
    """``cfg`` if every registry name in it exists; a ``ConfigError`` naming the key otherwise."""
    get_method(cfg.peft.method)
    get_builder(cfg.data.name)
    return cfg


def registry_choices() -> dict[str, list[str]]:
    """Allowed values of the keys whose names live in registries (for ``config keys``)."""
    return {"peft.method": registered_methods(), "data.name": sorted(DATASETS)}
