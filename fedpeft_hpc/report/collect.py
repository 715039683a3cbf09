"""Which runs a report covers, and what each one is: a sweep, a single run, or a folder of runs.

- a sweep directory (``sweep.json``): every run the manifest lists, including those that have not
  started and those an earlier version of the sweep file had (``in_sweep: false``), so nothing
  silently drops out of a table; settings are the sweep's swept keys;
- a run directory (``config.yaml``): that run alone;
- a folder of run directories (e.g. ``runs/quickstart``): its runs; the settings are the config
  keys whose values differ between them (other than the seed and ``run.*``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fedpeft_hpc.config.load import dotted
from fedpeft_hpc.errors import UserError
from fedpeft_hpc.launchers.jobstate import JobRef
from fedpeft_hpc.launchers.manifest import MANIFEST, read_manifest
from fedpeft_hpc.launchers.runstate import RunStatus, run_status
from fedpeft_hpc.utils.files import read_jsonl


@dataclass
class RunRecord:
    name: str
    setting: dict  # swept key -> value
    setting_name: str
    seed: int | None
    dir: Path
    status: RunStatus
    rounds: int | None  # rounds the run is configured for
    metrics: list[dict] = field(default_factory=list)
    in_sweep: bool = True  # False: listed in sweep.json from an earlier version of the sweep file

    @property
    def finished(self) -> bool:
        return self.status.state == "finished"


@dataclass
class Collection:
    title: str
    swept: list[str]  # setting keys, in order
    short: dict[str, str]  # swept key -> column name
    runs: list[RunRecord]

    def label(self, rec: RunRecord) -> str:
        """A setting as the plots' legends show it: ``method=bias, lr=0.05``."""
        if not rec.setting:
            return rec.setting_name
        return ", ".join(f"{self.short.get(k, k)}={value_text(v)}" for k, v in rec.setting.items())

    def settings(self) -> dict[str, list[RunRecord]]:
        """setting name -> its runs (one per seed), in first-seen order."""
        out: dict[str, list[RunRecord]] = {}
        for r in self.runs:
            out.setdefault(r.setting_name, []).append(r)
        return out


def value_text(v, sep: str = "+") -> str:
    """A swept value as text: lists joined with ``sep``, ``None`` as ``null``."""
    if isinstance(v, (list, tuple)):
        return sep.join(str(x) for x in v)
    return "null" if v is None else str(v)


def _load_yaml(path: Path) -> dict:
    import yaml

    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _record(name: str, setting: dict, setting_name: str, seed, run_dir: Path, job: JobRef | None,
            rounds: int | None, in_sweep: bool = True) -> RunRecord:
    rows = read_jsonl(run_dir / "metrics.jsonl")
    status = run_status(run_dir, job, rows)
    if rounds is None:
        rounds = dotted(_load_yaml(run_dir / "config.yaml")).get("fed.rounds")
    return RunRecord(name, setting, setting_name, seed, run_dir, status, rounds, rows, in_sweep)


def collect(path: Path) -> Collection:
    path = Path(path)
    if (path / MANIFEST).is_file():
        return _from_sweep(path)
    if (path / "config.yaml").is_file():
        cfg = dotted(_load_yaml(path / "config.yaml"))
        rec = _record(path.name, {}, path.name, cfg.get("seed"), path, None, cfg.get("fed.rounds"))
        return Collection(path.name, [], {}, [rec])
    children = sorted(p for p in path.iterdir() if (p / "config.yaml").is_file()) if path.is_dir() else []
    if not children:
        raise UserError(f"{path} is not a sweep directory (sweep.json), a run directory (config.yaml) or a "
                        "folder of run directories")
    return _from_folder(path, children)


def _from_sweep(path: Path) -> Collection:
    m = read_manifest(path)
    swept = list(m.get("swept", []))
    short = dict(m.get("short_names", {})) or {k: k for k in swept}
    runs = []
    for name, entry in m.get("runs", {}).items():
        runs.append(_record(name, dict(entry.get("setting", {})), entry.get("setting_name", name),
                            entry.get("seed"), path / entry.get("dir", name), JobRef.from_dict(entry.get("job")),
                            entry.get("rounds"), entry.get("in_sweep") is not False))
    return Collection(str(m.get("name") or path.name), swept, short, runs)


def _from_folder(path: Path, children: list[Path]) -> Collection:
    from fedpeft_hpc.launchers.sweep_spec import short_names, value_token

    configs = {c: dotted(_load_yaml(c / "config.yaml")) for c in children}
    keys = sorted(set().union(*configs.values()))
    swept = [k for k in keys if k != "seed" and not k.startswith("run.")
             and len({json.dumps(cfg.get(k), sort_keys=True, default=str) for cfg in configs.values()}) > 1]
    short = short_names(swept)
    runs = []
    for c, cfg in configs.items():
        setting = {k: cfg.get(k) for k in swept}
        setting_name = "_".join(f"{short[k]}={value_token(v)}" for k, v in setting.items()) or path.name
        runs.append(_record(c.name, setting, setting_name, cfg.get("seed"), c, None, cfg.get("fed.rounds")))
    return Collection(path.name, swept, short, runs)
