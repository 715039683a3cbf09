"""The config documents itself: every dotted key with its type, default, allowed values and help.

Read from the schema's field metadata (``schema.opt``). Names that live in registries (PEFT
methods, datasets) are not the config's to know: callers pass them as ``extra_choices``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from fedpeft_hpc.config.schema import Config


@dataclass(frozen=True)
class KeyInfo:
    key: str
    type: str
    default: Any
    choices: tuple | None
    bounds: str
    help: str


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        return f"{_type_name(args[0])} or null"
    return getattr(tp, "__name__", str(tp))


def _bounds(meta: Mapping) -> str:
    lo, hi = meta.get("min"), meta.get("max")
    parts = []
    if lo is not None:
        parts.append(f"{'>' if meta.get('min_exclusive') else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if meta.get('max_exclusive') else '<='} {hi:g}")
    return ", ".join(parts)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def config_keys(extra_choices: Mapping[str, Sequence[str]] | None = None, cls: type = Config,
                prefix: str = "") -> list[KeyInfo]:
    """Every leaf key of ``cls`` in declaration order."""
    extra_choices = extra_choices or {}
    hints = typing.get_type_hints(cls)
    out: list[KeyInfo] = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(config_keys(extra_choices, tp, key + "."))
            continue
        meta = f.metadata
        choices = meta.get("choices") or meta.get("item_choices")
        if key in extra_choices:
            choices = tuple(extra_choices[key])
        out.append(KeyInfo(key=key, type=_type_name(tp), default=_default(f),
                           choices=tuple(choices) if choices else None, bounds=_bounds(meta),
                           help=str(meta.get("help", ""))))
    return out


def _show(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{}" if not v else str(v)
    return str(v)


def _allowed(k: KeyInfo) -> str:
    if k.choices:
        return ", ".join(_show(c) for c in k.choices)
    return k.bounds


def keys_text(keys: Sequence[KeyInfo]) -> str:
    """One block per key, for the terminal."""
    lines = []
    for k in keys:
        allowed = _allowed(k)
        lines.append(f"{k.key}  ({k.type}, default {_show(k.default)}{'; ' + allowed if allowed else ''})")
        lines.append(f"    {k.help}")
    return "\n".join(lines)


def keys_markdown(keys: Sequence[KeyInfo]) -> str:
    """A markdown table (the README's key table is this, generated)."""
    rows = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for k in keys:
        cells = [f"`{k.key}`", k.type, f"`{_show(k.default)}`", _allowed(k).replace("|", "\\|"),
                 k.help.replace("|", "\\|")]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
