"""Which runs a report covers, and what each one is: a sweep, a single run, or a folder of runs.

- a sweep directory (``sweep.json``): every run the manifest lists, including those that have not
  started and those an earlier version of the sweep file had (``in_sweep: false``), so nothing
  silently drops out of a table; settings are the sweep's swept keys;
- a run directory (``config.yaml``): that run alone;
- a folder of run directories (e.g. ``runs/quickstart``): its runs; the settings are the config
  keys whose values differ between them (other than the seed and ``run.*``).

Runs are grouped by what they compute (``runs/identity``: the setting's config without the seed, its
weights and data), never by name alone: runs of one setting name with another ``fed.rounds`` (or
other weights) are separate groups. The scheduler is asked once for all of them (``JobStates``);
a run's job is the one its lease names, else the one ``sweep.json`` recorded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fedpeft_hpc.config.load import dotted
from fedpeft_hpc.errors import UserError
from fedpeft_hpc.launchers.jobstate import JobRef, JobStates
from fedpeft_hpc.launchers.manifest import MANIFEST, read_manifest
from fedpeft_hpc.launchers.runstate import RunStatus, run_status
from fedpeft_hpc.runs.identity import Identity, saved_identity
from fedpeft_hpc.runs.lease import read_lease
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
    job: JobRef | None = None  # the job that runs (or last ran) it
    group: str = ""  # what the run computes without its seed: runs of one group are averaged
    identity: Identity | None = None  # of the run in its directory (None: not started)

    @property
    def last_acc(self) -> float | None:
        """The latest evaluated test accuracy."""
        for row in reversed(self.metrics):
            if isinstance(row.get("test_acc"), (int, float)):
                return float(row["test_acc"])
        return None

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
        """group -> its runs (one per seed: the same computation otherwise), in first-seen order. A run
        recorded before identities were (no weights or data fingerprint) joins the group of its config."""
        out: dict[str, list[RunRecord]] = {}
        for r in self.runs:
            key = next((k for k, recs in out.items() if _same_setting(r, recs[0])), None)
            if key is None:  # a new setting (its key unique even where two settings share a config file's text)
                key = r.group or r.setting_name
                key = key if key not in out else f"{key}#{len(out)}"
            out.setdefault(key, []).append(r)
        return out


def _same_setting(a: RunRecord, b: RunRecord) -> bool:
    if a.setting != b.setting:  # other swept values: never one setting
        return False
    if a.identity is not None and b.identity is not None:
        return a.identity.same_setting(b.identity)
    if a.group and b.group and a.group == b.group:  # sweep.json's setting id of a run not started yet
        return True
    return a.setting_name == b.setting_name and a.rounds == b.rounds  # nothing better known


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


@dataclass
class _Found:
    """A run before its state is known (the scheduler is asked once, for all of them)."""

    name: str
    setting: dict
    setting_name: str
    seed: object
    dir: Path
    job: JobRef | None
    rounds: int | None
    in_sweep: bool = True
    group: str | None = None  # from sweep.json, for runs that have not started


def _job_of(run_dir: Path, recorded: JobRef | None) -> JobRef | None:
    lease = read_lease(run_dir)
    if lease and lease.get("job"):
        return JobRef(str(lease.get("executor") or "slurm"), str(lease["job"]), str(lease.get("folder") or ""))
    return recorded


def _records(found: list[_Found]) -> list[RunRecord]:
    jobs = {f.name: _job_of(f.dir, f.job) for f in found}
    states = JobStates(jobs.values(), accounting=True)  # one squeue (and one sacct) for every run
    out = []
    for f in found:
        rows = read_jsonl(f.dir / "metrics.jsonl")
        status = run_status(f.dir, jobs[f.name], rows, jobs=states)
        rounds = f.rounds if f.rounds is not None else dotted(_load_yaml(f.dir / "config.yaml")).get("fed.rounds")
        ident = saved_identity(f.dir)
        group = ident.setting_id if ident is not None else (f.group or f.setting_name)
        out.append(RunRecord(f.name, f.setting, f.setting_name, f.seed, f.dir, status, rounds, rows, f.in_sweep,
                             jobs[f.name], group, ident))
    return out


def collect(path: Path) -> Collection:
    path = Path(path)
    if (path / MANIFEST).is_file():
        return _from_sweep(path)
    if (path / "config.yaml").is_file() or (path / "lease.json").is_file():
        cfg = dotted(_load_yaml(path / "config.yaml"))
        found = _Found(path.name, {}, path.name, cfg.get("seed"), path, None, cfg.get("fed.rounds"))
        return Collection(path.name, [], {}, _records([found]))
    children = sorted(p for p in path.iterdir() if (p / "config.yaml").is_file() or (p / "lease.json").is_file()) \
        if path.is_dir() else []
    if not children:
        raise UserError(f"{path} is not a sweep directory (sweep.json), a run directory (config.yaml) or a "
                        "folder of run directories")
    return _from_folder(path, children)


def _from_sweep(path: Path) -> Collection:
    m = read_manifest(path)
    swept = list(m.get("swept", []))
    short = dict(m.get("short_names", {})) or {k: k for k in swept}
    found = [_Found(name, dict(entry.get("setting", {})), entry.get("setting_name", name), entry.get("seed"),
                    path / entry.get("dir", name), JobRef.from_dict(entry.get("job")), entry.get("rounds"),
                    entry.get("in_sweep") is not False, entry.get("setting_id"))
             for name, entry in m.get("runs", {}).items()]
    return Collection(str(m.get("name") or path.name), swept, short, _records(found))


def _from_folder(path: Path, children: list[Path]) -> Collection:
    from fedpeft_hpc.launchers.sweep_spec import short_names, value_token

    configs = {c: dotted(_load_yaml(c / "config.yaml")) for c in children}
    keys = sorted(set().union(*configs.values()))
    swept = [k for k in keys if k != "seed" and not k.startswith("run.")
             and len({json.dumps(cfg.get(k), sort_keys=True, default=str) for cfg in configs.values()}) > 1]
    short = short_names(swept)
    found = []
    for c, cfg in configs.items():
        setting = {k: cfg.get(k) for k in swept}
        setting_name = "_".join(f"{short[k]}={value_token(v)}" for k, v in setting.items()) or path.name
        found.append(_Found(c.name, setting, setting_name, cfg.get("seed"), c, None, cfg.get("fed.rounds")))
    return Collection(path.name, swept, short, _records(found))
