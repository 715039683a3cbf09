"""``DIR/sweep.json``, the manifest of a sweep directory: run name -> overrides, state, job id, log.

Written by ``fedpeft-hpc sweep`` (``launchers.sweep``), read by it and by ``fedpeft-hpc report``;
reading it needs nothing heavy (no torch), so a report on a sweep directory starts fast.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedpeft_hpc.errors import UserError

MANIFEST = "sweep.json"
FORMAT = "fedpeft-hpc-sweep/1"
# a damaged manifest is repaired, not moved aside: a run's state lives in its directory and its lease
REPAIR = "repair it (JSON); every run's directory and lease still say what it is doing"


def read_manifest(out: Path) -> dict:
    p = out / MANIFEST
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{p} cannot be read ({e}); {REPAIR}") from None
    if not isinstance(data, dict):
        raise UserError(f"{p} is not a fedpeft-hpc sweep manifest (a JSON object is expected, it holds a "
                        f"{type(data).__name__}); {REPAIR}")
    if data.get("format") != FORMAT:
        raise UserError(f"{p} is not a fedpeft-hpc sweep manifest (format {data.get('format')!r})")
    runs = data.get("runs", {})
    if not isinstance(runs, dict) or not all(isinstance(e, dict) for e in runs.values()):
        raise UserError(f"{p}: \"runs\" must map each run name to an object; {REPAIR}")
    for key, kind in (("swept", list), ("short_names", dict)):
        if key in data and not isinstance(data[key], kind):
            raise UserError(f"{p}: \"{key}\" must be a JSON {'array' if kind is list else 'object'}")
    return data
