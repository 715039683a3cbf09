"""Logging set-up for entry points (the CLI, a submitit job). Library code only calls
``logging.getLogger(__name__)``: it never installs handlers or changes levels of its own.

``setup_logging`` configures the root logger once for the process (rank 0 at the chosen level,
other ranks at WARNING, lines prefixed with the rank when there are several). ``log_to_file``
adds a file handler for a run directory (``train.log``) and returns a function that removes it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_NAME = "fedpeft-hpc-console"


def _formatter(rank: int | None, datefmt: str) -> logging.Formatter:
    prefix = f"[rank {rank}] " if rank is not None else ""
    return logging.Formatter(prefix + FORMAT, datefmt)


class _ConsoleHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (not the stream of set-up time:
    a test harness or a notebook may swap and close it in between)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property decides
        pass


def setup_logging(level: str = "info", rank: int = 0, world_size: int = 1) -> None:
    """Console logging to stderr: ``level`` on rank 0, warnings and errors on the other ranks.

    Replaces only the handler this function installed before, never the caller's own.
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        if h.get_name() == _HANDLER_NAME:
            root.removeHandler(h)
    handler = _ConsoleHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(_formatter(rank if world_size > 1 else None, "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()) if rank == 0 else logging.WARNING)


class _RunLogHandler(logging.FileHandler):
    """A file handler that opens (and, if needed, makes the folder of) its file at the first record:
    ranks other than 0 may log before rank 0 has made the run directory, or never log at all."""

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def log_to_file(path: Path, rank: int = 0, world_size: int = 1) -> Callable[[], None]:
    """Append this process's log records to ``path`` (with dates) until the returned function runs.

    Rank 0 writes what it logs at the root level; other ranks' records reach their file only at
    WARNING and above (the root level on those ranks).
    """
    handler = _RunLogHandler(path, mode="a", encoding="utf-8", delay=True)
    handler.setFormatter(_formatter(rank if world_size > 1 else None, "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.addHandler(handler)

    def remove() -> None:
        root.removeHandler(handler)
        handler.close()

    return remove
