"""How much memory a block of work takes at its peak, and how much the device has free.

CUDA: the caching allocator's own peak counters (``max_memory_allocated``) and
``mem_get_info``. CPU: the process's resident set, whose high-water mark Linux lets a
process reset (``/proc/self/clear_refs``, "5", since Linux 4.0), so a block's own peak can
be read from ``VmHWM`` afterwards; available RAM is ``MemAvailable`` from ``/proc/meminfo``,
or less where the process's cgroup (SLURM ``--mem``, a container) has a memory limit: its
limit minus its usage (reclaimable page cache not counted as used), the tightest of the
cgroup and its ancestors, cgroup v2 or v1.
Client batching's ``auto`` sizes K from these; ``fedpeft-hpc bench`` reports them.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
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


def synchronize(device: torch.device | str) -> None:
    """Wait until ``device`` has finished its queued work (CUDA runs asynchronously; CPU: nothing to do),
    before a clock or a memory counter is read."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def available_bytes(device: torch.device | str, fs_root: str | Path = "/") -> Optional[int]:
    """Memory this process could still use on ``device`` (CUDA: free + cached by us; CPU: MemAvailable, or
    its cgroup's room where that is less). ``fs_root``: where ``/proc`` and ``/sys`` are (tests)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    root = Path(fs_root)
    host = _meminfo_available(root)
    cgroup = cgroup_available(root)
    if host is None or cgroup is None:
        return cgroup if host is None else host
    return min(host, cgroup)


def _meminfo_available(root: Path) -> Optional[int]:
    try:
        m = re.search(r"^MemAvailable:\s+(\d+)\s+kB", (root / "proc/meminfo").read_text(), re.MULTILINE)
        if m:
            return int(m.group(1)) * 1024
    except OSError:
        pass
    if root != Path("/"):
        return None
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


# (mount below sys/fs/cgroup, limit file, usage file, memory.stat key of reclaimable page cache)
_CGROUP_V2 = ("", "memory.max", "memory.current", "inactive_file")
_CGROUP_V1 = ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1


def cgroup_available(fs_root: str | Path = "/") -> Optional[int]:
    """Room left under the memory limits of this process's cgroup and its ancestors (limit - usage, inactive
    page cache counted as free), the tightest of them; ``None`` where no limit is set or none can be read."""
    root = Path(fs_root)
    paths = {"": [], "memory": []}  # v2 ("0::/path") and v1 ("N:...,memory,...:/path") cgroup of this process
    try:
        for line in (root / "proc/self/cgroup").read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3 and parts[0] == "0" and parts[1] == "":
                paths[""].append(parts[2])
            elif len(parts) == 3 and "memory" in parts[1].split(","):
                paths["memory"].append(parts[2])
    except OSError:
        pass
    best = None
    for mount, limit_name, usage_name, cache_key in (_CGROUP_V2, _CGROUP_V1):
        base = root / "sys/fs/cgroup" / mount
        dirs = []
        for rel in paths[mount]:  # the process's cgroup and its ancestors (where this mount shows them)
            d = base / rel.strip("/")
            while d != base and base in d.parents:
                dirs.append(d)
                d = d.parent
        dirs.append(base)  # in a container (cgroup namespace) the process's cgroup is the mount's root
        for d in dict.fromkeys(dirs):
            room = _cgroup_room(d, limit_name, usage_name, cache_key)
            if room is not None:
                best = room if best is None else min(best, room)
    return best


def _cgroup_room(d: Path, limit_name: str, usage_name: str, cache_key: str) -> Optional[int]:
    try:
        limit = (d / limit_name).read_text().strip()
        usage = int((d / usage_name).read_text().strip())
    except (OSError, ValueError):
        return None
    if limit == "max" or not limit.isdigit() or int(limit) >= _UNLIMITED:
        return None
    cache = 0
    try:
        m = re.search(rf"^{cache_key} (\d+)$", (d / "memory.stat").read_text(), re.MULTILINE)
        cache = int(m.group(1)) if m else 0
    except OSError:
        pass
    return max(0, int(limit) - max(0, usage - cache))
