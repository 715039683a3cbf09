"""The sweep file and its expansion into runs with deterministic, readable, collision-free names.

    base: ../quickstart.yaml        # a config file, relative to this file (or absolute)
    name: methods                   # optional; default: this file's name without .yaml
    grid:                           # cartesian product, in file order
      data.alpha: [0.1, 0.5]
    zip:                            # varied together: all lists of one length
      peft.method: [bias, lora]
      optim.lr: [0.05, 0.02]
    overrides: {fed.rounds: 5}      # every run
    seeds: [42, 3407]               # default: the base config's seed

Runs: every grid combination x every zip row x every seed (seeds innermost). Keys are dotted
config keys; a nested mapping under a config section (``fed: {rounds: 5}``) means the same as
its dotted keys. Values are read as their config key declares them (``1`` and ``1.0`` of a float
key are one value). A run's name is its *varying* keys (those with more than one value; a
one-value axis is an override like any other), sorted, by short name (the shortest dotted suffix
that no other varying key shares: ``optim.lr`` -> ``lr``) with their values, then the seed:
``alpha=0.1_lr=0.05_method=bias_seed=42``; reordering the file or adding a one-value axis names
no run differently. Characters other than letters, digits and ``.+-`` become ``-``; names that
would still collide get a short hash of their values appended. A sweep finds its finished runs
by what they compute (``runs/identity``), not by their names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft_hpc.config.load import typed_value
from fedpeft_hpc.config.schema import Config
from fedpeft_hpc.errors import ConfigError, UserError
from fedpeft_hpc.utils.files import read_yaml_mapping

KEYS = ("base", "name", "grid", "zip", "overrides", "seeds")
MAX_TOKEN = 40


@dataclass(frozen=True)
class SweepRun:
    name: str
    setting: dict  # varying key -> value (sorted keys; typed values)
    seed: int
    setting_name: str  # the name without the seed
    values: dict = field(default_factory=dict)  # every grid and zip key -> value (one-value axes too)


@dataclass
class SweepSpec:
    path: Path
    name: str
    base: Path
    grid: dict[str, list] = field(default_factory=dict)
    zip: dict[str, list] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] | None = None

    @property
    def swept_keys(self) -> list[str]:
        """The keys that vary between runs (more than one distinct value), sorted."""
        return sorted(k for k, values in {**self.grid, **self.zip}.items()
                      if len({_canonical(typed_value(k, v)) for v in values}) > 1)

    def settings(self) -> list[dict]:
        """Every grid combination x zip row, as ``{dotted key: typed value}`` (every key, in file order)."""
        grid = {k: [typed_value(k, v) for v in vs] for k, vs in self.grid.items()}
        zipped = {k: [typed_value(k, v) for v in vs] for k, vs in self.zip.items()}
        combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
        rows = [dict(zip(zipped, values)) for values in zip(*zipped.values())] if zipped else [{}]
        return [{**g, **z} for g in combos for z in rows]

    def runs(self, default_seed: int) -> list[SweepRun]:
        seeds = self.seeds if self.seeds is not None else [default_seed]
        varying = self.swept_keys
        short = short_names(varying)
        runs = []
        for values in self.settings():
            setting = {k: values[k] for k in varying}
            tokens = [f"{short[k]}={value_token(v)}" for k, v in setting.items()]
            setting_name = "_".join(tokens) or "base"
            for seed in seeds:
                runs.append(SweepRun("_".join(tokens + [f"seed={seed}"]), setting, int(seed), setting_name, values))
        return _unique(runs)


def _canonical(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def override_items(values: dict[str, Any]) -> list[str]:
    """``{dotted key: value}`` as ``key=value`` strings that ``load_config`` parses back to the same values."""
    return [f"{k}={yaml_value(v)}" for k, v in values.items()]


def yaml_value(v: Any) -> str:
    import yaml

    text = yaml.safe_dump(v, default_flow_style=True, width=10**9).strip()
    return text[:-4].rstrip() if text.endswith("\n...") else text


# -- names ------------------------------------------------------------------------------------
def short_names(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other key ends with."""
    out = {}
    for key in keys:
        parts = key.split(".")
        n = 1
        while n < len(parts) and any(o != key and o.split(".")[-n:] == parts[-n:] for o in keys):
            n += 1
        out[key] = ".".join(parts[-n:])
    return out


