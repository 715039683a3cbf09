"""Load YAML + dotted ``key=value`` overrides into the typed :class:`Config`.

Every value is coerced by the field's declared type (PyYAML reads ``1e-5`` as a string
and ``off`` as a boolean; both are handled here) and checked against the field's
metadata. Errors name the dotted key and what would be valid.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterable

import yaml

from fedpeft_hpc.config.schema import Config
from fedpeft_hpc.errors import ConfigError, UserError
from fedpeft_hpc.utils.files import read_yaml_mapping
from fedpeft_hpc.utils.hints import did_you_mean

_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True,
               "false": False, "no": False, "off": False, "0": False}
_NONE_WORDS = {"none", "null", "~", ""}


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown(key: str, name: str, valid: Iterable[str]) -> ConfigError:
    valid = sorted(valid)
    hint = did_you_mean(name, valid)
    where = key.rsplit(".", 1)[0] + "." if "." in key else ""
    return ConfigError(key, f"unknown key.{hint} Valid keys here: {', '.join(where + v for v in valid)}")


def _to_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, str)) and str(value).strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[str(value).strip().lower()]
    raise ConfigError(key, f"expected true or false, got {value!r}")


def _to_int(key: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
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


def _to_float(key: str, value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise ConfigError(key, f"expected a number, got {value!r}")


def _to_str(key: str, value: Any) -> str:
    if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
        return "on" if value else "off"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise ConfigError(key, f"expected a string, got {value!r}")


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` as the declared type ``tp`` (scalars, Optional, list of scalars, dict)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
            return None
        return _coerce(key, value, inner[0])
    if tp in _SCALARS:
        return _SCALARS[tp](key, value)
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


def typed_value(key: str, value: Any) -> Any:
    """``value`` as the dotted ``key`` declares it (``1`` -> ``1.0`` for a float key, ``"1e-3"`` -> ``0.001``);
    unchanged where the key is unknown or the value does not convert (validation says so later)."""
    cls: Any = Config
    parts = key.split(".")
    for part in parts[:-1]:
        cls = _hints(cls).get(part) if dataclasses.is_dataclass(cls) else None
        if cls is None or not dataclasses.is_dataclass(cls):
            return value
    tp = _hints(cls).get(parts[-1])
    if tp is None or dataclasses.is_dataclass(tp):
        return value
    try:
        return _coerce(key, value, tp)
    except ConfigError:
        return value


def check_value(key: str, value: Any, meta: dict) -> None:
    """``value`` against a field's metadata (``schema.opt``): allowed values and bounds."""
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        shown = ", ".join("null" if c is None else str(c) for c in choices)
        raise ConfigError(key, f"{value!r} is not one of: {shown}.{did_you_mean(str(value), map(str, choices))}"
                          .rstrip("."))
    items = meta.get("item_choices")
    if items is not None and isinstance(value, list):
        bad = [v for v in value if v not in items]
        if bad or (not value and not meta.get("allow_empty")):
            what = "a list" if meta.get("allow_empty") else "a non-empty list"
            raise ConfigError(key, f"{value!r}: {what} of {', '.join(map(str, items))}")
    if value is None or isinstance(value, (bool, str, list, dict)):
        return
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None:
        if meta.get("min_exclusive") and not value > lo:
            raise ConfigError(key, f"must be > {lo}, got {value}")
        if not meta.get("min_exclusive") and not value >= lo:
            raise ConfigError(key, f"must be >= {lo}, got {value}")
    if hi is not None:
        if meta.get("max_exclusive") and not value < hi:
            raise ConfigError(key, f"must be < {hi}, got {value}")
        if not meta.get("max_exclusive") and not value <= hi:
            raise ConfigError(key, f"must be <= {hi}, got {value}")


def build_dataclass(cls, data: dict, prefix: str = ""):
    """An instance of the dataclass ``cls`` (whose fields come from ``schema.opt``) from a mapping:
    unknown keys refused, every value coerced to its declared type and checked. Errors name
    ``prefix`` + the key."""
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
            kwargs[name] = build_dataclass(tp, data.get(name), key + ".")
            continue
        if name not in data:
            continue
        value = _coerce(key, data[name], tp)
        check_value(key, value, f.metadata)
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


def merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: sections merge key by key, any other value replaces."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "kwargs":
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict:
    """The mapping of a config file, with its ``base:`` file (relative to it) loaded first.

    ``model.kwargs`` is replaced whole, not merged: a file's kwargs describe one architecture.
    """
    p = Path(path).expanduser()
    real = p.resolve()
    if real in _chain:
        cycle = " -> ".join(str(c) for c in (*_chain, real))
        raise UserError(f"config file {p}: its base: files form a cycle ({cycle})")
    data = read_yaml_mapping(p, "config file", "sections (seed, run, model, ...)")
    if {"grid", "zip", "seeds"} & set(data) and "fed" not in data:
        raise UserError(f"{p} is a sweep file (it has {', '.join(sorted({'grid', 'zip', 'seeds'} & set(data)))}), "
                        f"not a training config: run it with `fedpeft-hpc sweep {p}`")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise UserError(f"config file {p}: base: must be the path of another config file, got {base!r}")
    base_path = Path(os.path.expanduser(base))
    if not base_path.is_absolute():
        base_path = p.parent / base_path
    if not base_path.is_file():
        raise UserError(f"config file {p}: base: {base} does not exist (looked for {base_path})")
    return merge(read_yaml(base_path, (*_chain, real)), data)


