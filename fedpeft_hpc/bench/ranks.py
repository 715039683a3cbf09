"""6. Two ranks vs one: the same training under torchrun with 2 processes and in 1 process.

Three real ``fedpeft-hpc train`` runs of the same config (round time from their
``metrics.jsonl``, first round and the evaluating last round left out): one process with
one thread, two processes with one thread each (equal threads per rank), and one process
with as many threads as the two use together. Targets (issue 8): 2 ranks >= 1.7x one rank
at equal threads per rank and >= 1.3x one rank using both cores. On a GPU node each rank
needs its own GPU, so with fewer than 2 GPUs the row says so and holds no value.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch

from fedpeft_hpc.bench.context import BenchContext
from fedpeft_hpc.bench.memory import package_env
from fedpeft_hpc.bench.registry import Row, at_least, register_measurement

ROUNDS = 6  # round 1 warms up, round 6 evaluates: rounds 2-5 are timed
CLIENTS = 16
K = 8


def _train(ctx: BenchContext, name: str, procs: int, threads: int) -> float:
    """Mean wall time of the timed rounds."""
    from fedpeft_hpc.config.load import dump_yaml

    p = ctx.profile
    cfg = ctx.config(f"peft.method={p.headline_method}", f"fed.num_clients={CLIENTS}",
                     f"fed.clients_per_round={CLIENTS}",
                     f"data.synthetic_samples={CLIENTS * p.samples_per_client}", f"fed.client_batch={K}",
                     f"fed.rounds={ROUNDS}", f"run.threads={threads}", f"comm.device={ctx.device.type}",
                     "comm.timeout_s=120")
    path = cfg.run.dir.rstrip("/") + ".yaml"
    with open(path, "w") as f:
        f.write(dump_yaml(cfg))
    launcher = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={procs}"]
    res = subprocess.run([*launcher, "-m", "fedpeft_hpc", "train", path], capture_output=True, text=True,
                         env=package_env(threads), timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"ranks: {name} failed: {res.stderr[-2000:]}")
    with open(f"{cfg.run.dir}/metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return float(np.mean([r["wall_s"] for r in rows[1:-1]]))


@register_measurement("ranks")
def two_ranks(ctx: BenchContext) -> list[Row]:
    setting = f"{ctx.profile.headline_method}, {CLIENTS} clients per round, fed.client_batch={K}"
    if ctx.device.type == "cuda" and torch.cuda.device_count() < 2:
        return [Row("2 ranks / 1 rank, equal threads per rank", setting, None, ">= 1.7",
                    detail=f"not measured: {torch.cuda.device_count()} GPU (each rank needs its own)",
                    key="two_rank_speedup")]
    ctx.status("ranks: 1 process, 1 thread")
    one = _train(ctx, "1 process", 1, 1)
    ctx.status("ranks: 2 processes, 1 thread each")
    two = _train(ctx, "2 processes", 2, 1)
    ctx.status("ranks: 1 process, 2 threads")
    wide = _train(ctx, "1 process, 2 threads", 1, 2)
    return [
        Row("2 ranks / 1 rank, equal threads per rank", f"{setting}, 1 thread per rank", one / two, ">= 1.7",
            at_least(one / two, 1.7), detail=f"{one:.2f} s -> {two:.2f} s per round", key="two_rank_speedup"),
        Row("2 ranks / 1 rank using both cores", f"{setting}, 2 threads in 1 rank", wide / two, ">= 1.3",
            at_least(wide / two, 1.3), detail=f"{wide:.2f} s -> {two:.2f} s per round"),
    ]