def value_token(v: Any) -> str:
    if isinstance(v, bool):
        s = "true" if v else "false"
    elif v is None:
        s = "null"
    elif isinstance(v, float):
        s = repr(v)
    elif isinstance(v, (list, tuple)):
        s = "+".join(value_token(x) for x in v) or "empty"
    elif isinstance(v, dict):
        s = "+".join(f"{k}-{value_token(x)}" for k, x in v.items()) or "empty"
    else:
        s = str(v)
    s = re.sub(r"[^A-Za-z0-9.+-]+", "-", s.strip()) or "x"
    if len(s) > MAX_TOKEN:
        s = s[:MAX_TOKEN - 7] + "~" + _digest(s)  # 40 characters at most
    return s


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:6]


def _unique(runs: list[SweepRun]) -> list[SweepRun]:
    """Disambiguate names that collide after sanitising (``a/b`` and ``a-b``) with a hash of the values."""
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.name] = counts.get(r.name, 0) + 1
    if all(c == 1 for c in counts.values()):
        return runs
    out = []
    for r in runs:
        if counts[r.name] > 1:
            tag = _digest(r.setting)
            setting_name = f"{r.setting_name}~{tag}"
            r = SweepRun(f"{setting_name}_seed={r.seed}", r.setting, r.seed, setting_name, r.values)
        out.append(r)
    names = [r.name for r in out]
    if len(set(names)) != len(names):  # identical values twice: the sweep file repeats itself
        dup = sorted({n for n in names if names.count(n) > 1})
        raise UserError(f"sweep: runs {dup[:3]} are the same run twice (a value repeated in grid or zip)")
    return out


# -- loading ----------------------------------------------------------------------------------
def _section(dotted: str) -> bool:
    """``dotted`` names a config section (a dataclass), not a value."""
    cls: Any = Config
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return False
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return False
        cls = hints[part]
    return dataclasses.is_dataclass(cls)


def _flatten(where: str, mapping: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(mapping, dict):
        raise ConfigError(where, f"expected a mapping of dotted config keys, got {mapping!r}")
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and _section(key):
            out.update(_flatten(where, v, key + "."))
        else:
            out[key] = v
    return out


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a sweep file. Errors name the file and the key."""
    p = Path(path)
    data = read_yaml_mapping(p, "sweep file", f"keys {', '.join(KEYS)}")
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise ConfigError(f"{p}: {unknown[0]}", f"unknown sweep key; valid: {', '.join(KEYS)}")

    def err(key: str, msg: str) -> ConfigError:
        return ConfigError(f"{p}: {key}", msg)

    if not data.get("base"):
        raise err("base", "the config file every run starts from (relative to the sweep file, or absolute)")
    base = Path(str(data["base"])).expanduser()
    base = base if base.is_absolute() else (p.parent / base)
    if base.is_dir():
        raise err("base", f"{base} is a directory, not a config file")
    if not base.is_file():
        raise err("base", f"{base} does not exist")
    name = str(data.get("name") or p.stem)
    if not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
        raise err("name", f"{name!r}: use letters, digits and ._+- only")

    grid = _flatten(f"{p}: grid", data.get("grid") or {})
    zipped = _flatten(f"{p}: zip", data.get("zip") or {})
    overrides = _flatten(f"{p}: overrides", data.get("overrides") or {})
    for section, values in (("grid", grid), ("zip", zipped)):
        for k, v in values.items():
            if _section(k):
                raise err(f"{section}.{k}", "is a config section; sweep its keys (e.g. fed.rounds)")
            if not isinstance(v, list) or not v:
                raise err(f"{section}.{k}", f"expected a non-empty list of values, got {v!r}")
    lengths = {len(v) for v in zipped.values()}
    if len(lengths) > 1:
        shown = ", ".join(f"{k}: {len(v)}" for k, v in zipped.items())
        raise err("zip", f"all lists must have one length ({shown})")
    seen: dict[str, str] = {}
    for section, values in (("grid", grid), ("zip", zipped), ("overrides", overrides)):
        for k in values:
            if k in ("seed", "run.dir"):
                hint = "list the seeds under seeds:" if k == "seed" else "the sweep sets run.dir to DIR/RUN_NAME"
                raise err(f"{section}.{k}", f"not allowed in a sweep: {hint}")
            if k in seen:
                raise err(f"{section}.{k}", f"also given under {seen[k]}; give each key in one place")
            seen[k] = section
    seeds = data.get("seeds")
    if seeds is not None:
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                                 for s in seeds):
            raise err("seeds", f"expected a non-empty list of integers, got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise err("seeds", f"{seeds}: a seed is listed twice")
    return SweepSpec(path=p, name=name, base=base, grid=grid, zip=zipped, overrides=overrides, seeds=seeds)
