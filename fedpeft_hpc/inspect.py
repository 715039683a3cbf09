"""``fedpeft-hpc inspect``: what a PEFT method trains and sends, without data or weights."""

from __future__ import annotations

import dataclasses
import json

from fedpeft_hpc.config.schema import Config


def method_counts(cfg: Config, method: str | None = None) -> dict:
    from fedpeft_hpc.models import build_model
    from fedpeft_hpc.peft import count_params

    peft_cfg = cfg.peft if method is None else dataclasses.replace(cfg.peft, method=method)
    model, _ = build_model(cfg.model, peft_cfg, cfg.seed, load_weights=False)
    counts = count_params(model)
    counts["method"] = peft_cfg.method
    counts["model"] = cfg.model.name
    counts["num_classes"] = cfg.model.num_classes
    counts["trainable_share"] = counts["trainable_params"] / counts["total_params"]
    return counts


def _row(c: dict) -> str:
    return (f"| {c['method']:<8} | {c['total_params']:>13,} | {c['trainable_params']:>13,} | "
            f"{100 * c['trainable_share']:>8.3f}% | {c['bytes_per_transfer'] / 1e6:>11.3f} |")


def inspect_config(cfg: Config, all_methods: bool = False, as_json: bool = False) -> str:
    from fedpeft_hpc.peft import registered_methods

    main = method_counts(cfg)
    rows = [method_counts(cfg, m) for m in registered_methods()] if all_methods else []
    if as_json:
        out = dict(main)
        if rows:
            out["methods"] = rows
        return json.dumps(out)
    header = (f"{cfg.model.name}, {cfg.model.num_classes} classes\n"
              "| method   |  total params |     trainable |     share | MB/transfer |\n"
              "|----------|---------------|---------------|-----------|-------------|")
    return "\n".join([header] + [_row(r) for r in (rows or [main])])
