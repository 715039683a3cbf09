"""Host round trips and top-level aten operators per local epoch of client training, measured from outside.

Runs the quickstart (random-init backbone, ``fed.client_batch`` as given, one round) twice, with
``fed.local_epochs`` 1 and 4, and counts inside the round's client training (``_train_clients``):

- host calls (``fedpeft_hpc.bench.step_counts.host_call_counter``): ``torch.tensor`` /
  ``torch.as_tensor`` (a tensor built from Python data), ``Tensor.tolist``, ``.item``, ``.cpu``,
  ``.numpy`` and the conversions ``bool`` (a truth test), ``int``, ``float``, ``__index__``;
- top-level aten operators: ``torch.profiler`` CPU events named ``aten::*`` without a parent event
  (what the Python code launches; ``ops``), and those without an ``aten::`` ancestor, which adds the
  operators the autograd engine runs for the backward (``ops_with_backward``).

The difference divided by 3 is the cost of one more local epoch: what grows with the number of
optimizer steps (per-round costs cancel). Usage, from the repository root:

    PYTHONPATH=$PWD python tools/count_ops.py [--json] [--setting NAME ...]

Settings: ``bias-sgd`` (BitFit, SGD with Nesterov momentum, client_batch 8), ``lora-adamw``
(LoRA, AdamW, client_batch 8), ``bias-seq`` (BitFit, one client after another).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from fedpeft_hpc.bench.step_counts import host_call_counter

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "bias-sgd": ["peft.method=bias", "fed.client_batch=8"],
    "lora-adamw": ["peft.method=lora", "optim.name=adamw", "optim.lr=0.001", "fed.client_batch=8"],
    "bias-seq": ["peft.method=bias", "fed.client_batch=off"],
}
EPOCHS = (1, 4)
def top_level_aten(prof) -> tuple[int, int]:
    """``(launched by Python, including the backward)``: ``aten::*`` events without any parent event, and
    those without an ``aten::`` ancestor (the autograd engine's backward operators included)."""
    python = with_backward = 0
    for ev in prof.events():
        if not ev.name.startswith("aten::"):
            continue
        python += ev.cpu_parent is None
        parent = ev.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        with_backward += parent is None
    return python, with_backward


def measure(extra: list[str], epochs: int, workdir: Path) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from fedpeft_hpc.comm import LocalCommunicator
    from fedpeft_hpc.config import load_config
    from fedpeft_hpc.federated.engine import FederatedTrainer

    cfg = load_config(REPO / "configs" / "quickstart.yaml",
                      [f"run.dir={workdir}", "run.progress=false", "model.pretrained=false", "fed.rounds=1",
                       f"fed.local_epochs={epochs}", *extra])
    trainer = FederatedTrainer(cfg, LocalCommunicator())
    inner = trainer._train_clients
    out = {}

    def counted(round_idx, clients):
        with host_call_counter() as counts, profile(activities=[ProfilerActivity.CPU]) as prof:
            buf = inner(round_idx, clients)
        out["host"] = dict(counts)
        out["ops"], out["ops_with_backward"] = top_level_aten(prof)
        return buf

    trainer._train_clients = counted
    try:
        trainer.train_round(1)
    finally:
        trainer.close()
    return out


def per_epoch(name: str) -> dict:
    runs = {}
    for e in EPOCHS:
        with tempfile.TemporaryDirectory(prefix="count-ops-") as tmp:
            runs[e] = measure(SETTINGS[name], e, Path(tmp) / "run")
    lo, hi = runs[EPOCHS[0]], runs[EPOCHS[1]]
    span = EPOCHS[1] - EPOCHS[0]
    keys = sorted(set(lo["host"]) | set(hi["host"]))
    host = {k: (hi["host"].get(k, 0) - lo["host"].get(k, 0)) / span for k in keys}
    return {"setting": name, "ops_per_epoch": (hi["ops"] - lo["ops"]) / span,
            "ops_with_backward_per_epoch": (hi["ops_with_backward"] - lo["ops_with_backward"]) / span,
            "host_calls_per_epoch": sum(host.values()), "host_calls_by_kind": {k: v for k, v in host.items() if v},
            "ops_round": {str(e): runs[e]["ops"] for e in EPOCHS}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", action="append", choices=sorted(SETTINGS), help="default: all")
    ap.add_argument("--json", action="store_true", help="one JSON object per setting")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for name in args.setting or list(SETTINGS):
        r = per_epoch(name)
        if args.json:
            print(json.dumps(r))
        else:
            print(f"{name:11s} ops/epoch {r['ops_per_epoch']:7.1f} "
                  f"(with backward {r['ops_with_backward_per_epoch']:7.1f})  "
                  f"host calls/epoch {r['host_calls_per_epoch']:6.1f} "
                  f"{r['host_calls_by_kind']}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
