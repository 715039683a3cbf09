"""``fedpeft-hpc inspect``: what a PEFT method trains and sends, without data or weights."""

from __future__ import annotations

import dataclasses
import json

from fedpeft_hpc.config.schema import CODEC_CHOICES, Config
from fedpeft_hpc.federated.codecs import build_codec
from fedpeft_hpc.models import build_model
from fedpeft_hpc.peft import count_params, peft_params, registered_methods
from fedpeft_hpc.peft.parts import split_counts, state_parts
from fedpeft_hpc.peft.ranks import rank_bytes


def method_counts(cfg: Config, method: str | None = None) -> dict:
    """Total and trainable parameters and bytes per one-way transfer of ``method`` (default: the config's);
    the trained parameters split into sent and local (``peft.local``), and the frozen ones (``peft.frozen``).
    For another method than the config's, its parts are all sent and trained (no local or frozen parts)."""
    peft_cfg = (cfg.peft if method is None else
                dataclasses.replace(cfg.peft, method=method, local=[], frozen=[], lora_ranks=[]))
    built = build_model(cfg.model, peft_cfg, cfg.seed, load_weights=False)
    counts = {**count_params(built.model), **split_counts(built.model, peft_cfg)}
    if peft_cfg.lora_ranks:
        sent = set(state_parts(built.model, peft_cfg).sent)
        tensors = {n: p for n, p in peft_params(built.model).items() if n in sent}
        counts["bytes_per_transfer_by_rank"] = {str(r): rank_bytes(tensors, r) for r in sorted(set(peft_cfg.lora_ranks))}
    counts["method"] = peft_cfg.method
    counts["model"] = cfg.model.name
    counts["num_classes"] = cfg.model.num_classes
    counts["trainable_share"] = counts["trainable_params"] / counts["total_params"]
    counts["full_bytes_per_transfer"] = built.full_bytes_per_transfer
    # one transfer of the sent state under each encoding (fed.compress_up / compress_down); fp32 values
    n = counts["sent_params"]
    counts["bytes_per_transfer_encoded"] = {c: build_codec(c, cfg.fed.compress_block, cfg.fed.topk_fraction).size(n)
                                            for c in CODEC_CHOICES}
    return counts


def _row(c: dict) -> str:
    return (f"| {c['method']:<8} | {c['total_params']:>13,} | {c['trainable_params']:>13,} | "
            f"{100 * c['trainable_share']:>8.3f}% | {c['bytes_per_transfer'] / 1e6:>11.3f} |")


def counts_report(cfg: Config, all_methods: bool = False, as_json: bool = False) -> str:
    """The ``inspect`` output: a table (one row, or one per registered method) or one JSON object."""
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
    lines = [header] + [_row(r) for r in (rows or [main])]
    if cfg.peft.local or cfg.peft.frozen or cfg.peft.lora_ranks:
        lines.append(f"{cfg.peft.method}: sent {main['sent_params']:,} params, local {main['local_params']:,} "
                     f"(peft.local={cfg.peft.local}), frozen {main['frozen_params']:,} (peft.frozen={cfg.peft.frozen})")
    enc = main["bytes_per_transfer_encoded"]
    lines.append("bytes per transfer by encoding (fed.compress_up/down): "
                 + ", ".join(f"{c} {b:,}" + (f" (top {cfg.fed.topk_fraction:g})" if c == "topk" else "")
                             for c, b in enc.items()))
    for r, b in main.get("bytes_per_transfer_by_rank", {}).items():
        lines.append(f"  a rank-{r} client sends {b / 1e6:.3f} MB per transfer")
    return "\n".join(lines)
