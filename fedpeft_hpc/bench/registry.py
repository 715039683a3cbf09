"""The row builders of ``fedpeft-hpc bench``, in the order they run.

A measurement is a function ``fn(ctx: BenchContext) -> list[Row]`` registered with
``@register_measurement(name, suites=...)`` in one of the modules of ``MODULES``. To add a
row family (e.g. the data path's), write a module with a registered function and add the
module to ``MODULES``; nothing else changes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

MODULES = [
    "fedpeft_hpc.bench.clients",  # 1. batched vs sequential clients (and DP-SGD, full suite); 2. the bound
    "fedpeft_hpc.bench.rounds",  # 3. FL efficiency; 4. aggregation share; 7. PEFT vs full fine-tuning
    "fedpeft_hpc.bench.memory",  # 5. memory per hosted client
    "fedpeft_hpc.bench.ranks",  # 6. two ranks vs one
    "fedpeft_hpc.bench.data_path",  # the data path: its share of a round, image folder vs tensors, workers
]

SUITES = ("quick", "full")


@dataclass
class Row:
    """One line of the table: a ratio measured in this run, its target and the absolute numbers behind it."""

    measurement: str
    setting: str
    value: Optional[float]
    target: Optional[str] = None  # e.g. ">= 0.9"
    met: Optional[bool] = None
    detail: str = ""
    key: Optional[str] = None  # the CONTRACT key this row answers (``bench --json``)
    extra: dict = field(default_factory=dict)  # absolute numbers for --json (images/s, bytes, ...)


@dataclass
class Measurement:
    name: str
    fn: Callable
    suites: tuple
    devices: tuple


_REGISTRY: dict[str, Measurement] = {}


def register_measurement(name: str, suites: tuple = SUITES, devices: tuple = ("cpu", "cuda")):
    """Decorator: ``fn(ctx) -> list[Row]`` runs in ``suites`` on ``devices``."""

    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY and _REGISTRY[name].fn.__qualname__ != fn.__qualname__:
            raise ValueError(f"bench measurement {name!r} registered twice")
        _REGISTRY[name] = Measurement(name, fn, tuple(suites), tuple(devices))
        return fn

    return deco


def measurements(suite: str, device: str) -> list[Measurement]:
    """The registered measurements of ``suite`` on ``device``, in ``MODULES`` order."""
    for mod in MODULES:
        importlib.import_module(mod)
    order = {mod: i for i, mod in enumerate(MODULES)}  # not import order: a test may import a module first
    chosen = [m for m in _REGISTRY.values() if suite in m.suites and device in m.devices]
    return sorted(chosen, key=lambda m: order.get(m.fn.__module__, len(order)))


def at_least(value: Optional[float], target: float) -> Optional[bool]:
    return None if value is None else bool(value >= target)


def at_most(value: Optional[float], target: float) -> Optional[bool]:
    return None if value is None else bool(value <= target)
