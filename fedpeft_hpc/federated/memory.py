"""How much memory a block of work takes at its peak, and how much the device has free.

CUDA: the caching allocator's own peak counters (``max_memory_allocated``) and
``mem_get_info``. CPU: the process's resident set, whose high-water mark Linux lets a
process reset (``/proc/self/clear_refs``, "5", since Linux 4.0), so a block's own peak can
be read from ``VmHWM`` afterwards; available RAM is ``MemAvailable`` from ``/proc/meminfo``.
Client batching's ``auto`` sizes K from these; ``fedpeft-hpc bench`` reports them.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from typing import Iterator, Optional

import torch


@dataclass
class Peak:
    """Filled in when the ``peak_memory`` block ends: bytes above the level at its start (None: not measurable)."""

    bytes: Optional[int] = None


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def rss_bytes() -> Optional[int]:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> Optional[int]:
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Reset this process's resident high-water mark to its current RSS; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def peak_memory(device: torch.device | str) -> Iterator[Peak]:
    """Measure the peak memory the enclosed block adds on ``device``."""
    device = torch.device(device)
    out = Peak()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out.bytes = int(torch.cuda.max_memory_allocated(device) - base)
        return
    base = rss_bytes()
    ok = base is not None and reset_peak_rss()
    yield out
    peak = peak_rss_bytes()
    if ok and peak is not None:
        out.bytes = max(0, peak - base)


def available_bytes(device: torch.device | str) -> Optional[int]:
    """Memory this process could still use on ``device`` (CUDA: free + cached by us; CPU: MemAvailable)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"^MemAvailable:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
        if m:
            return int(m.group(1)) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None
