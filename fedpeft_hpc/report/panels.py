"""Splitting a report's runs into panels: one sub-plot per value of some swept keys.

A sweep that crosses methods with partitions and privacy modes has too many settings for one
legend (the CPU study: 24 lines). ``fedpeft-hpc report DIR --panels data.partition,privacy.mode``
draws one panel per combination of those keys' values, each with the remaining settings as its
lines, so the lines compared inside a panel differ only in the keys left (e.g. the method).
"""

from __future__ import annotations

from dataclasses import replace

from fedpeft_hpc.errors import UserError
from fedpeft_hpc.report.collect import Collection, value_text


def resolve_keys(coll: Collection, keys: list[str]) -> list[str]:
    """Panel keys as swept keys; short names (``partition``) are accepted. A ``UserError`` names the valid ones."""
    by_short = {coll.short.get(k, k): k for k in coll.swept}
    out = []
    for key in keys:
        full = key if key in coll.swept else by_short.get(key)
        if full is None:
            valid = ", ".join(coll.swept) or "none (nothing was swept)"
            raise UserError(f"report --panels: {key!r} is not a swept key of {coll.title}; swept keys: {valid}")
        if full not in out:
            out.append(full)
    return out


def split(coll: Collection, keys: list[str]) -> list[tuple[str, Collection]]:
    """``(panel title, its runs)`` per combination of ``keys``' values, in first-seen order.

    Without keys: one panel, the whole collection, titled by the collection. In a panel the
    runs' settings no longer carry the panel keys, so legends name only what differs inside it.
    """
    keys = resolve_keys(coll, keys)
    if not keys:
        return [(coll.title, coll)]
    groups: dict[tuple, list] = {}
    for rec in coll.runs:
        value = tuple(value_text(rec.setting.get(k)) for k in keys)
        groups.setdefault(value, []).append(replace(rec, setting={k: v for k, v in rec.setting.items()
                                                                   if k not in keys}))
    rest = [k for k in coll.swept if k not in keys]
    out = []
    for value, recs in groups.items():
        title = ", ".join(f"{coll.short.get(k, k)}={v}" for k, v in zip(keys, value))
        out.append((title, Collection(title, rest, coll.short, recs)))
    return out
