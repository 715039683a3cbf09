"""Load YAML + dotted ``key=value`` overrides into the typed :class:`Config`.

Every value is coerced by the field's declared type (PyYAML reads ``1e-5`` as a string
and ``off`` as a boolean; both are handled here) and checked against the field's
metadata. Errors name the dotted key and what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterable

import yaml

from fedpeft_hpc.config.schema import Config
from fedpeft_hpc.errors import ConfigError, UserError

_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True,
               "false": False, "no": False, "off": False, "0": False}
_NONE_WORDS = {"none", "null", "~", ""}


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown(key: str, name: str, valid: Iterable[str]) -> ConfigError:
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    where = key.rsplit(".", 1)[0] + "." if "." in key else ""
    return ConfigError(key, f"unknown key.{hint} Valid keys here: {', '.join(where + v for v in valid)}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
            return None
        return _coerce(key, value, inner[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, str)) and str(value).strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[str(value).strip().lower()]
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    f = None
                if f is not None and f.is_integer():
                    return int(f)
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(key, f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(key, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
            return "on" if value else "off"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ConfigError(key, f"expected a string, got {value!r}")
    if origin is list or tp is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        elem = args[0] if args else None
        return [(_coerce(f"{key}[{i}]", v, elem) if elem else v) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(key, f"unsupported type {tp}")  # pragma: no cover - schema bug


def _check_meta(key: str, value: Any, meta: dict) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        shown = ", ".join("null" if c is None else str(c) for c in choices)
        raise ConfigError(key, f"{value!r} is not one of: {shown}")
    if value is None or isinstance(value, (bool, str, list, dict)):
        return
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None:
        if meta.get("min_exclusive") and not value > lo:
            raise ConfigError(key, f"must be > {lo}, got {value}")
        if not meta.get("min_exclusive") and not value >= lo:
            raise ConfigError(key, f"must be >= {lo}, got {value}")
    if hi is not None and not value <= hi:
        raise ConfigError(key, f"must be <= {hi}, got {value}")


def _build(cls, data: dict, prefix: str = ""):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "<root>", f"expected a mapping, got {data!r}")
    fields = _fields(cls)
    hints = _hints(cls)
    for name in data:
        if name not in fields:
            raise _unknown(prefix + str(name), str(name), fields)
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data.get(name), key + ".")
            continue
        if name not in data:
            continue
        value = _coerce(key, data[name], tp)
        _check_meta(key, value, f.metadata)
        kwargs[name] = value
    return cls(**kwargs)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(item, "overrides are written key=value, e.g. fed.rounds=5")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(item, "overrides are written key=value with a dotted key, e.g. optim.lr=0.01")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = {}
                node[p] = nxt
            node = nxt
        node[parts[-1]] = value
    return data


def read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"config file {p} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping of sections (seed, run, model, ...)")
    return data


def from_dict(data: dict) -> Config:
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def load_config(path: str | os.PathLike | None, overrides: Iterable[str] = ()) -> Config:
    """Read ``path`` (YAML), apply dotted overrides, coerce, validate."""
    data = read_yaml(path) if path is not None else {}
    return from_dict(apply_overrides(data, overrides))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def parse_client_batch(value: str) -> int | str | None:
    """``fed.client_batch``: ``None`` (off; also 0 and 1), ``"auto"``, or K >= 2 clients a rank trains at once."""
    v = str(value).strip().lower()
    if v in ("off", "false", "no", "0", "1"):
        return None
    if v == "auto":
        return "auto"
    if not v.isdigit():
        raise ConfigError("fed.client_batch", f"{value!r}: valid are off, auto, or how many clients a rank trains "
                                              "at once (an integer >= 2; 0 and 1 mean off)")
    return int(v)


def validate(cfg: Config) -> None:
    """Rules that involve more than one field or a registry."""
    from fedpeft_hpc.data.datasets import DATASETS
    from fedpeft_hpc.peft import registered_methods

    fed = cfg.fed
    if fed.clients_per_round > fed.num_clients:
        raise ConfigError("fed.clients_per_round",
                          f"{fed.clients_per_round} is more than fed.num_clients={fed.num_clients}")
    if fed.min_clients > fed.clients_per_round:
        raise ConfigError("fed.min_clients",
                          f"{fed.min_clients} is more than fed.clients_per_round={fed.clients_per_round}")
    parse_client_batch(fed.client_batch)
    methods = registered_methods()
    if cfg.peft.method not in methods:
        close = difflib.get_close_matches(cfg.peft.method, methods, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError("peft.method", f"unknown method {cfg.peft.method!r}.{hint} Valid: {', '.join(methods)}")
    bad = [t for t in cfg.peft.lora_targets if t not in ("qkv", "proj", "fc1", "fc2")]
    if bad or not cfg.peft.lora_targets:
        raise ConfigError("peft.lora_targets", f"{cfg.peft.lora_targets!r}: choose from qkv, proj, fc1, fc2")
    if cfg.data.name not in DATASETS:
        raise ConfigError("data.name", f"unknown dataset {cfg.data.name!r}. Valid: {', '.join(sorted(DATASETS))}")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError("optim.betas", f"{cfg.optim.betas!r}: two numbers in [0, 1)")
    pv = cfg.privacy
    if pv.mode != "none":
        if pv.noise_multiplier is None and pv.target_epsilon is None:
            raise ConfigError("privacy.noise_multiplier",
                              f"privacy.mode={pv.mode} needs privacy.noise_multiplier or privacy.target_epsilon")
        if pv.noise_multiplier is not None and pv.target_epsilon is not None:
            raise ConfigError("privacy.target_epsilon",
                              "give either privacy.noise_multiplier or privacy.target_epsilon, not both")
    if cfg.model.pretrain_recipe is not None and not cfg.model.checkpoint:
        raise ConfigError("model.checkpoint", "model.pretrain_recipe needs a model.checkpoint path to build")
