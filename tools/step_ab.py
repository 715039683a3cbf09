"""The batched client step, variant against variant, on one device (issue 16's GPU measurements).

K clients x batch B of the bench profile's model (default on CUDA: ViT-B/16 at 224 px, BitFit,
32 clients x 16) are trained for ``steps`` local steps by ``BatchedClientTrainer`` in each variant,
and centrally (one optimizer, ``local_train``) at batch B and K*B, all timed interleaved (best of
``repeats``). Per variant: samples/s, its ratio to centralized training at K*B in the same
precision (the batching bound's denominator), the peak memory per client slot (peak at K minus
peak at K/2, over K/2; CUDA only), and the host round trips and top-level operators per step
(``fedpeft_hpc.bench.step_counts``). Variants: bf16 with fused attention (the default path), bf16
with plain attention, bf16 with ``run.compile``, fp32 with fused attention.

    python tools/step_ab.py [--device cuda] [--clients 32] [--batch 16] [--steps 3] [--repeats 3]
                            [--variants bf16,bf16-plain,bf16-compile,fp32] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

VARIANTS = {
    "bf16": dict(precision="bf16", attention="auto"),
    "bf16-plain": dict(precision="bf16", attention="plain"),
    "bf16-compile": dict(precision="bf16", attention="auto", compile=True),
    "fp32": dict(precision="fp32", attention="auto"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--clients", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--method", default="bias")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    from fedpeft_hpc.bench.clients import _pool, centralized
    from fedpeft_hpc.bench.context import BenchContext
    from fedpeft_hpc.bench.step_counts import step_counts
    from fedpeft_hpc.federated.batched import BatchedClientTrainer, ClientJob
    from fedpeft_hpc.federated.memory import peak_memory

    device = torch.device(args.device)
    knobs = {"method": args.method, "steps": args.steps, "clients": args.clients, "batch_size": args.batch}
    out: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        ctx = BenchContext("quick", device, Path(tmp), knobs={k: v for k, v in knobs.items() if v is not None})
        p = ctx.profile
        k, b = p.headline_clients, p.batch
        model, layout, start, cfg, spec = ctx.model(args.method)
        small, big = _pool(ctx, spec, k)
        out.update(model=p.title, clients=k, batch=b, steps=p.steps)
        samples = k * p.steps * b

        def batched(variant: dict, clients: int = k):
            kw = dict(variant)
            trainer = BatchedClientTrainer(model, layout, cfg.optim, clients, device, batch_size=b, **kw)
            return trainer, [ClientJob(c, lambda: small) for c in range(clients)]

        def run(variant: dict, clients: int = k):
            trainer, jobs = batched(variant, clients)
            for _ in trainer.train(start, jobs):
                pass

        def central(precision: str, batches):
            cfg.model.precision = precision
            centralized(ctx, model, layout, start, cfg, batches)

        chosen = [v for v in args.variants.split(",") if v]
        fns = {name: (lambda v=VARIANTS[name]: run(v)) for name in chosen}
        for precision in sorted({VARIANTS[n]["precision"] for n in chosen}):
            fns[f"central_b_{precision}"] = lambda pr=precision: central(pr, small * k)
            fns[f"central_kb_{precision}"] = lambda pr=precision: central(pr, big)
        times = ctx.best_times(fns, repeats=args.repeats)
        for precision in sorted({VARIANTS[n]["precision"] for n in chosen}):
            out[f"batching_bound_{precision}"] = times[f"central_b_{precision}"] / times[f"central_kb_{precision}"]
            out[f"central_kb_{precision}_samples_per_s"] = samples / times[f"central_kb_{precision}"]
        for name in chosen:
            v = VARIANTS[name]
            row = {"samples_per_s": samples / times[name],
                   "vs_central_kb": times[f"central_kb_{v['precision']}"] / times[name],
                   "speedup_vs_central_b": times[f"central_b_{v['precision']}"] / times[name]}
            trainer, jobs = batched(v)
            row.update(step_counts(trainer, start, jobs))
            row["compiled"] = bool(v.get("compile")) and trainer.compiled is not None
            row["attention"] = trainer.attention
            if device.type == "cuda":
                peaks = {}
                for clients in (k // 2, k):
                    with peak_memory(device) as peak:
                        run(v, clients)
                    peaks[clients] = peak.bytes
                row["peak_bytes"] = peaks[k]
                row["bytes_per_slot"] = (peaks[k] - peaks[k // 2]) / max(1, k - k // 2)
            out["variants"][name] = row
            print(name, json.dumps(row), flush=True)
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