def from_dict(data: dict) -> Config:
    cfg = build_dataclass(Config, data)
    validate(cfg)
    return cfg


def load_config(path: str | os.PathLike | None, overrides: Iterable[str] = ()) -> Config:
    """Read ``path`` (YAML), apply dotted overrides, coerce, validate."""
    data = read_yaml(path) if path is not None else {}
    return from_dict(apply_overrides(data, overrides))


def dotted(d: dict, prefix: str = "") -> dict:
    """A nested config mapping as ``{"section.key": value}`` (``model.kwargs`` stays one value)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "kwargs":
            out.update(dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


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
    """Rules that involve more than one field. Names kept in registries (``peft.method``,
    ``data.name``) are checked by the registries themselves (``fedpeft_hpc.preflight``)."""
    fed = cfg.fed
    if fed.clients_per_round > fed.num_clients:
        raise ConfigError("fed.clients_per_round",
                          f"{fed.clients_per_round} is more than fed.num_clients={fed.num_clients}")
    if fed.min_clients > fed.clients_per_round:
        raise ConfigError("fed.min_clients",
                          f"{fed.min_clients} is more than fed.clients_per_round={fed.clients_per_round}")
    parse_client_batch(fed.client_batch)
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError("optim.betas", f"{cfg.optim.betas!r}: two numbers in [0, 1)")
    pv = cfg.privacy
    if pv.mode == "client" and fed.min_clients > 1:
        raise ConfigError("fed.min_clients",
                          f"{fed.min_clients} with privacy.mode=client: client-level DP applies every round's "
                          "noised sum (noise alone when no update arrives), since skipping rounds with few updates "
                          "would reveal the cohort's size without noise; use fed.min_clients=1")
    if pv.mode != "none":
        if pv.noise_multiplier is None and pv.target_epsilon is None:
            raise ConfigError("privacy.noise_multiplier",
                              f"privacy.mode={pv.mode} needs privacy.noise_multiplier or privacy.target_epsilon")
        if pv.noise_multiplier is not None and pv.target_epsilon is not None:
            raise ConfigError("privacy.target_epsilon",
                              "give either privacy.noise_multiplier or privacy.target_epsilon, not both")
    if pv.mode == "client" and pv.accountant == "prv" and fed.sampling == "fixed":
        raise ConfigError("privacy.accountant",
                          "prv analyses Poisson sampling only; fixed cohorts (fed.sampling=fixed) are sampled "
                          "without replacement and accounted with dp-accounting's RDP analysis: use "
                          "privacy.accountant=rdp, or fed.sampling=poisson with prv")
    _validate_split_state(cfg)
    _validate_compression(cfg)
    if cfg.model.pretrain_recipe is not None and not cfg.model.checkpoint:
        raise ConfigError("model.checkpoint", "model.pretrain_recipe needs a model.checkpoint path to build")


def _validate_compression(cfg: Config) -> None:
    """``fed.error_feedback`` needs an uplink encoding; heterogeneous LoRA ranks send per-rank tensors that the
    encoders do not handle."""
    fed = cfg.fed
    if fed.error_feedback and fed.compress_up == "none":
        raise ConfigError("fed.error_feedback", "true needs an uplink encoding (fed.compress_up: fp16, bf16, int8, "
                                                "int4 or topk); with compress_up=none there is no residual")
    if cfg.peft.lora_ranks and (fed.compress_up != "none" or fed.compress_down != "none"):
        raise ConfigError("fed.compress_up" if fed.compress_up != "none" else "fed.compress_down",
                          "compressed transfers are not implemented with heterogeneous LoRA ranks "
                          "(peft.lora_ranks); use compress_up=none and compress_down=none, or peft.lora_ranks=[]")


def _validate_split_state(cfg: Config) -> None:
    """``peft.local`` / ``peft.frozen`` disjoint, without repeats; ``peft.lora_ranks`` only for LoRA.
    Whether the method has each part is checked where the method is built (``peft.parts``)."""
    p = cfg.peft
    for key, parts in (("peft.local", p.local), ("peft.frozen", p.frozen)):
        if len(set(parts)) != len(parts):
            raise ConfigError(key, f"{parts!r} names a part twice")
    both = sorted(set(p.local) & set(p.frozen))
    if both:
        raise ConfigError("peft.frozen", f"{', '.join(both)} is also in peft.local; a part is either kept by each "
                                         "client (local) or fixed at its initialisation (frozen), not both")
    if p.lora_ranks:
        if p.method != "lora":
            raise ConfigError("peft.lora_ranks", f"heterogeneous ranks need peft.method=lora, not {p.method}; "
                                                 "leave peft.lora_ranks empty")
        if any(not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in p.lora_ranks):
            raise ConfigError("peft.lora_ranks", f"{p.lora_ranks!r}: a list of integers >= 1")
        if len(p.lora_ranks) > cfg.fed.num_clients:
            raise ConfigError("peft.lora_ranks", f"{len(p.lora_ranks)} rank tiers for fed.num_clients="
                                                 f"{cfg.fed.num_clients}: at most one tier per client")
