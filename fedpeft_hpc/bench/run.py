"""``fedpeft-hpc bench``: run the suite's measurements behind a progress bar and report them."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from fedpeft_hpc.errors import ConfigError

log = logging.getLogger(__name__)


RESULTS = "bench.md"  # the results file under --out


def run_bench(suite: str = "quick", device: str = "cpu", as_json: bool = False,
              markdown: Optional[str] = None, out: Optional[str] = "runs/bench",
              profile_ops: bool = False, only: Optional[list[str]] = None, threads: int = 0,
              command: str = "fedpeft-hpc bench", knobs: Optional[dict] = None) -> int:
    """``out``: the directory whose ``bench.md`` gets the rows (None: none); ``markdown``: also append them to
    this table (e.g. the repository's BENCHMARKS.md), only when asked."""
    from tqdm import tqdm

    from fedpeft_hpc.bench import report
    from fedpeft_hpc.bench.context import PROFILES, BenchContext, with_knobs
    from fedpeft_hpc.bench.registry import measurements

    dev = _device(device)
    with_knobs(PROFILES[(dev.type, suite)], **(knobs or {}))  # bad knobs: exit 2 before anything runs
    if threads < 0:
        raise ConfigError("--threads", f"must be >= 0, got {threads}")
    torch.set_num_threads(threads or idle_cores())
    todo = measurements(suite, dev.type)
    if only:
        unknown = sorted(set(only) - {m.name for m in todo})
        if unknown:
            raise ConfigError("--only", f"{', '.join(unknown)}: not a measurement of this suite; valid: "
                                        f"{', '.join(m.name for m in todo)}")
        todo = [m for m in todo if m.name in only]
    meta = {"suite": suite, "device": str(dev), "date": report.now(),
            "machine": report.machine(dev, torch.get_num_threads()),
            "versions": report.versions(), "command": command,
            "threads": torch.get_num_threads()}
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedpeft-bench-") as tmp:
        bar = tqdm(total=len(todo), desc=f"bench {suite} ({dev.type})", unit="measurement", file=sys.stderr,
                   dynamic_ncols=True)
        ctx = BenchContext(suite, dev, Path(tmp), status=bar.set_postfix_str, profile_ops=profile_ops, knobs=knobs)
        try:
            for m in todo:
                bar.set_description(f"bench: {m.name}")
                rows += m.fn(ctx)
                bar.update(1)
        finally:
            bar.close()
    text = report.table(rows)
    print(text, file=sys.stderr if as_json else sys.stdout)
    for prof in ctx.profiles:
        print(prof, file=sys.stderr)
    for path in ([Path(out) / RESULTS] if out else []) + ([Path(markdown)] if markdown else []):
        path.parent.mkdir(parents=True, exist_ok=True)
        report.append_markdown(path, rows, meta)
        print(f"rows appended to {path}", file=sys.stderr)
    if as_json:
        print(json.dumps(report.as_json(rows, meta)))
    return 0


def idle_cores() -> int:
    """The cores not busy with other work: all of them minus the 1-minute load average, at least 1.

    More threads than free cores make OpenMP's workers wait on each other (a 2-thread run on
    2 cores shared with 2 busy processes measured 3x slower than 1 thread).
    """
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return cores
    return max(1, min(cores, cores - int(round(load))))


def _device(name: str) -> torch.device:
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device", "cuda was asked for but torch sees no CUDA GPU; use --device cpu")
        return torch.device("cuda", torch.cuda.current_device())
    if name != "cpu":
        raise ConfigError("--device", f"{name!r}: cpu or cuda")
    return torch.device("cpu")
