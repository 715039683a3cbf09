"""``fedpeft-hpc quickstart``: every PEFT method on the embedded default, and one table.

Each method runs with its own client learning rate (PEFT parameters want larger steps
than full fine-tuning, as in the FedPEFT paper's per-method rates); everything else is
the embedded ``configs/quickstart.yaml``. Finished runs are reused, not recomputed.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

from fedpeft_hpc.config import load_config
from fedpeft_hpc.errors import ConfigError
from fedpeft_hpc.models.pretrain import ensure_pretrained
from fedpeft_hpc.peft import registered_methods
from fedpeft_hpc.preflight import check_names
from fedpeft_hpc.train import train
from fedpeft_hpc.utils.logs import setup_logging

# Client learning rates per method (SGD, momentum 0.9), chosen on the quickstart task.
LR_BY_METHOD = {"full": 0.01, "head": 0.05, "bias": 0.05, "adapter": 0.05, "prompt": 0.05, "lora": 0.05}


def embedded_config() -> Path:
    return Path(str(resources.files("fedpeft_hpc") / "configs" / "quickstart.yaml"))


def results_table(rows: list[dict]) -> str:
    full = next((r for r in rows if r["method"] == "full"), None)
    dp = any("delta" in r for r in rows)
    lines = ["| method  | final acc | best acc | trainable params | MB sent (up+down) | vs full bytes | wall s |"
             + (" epsilon (delta) |" if dp else ""),
             "|---------|-----------|----------|------------------|-------------------|---------------|--------|"
             + ("-----------------|" if dp else "")]
    for r in rows:
        # under DP with privacy.release=covered, bytes that give the secret cohort's size and timings are withheld
        sent = r["bytes_total"]
        share = (f"{100 * sent / full['bytes_total']:.2f}%" if full and sent is not None and full["bytes_total"]
                 else "-")
        mb = "withheld" if sent is None else f"{sent / 1e6:.2f}"
        wall = "-" if r["wall_s"] is None else f"{r['wall_s']:.1f}"
        line = (f"| {r['method']:<7} | {r['final_acc']:>9.3f} | {r['best_acc']:>8.3f} | "
                f"{r['trainable_params']:>16,} | {mb:>17} | {share:>13} | {wall:>6} |")
        if dp:
            eps = "inf" if r.get("epsilon") is None else f"{r['epsilon']:.3f}"
            line += f" {eps + ' (' + format(r['delta'], 'g') + ')':>15} |"
        lines.append(line)
    return "\n".join(lines)


def run_quickstart(out: str, methods: str, overrides: list[str], config: str | None = None) -> int:
    names = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in registered_methods()]
    if unknown or not names:
        raise ConfigError("--methods", f"{unknown or methods!r}: choose from {', '.join(registered_methods())}")
    path = Path(config) if config else embedded_config()
    configs = []
    for method in names:  # every method's config is checked before the first one trains
        lr = LR_BY_METHOD.get(method)
        extra = [f"peft.method={method}", f"run.dir={Path(out) / method}"] + ([f"optim.lr={lr}"] if lr else [])
        configs.append(check_names(load_config(path, extra + list(overrides))))
    setup_logging(configs[0].run.log_level)
    ensure_pretrained(configs[0].model)  # once, outside the per-method timings
    rows = []
    for cfg in configs:
        t0 = time.perf_counter()
        summary = train(cfg)
        withheld = cfg.privacy.mode != "none" and cfg.privacy.release == "covered"  # timings are not covered
        summary["wall_s"] = None if withheld else time.perf_counter() - t0
        rows.append(summary)
    table = results_table(rows)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "quickstart.md").write_text(table + "\n")
    (Path(out) / "quickstart.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table)
    print(f"\nRuns, metrics and checkpoints: {out}/<method>/ (table also in {out}/quickstart.md)")
    return 0
