"""5. Memory per hosted client, over the size of its PEFT state.

A rank hosts a population of clients but trains only the sampled ones; what it keeps per
hosted client must stay small next to the client's PEFT state, or large populations stop
fitting. Two fresh processes build the same run (same model, same data) with 10 and 1,000
clients and train one round of the same cohort; what their peaks differ by is what the
990 extra clients cost. Counted: the Python objects and numpy arrays still held after the
round (tracemalloc: partitions, sizes, schedules, privacy state: everything this code keeps
per client) and, on a GPU, the CUDA allocator's peak. Torch CPU tensors are not traced; none is kept per
hosted client (a client's PEFT state exists only while it trains, in the K slots). The
processes' peak resident sets are reported beside it: their difference at this scale
is within the allocator's noise (megabytes). Target: <= 1.5x the PEFT state per client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from fedpeft_hpc.bench.context import BenchContext
from fedpeft_hpc.bench.registry import Row, at_most, register_measurement

COHORT = 8


def package_env(threads: int | None = None) -> dict:
    """The environment for a child process that must import this same copy of the package."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _probe(clients: int, ctx: BenchContext) -> dict:
    cmd = [sys.executable, "-m", "fedpeft_hpc.bench.memory", str(clients), ctx.device.type, ctx.suite]
    res = subprocess.run(cmd, capture_output=True, text=True, env=package_env(), timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"memory probe with {clients} clients failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


@register_measurement("memory")
def hosted_client_memory(ctx: BenchContext) -> list[Row]:
    few, many = ctx.profile.hosted
    ctx.status(f"memory: {few} clients")
    a = _probe(few, ctx)
    ctx.status(f"memory: {many} clients")
    b = _probe(many, ctx)
    state = b["bytes_per_transfer"]
    kinds = [("traced", "traced")] + ([("CUDA peak", "cuda_peak")] if ctx.device.type == "cuda" else [])
    total = sum(b[k] - a[k] for _, k in kinds)
    per_client = total / (many - few)
    ratio = per_client / state
    detail = ", ".join(f"{name} {a[k] / 2**20:.2f} -> {b[k] / 2**20:.2f} MiB" for name, k in
                       [*kinds, ("peak RSS", "peak_rss")])
    method = ctx.profile.headline_method
    return [Row("memory per hosted client / PEFT state", f"{method}, {few} vs {many} clients", ratio,
                "<= 1.5", at_most(ratio, 1.5), detail=f"{per_client / 1024:.2f} KiB per client vs {state / 1024:.2f} "
                f"KiB state; {detail}", key="memory_per_client_ratio",
                extra={"bytes_per_hosted_client": per_client, "state_bytes": state})]


def _main(argv: list[str]) -> None:
    """Child process: build the run with N clients, train one round, print peak memory as JSON."""
    import tracemalloc

    import torch

    from fedpeft_hpc.federated.engine import FederatedTrainer  # noqa: F401  (imports before tracing starts)
    from fedpeft_hpc.federated.memory import peak_rss_bytes

    clients, device, suite = int(argv[0]), torch.device(argv[1]), argv[2]
    tracemalloc.start()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = BenchContext(suite, device, Path(tmp))
        p = ctx.profile
        fr = ctx.engine(f"peft.method={ctx.profile.headline_method}", f"fed.num_clients={clients}",
                        f"fed.clients_per_round={min(COHORT, clients)}", f"data.synthetic_samples={p.hosted_samples}",
                        f"fed.client_batch={COHORT}")
        fr.train_round(1)
        traced = tracemalloc.get_traced_memory()[0]  # what the run keeps (the peak is the data generation's)
        out = {"clients": clients, "traced": traced, "peak_rss": peak_rss_bytes() or _maxrss_bytes(),
               "bytes_per_transfer": fr.fed.counts["bytes_per_transfer"],
               "cuda_peak": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0}
    print(json.dumps(out), flush=True)


def _maxrss_bytes() -> int:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB elsewhere


if __name__ == "__main__":
    _main(sys.argv[1:])
