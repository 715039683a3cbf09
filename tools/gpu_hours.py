"""GPU-hours of the paper's sweeps (configs/paper/sweeps/) from round times measured on your GPU.

    python tools/gpu_hours.py probe --out probe.json     # on one GPU of the cluster, about 3 minutes
    python tools/gpu_hours.py table probe.json           # anywhere: a Markdown table per sweep

``probe`` trains the paper's ViT-B/16 at 224 px (random weights: the time does not depend on them)
with every method, without and with sample-level DP-SGD, for 3 rounds on synthetic images: 8
clients of 25 images, 2 local epochs, batch 64, a 1,024-image test set evaluated in round 3 only.
Round 1 warms the device up; round 2 (training only) gives the seconds per trained image,
round 3 minus its training gives the seconds per evaluated image. Each round's ``wall_s`` comes
from the run's own ``metrics.jsonl``.

``table`` expands every paper sweep and adds up, per run, the images its rounds train and
evaluate on average: rounds x (clients_per_round x (1 - dropout) x local_epochs x training
images / num_clients) trained, rounds x test images evaluated (``eval.every`` is 1). Times
scale with those counts on one GPU per run; ranks split a round's clients, so N GPUs per run
take about 1/N of the hours each (the total stays). Start-up, checkpoints and the data cache
are not counted.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "configs" / "paper" / "sweeps"
PROBE_BASE = REPO / "configs" / "paper" / "cifar100_vitb16.yaml"
METHODS = ("full", "head", "bias", "adapter", "prompt", "lora")
# (training images before data.max_train_samples, test images) as the paper's recipes read them
DATASETS = {"cifar100": (50_000, 10_000), "resisc45": (25_200, 6_300), "pcam": (20_000, 32_768)}
PROBE = {"clients": 8, "per_client": 25, "epochs": 2, "test": 1024}


def _probe_overrides(run_dir: Path, method: str, dp: bool) -> list[str]:
    p = PROBE
    out = [f"run.dir={run_dir}", "run.progress=false", "model.pretrained=false", f"peft.method={method}",
           "data.name=synthetic", "data.partition=iid", f"data.synthetic_samples={64 * p['per_client']}",
           f"data.synthetic_test_samples={p['test']}", "data.num_workers=0",
           "fed.rounds=3", f"fed.local_epochs={p['epochs']}", "fed.num_clients=64",
           f"fed.clients_per_round={p['clients']}", "fed.dropout=0", "eval.every=3"]
    if dp:
        out += ["privacy.mode=sample", "privacy.noise_multiplier=1.0", "privacy.seeded_noise=true"]
    return out


def probe(out: Path, config: Path = PROBE_BASE, extra: list[str] | None = None) -> int:
    import torch

    from fedpeft_hpc.config import load_config
    from fedpeft_hpc.train import train
    from fedpeft_hpc.utils.logs import setup_logging

    setup_logging("warning")
    trained = PROBE["clients"] * PROBE["per_client"] * PROBE["epochs"]
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "config": str(config), "overrides": list(extra or []),
              "date": _dt.date.today().isoformat(), "torch": torch.__version__, "probe": PROBE, "seconds": {}}
    for dp in (False, True):
        for method in METHODS:
            key = f"{method}{'+dp' if dp else ''}"
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    train(load_config(config, _probe_overrides(Path(tmp) / "run", method, dp) + list(extra or [])))
                except Exception as e:  # noqa: BLE001 - e.g. out of memory for full + DP: recorded, not fatal
                    result["seconds"][key] = {"error": f"{type(e).__name__}: {e}"[:300]}
                    print(f"{key}: failed: {result['seconds'][key]['error']}", flush=True)
                    continue
                rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
            train_s = rows[1]["wall_s"] / trained
            eval_s = max(rows[2]["wall_s"] - rows[1]["wall_s"], 0.0) / PROBE["test"]
            result["seconds"][key] = {"train_image_s": train_s, "eval_image_s": eval_s,
                                      "round_wall_s": [r["wall_s"] for r in rows]}
            print(f"{key:<12} {1 / train_s:8.1f} trained images/s, {1 / eval_s if eval_s else float('inf'):8.1f} "
                  f"evaluated images/s", flush=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def sweep_workload(path: Path) -> list[dict]:
    """Per run of the sweep: method, DP, rounds, trained and evaluated images (expected over cohorts)."""
    from fedpeft_hpc.config import load_config
    from fedpeft_hpc.launchers.sweep import run_overrides
    from fedpeft_hpc.launchers.sweep_spec import load_sweep, override_items

    spec = load_sweep(path)
    dataset = spec.base.stem.split("_")[0]
    n_train, n_test = DATASETS[dataset]
    out = []
    for run in spec.runs(default_seed=42):
        cfg = load_config(spec.base, override_items({**run_overrides(spec, run), "run.dir": "unused"}))
        n = min(n_train, cfg.data.max_train_samples or n_train)
        per_round = cfg.fed.clients_per_round * (1 - cfg.fed.dropout) * cfg.fed.local_epochs * n / cfg.fed.num_clients
        out.append({"run": run.name, "method": cfg.peft.method, "dp": cfg.privacy.mode != "none",
                    "rounds": cfg.fed.rounds, "trained": cfg.fed.rounds * per_round,
                    "evaluated": cfg.fed.rounds * n_test})
    return out


def gpu_hours(work: list[dict], seconds: dict) -> float | None:
    """Sum over runs of trained x s/trained image + evaluated x s/evaluated image, in hours; None if unmeasured."""
    total = 0.0
    for w in work:
        s = seconds.get(f"{w['method']}{'+dp' if w['dp'] else ''}", {})
        if "train_image_s" not in s:
            return None
        total += w["trained"] * s["train_image_s"] + w["evaluated"] * s["eval_image_s"]
    return total / 3600


def table(probe_file: Path | None, train_speedup: float = 1.0) -> str:
    """``train_speedup``: every trained image takes 1/F of the probe's time (an estimate for a precision the
    probe did not run, e.g. bf16 from an fp32 probe); evaluation (always fp32) keeps its time."""
    seconds = json.loads(probe_file.read_text())["seconds"] if probe_file else {}
    if train_speedup != 1.0:
        seconds = {k: ({**v, "train_image_s": v["train_image_s"] / train_speedup} if "train_image_s" in v else v)
                   for k, v in seconds.items()}
    head = "| sweep | runs | images trained | images evaluated | GPU-hours |"
    lines = [head, "|---|---|---|---|---|"]
    for path in sorted(SWEEPS.glob("*.yaml")):
        work = sweep_workload(path)
        hours = gpu_hours(work, seconds)
        shown = "–" if hours is None else f"{hours:,.0f}"
        lines.append(f"| `{path.name}` | {len(work)} | {sum(w['trained'] for w in work) / 1e6:,.1f} M | "
                     f"{sum(w['evaluated'] for w in work) / 1e6:,.1f} M | {shown} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe", help="measure seconds per trained and evaluated image on this device")
    p.add_argument("--out", type=Path, default=Path("probe.json"))
    p.add_argument("--config", type=Path, default=PROBE_BASE, help="model and optimiser of the probe "
                   "(default: the paper's ViT-B/16 CIFAR-100 base)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="applied last (e.g. model.precision)")
    t = sub.add_parser("table", help="Markdown table of every paper sweep (GPU-hours need a probe file)")
    t.add_argument("probe", type=Path, nargs="?", help="the JSON that `probe` wrote")
    t.add_argument("--train-speedup", type=float, default=1.0, metavar="F",
                   help="estimate: training F times faster than probed (e.g. 2.66 for bf16 from an fp32 probe on "
                        "an H200); evaluation keeps its probed time")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))  # this checkout's fedpeft_hpc
    if args.cmd == "probe":
        return probe(args.out, args.config, args.overrides)
    if args.train_speedup <= 0:
        ap.error(f"--train-speedup must be > 0, got {args.train_speedup}")
    print(table(args.probe, args.train_speedup))
    return 0


if __name__ == "__main__":
    sys.exit(main())
