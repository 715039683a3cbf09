"""Where the rows of a run go: one sink interface, one class per destination.

The engine builds one metrics row per round and hands it to ``MetricsSinks``, which fans it
out: ``metrics.jsonl`` always (the CONTRACT's per-round record), TensorBoard scalars when
``run.tensorboard`` is on (optional extra: ``pip install 'fedpeft-hpc[tensorboard]'``). Only
rank 0 writes; the other ranks get no sinks at all.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable

from fedpeft_hpc.errors import ConfigError
from fedpeft_hpc.utils.files import append_line


class MetricsSink(ABC):
    @abstractmethod
    def write(self, row: dict) -> None:
        """Record one round's row (``row["round"]`` is its step)."""

    def close(self) -> None:
        """Flush and release whatever the sink holds."""


class JsonlSink(MetricsSink):
    """``metrics.jsonl``: one JSON object per line, appended and fsync'd row by row."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def write(self, row: dict) -> None:
        append_line(self.path, json.dumps(row))


class TensorBoardSink(MetricsSink):
    """Every finite numeric field of a row as a scalar ``fedpeft/<field>`` at step ``round``."""

    SKIP = ("round",)

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("run.tensorboard", "needs the tensorboard package: pip install tensorboard "
                                                 "(or the extra fedpeft-hpc[tensorboard]), or set "
                                                 "run.tensorboard=false") from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, row: dict) -> None:
        step = int(row["round"])
        for key, value in row.items():
            if key in self.SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(f"fedpeft/{key}", value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MetricsSinks(MetricsSink):
    """Fan-out to several sinks (none on ranks other than 0)."""

    def __init__(self, sinks: Iterable[MetricsSink] = ()):
        self.sinks = list(sinks)

    def write(self, row: dict) -> None:
        for s in self.sinks:
            s.write(row)

    def close(self) -> None:
        for s in self.sinks:
            s.close()
