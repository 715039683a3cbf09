"""The bench's outputs: a table, one JSON object (CONTRACT keys), rows appended to BENCHMARKS.md."""

from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path
from typing import Optional

from fedpeft_hpc.bench.registry import Row

CONTRACT_KEYS = ("batched_speedup", "batching_bound", "fl_efficiency", "aggregation_share",
                 "memory_per_client_ratio", "two_rank_speedup", "ops_per_step", "host_syncs_per_step")

MD_HEADER = """# Benchmarks

Rows appended by `fedpeft-hpc bench` (newest last). Every value is a ratio of two measurements
taken in the same run on the same machine; `target` is the goal of issue 8, `met` whether this
run reached it. `load` is the 1-minute load average when the run started (other processes
share the cores of a busy machine and slow the timings down).

| date (UTC) | machine | versions | command | measurement | setting | value | target | met | detail |
|---|---|---|---|---|---|---|---|---|---|
"""


def machine(device, threads: int | None = None) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores"
    if getattr(device, "type", device) == "cuda":
        import torch

        text = f"{torch.cuda.get_device_name(device)}; {text}"
    try:
        load = os.getloadavg()[0]
        text += f", load {load:.2f}"
    except OSError:
        pass
    if threads:
        text += f", {threads} thread{'s' if threads > 1 else ''}"
    return text


def versions() -> str:
    import opacus
    import timm
    import torch

    from fedpeft_hpc import __version__

    return (f"fedpeft-hpc {__version__}, torch {torch.__version__}, timm {timm.__version__}, "
            f"opacus {opacus.__version__}, python {platform.python_version()}")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M")


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"


def _met(m: Optional[bool]) -> str:
    return "-" if m is None else ("yes" if m else "NO")


def table(rows: list[Row]) -> str:
    head = ("measurement", "setting", "value", "target", "met", "detail")
    cells = [(r.measurement, r.setting, _fmt(r.value), r.target or "-", _met(r.met), r.detail) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(head)]
    line = lambda c: "  ".join(str(x).ljust(w) for x, w in zip(c, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def as_json(rows: list[Row], meta: dict) -> dict:
    out = dict(meta)
    for key in CONTRACT_KEYS:
        out[key] = next((r.value for r in rows if r.key == key), None)
    out["targets_met"] = {f"{r.measurement} [{r.setting}]": r.met for r in rows if r.met is not None}
    out["rows"] = [{"measurement": r.measurement, "setting": r.setting, "value": r.value, "target": r.target,
                    "met": r.met, "detail": r.detail, **({"key": r.key} if r.key else {}), **r.extra} for r in rows]
    return out


def append_markdown(path: Path, rows: list[Row], meta: dict) -> None:
    """Append one line per row (with machine, versions, date and command) to the BENCHMARKS.md table."""
    path = Path(path)
    text = path.read_text() if path.exists() else MD_HEADER
    if not text.endswith("\n"):
        text += "\n"
    cell = lambda s: str(s).replace("|", "/").replace("\n", " ")  # noqa: E731
    for r in rows:
        text += ("| " + " | ".join(cell(c) for c in (meta["date"], meta["machine"], meta["versions"],
                                                     f"`{meta['command']}`", r.measurement, r.setting, _fmt(r.value),
                                                     r.target or "-", _met(r.met), r.detail)) + " |\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
