"""Peak memory of a run against the size of its population, with local parts (the client-state store).

Trains the quickstart model with a local head (``peft.method=bias peft.local=[head]``), 100 clients per
round for 3 rounds, once with a population of 100 clients and once with 100,000, each in a fresh process.
Both build the same synthetic training set (100,000 samples: one per client in the large population); the
small population trains on a seeded subsample of 1,000 of them (10 per client: a row map into the same
decoded images, so both hold the same data in memory and train about as many samples per round). It prints one JSON object: each run's peak RSS (``ru_maxrss`` of that process), wall time and
the store's logical and allocated bytes, and ``rss_ratio`` = peak(100,000) / peak(100). The issue's bar is
``rss_ratio <= 1.5``.

    nice -n 19 python tools/population_memory.py [--populations 100 100000] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# run in a fresh interpreter: its children's peak RSS is the training process's alone
_MEASURE = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def run_one(population: int, out: Path, per_round: int, rounds: int, samples: int, train_samples: int) -> dict:
    run_dir = out / f"clients_{population}"
    cmd = [sys.executable, "-m", "fedpeft_hpc", "train", str(REPO / "configs" / "quickstart.yaml"),
           f"run.dir={run_dir}", "run.progress=false", "run.threads=1", "peft.method=bias", "peft.local=[head]",
           "data.name=synthetic", f"data.synthetic_samples={samples}", "data.partition=iid", "data.min_samples=1",
           f"data.max_train_samples={train_samples}",
           f"fed.num_clients={population}", f"fed.clients_per_round={per_round}", f"fed.rounds={rounds}",
           "fed.local_epochs=1", f"eval.every={rounds}"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"population {population}: training failed:\n{res.stderr[-3000:]}")
    state = os.stat(run_dir / "client_state" / "state.f32")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"population": population, "peak_rss_mb": int(res.stdout.split()[-1]) / 1024, "wall_s": round(wall, 1),
            "store_logical_mb": state.st_size / 1e6, "store_allocated_mb": state.st_blocks * 512 / 1e6,
            "partition_json_mb": os.path.getsize(run_dir / "partition.json") / 1e6,
            "final_acc": summary["final_acc"], "local_params": summary["local_params"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--populations", type=int, nargs=2, default=[100, 100_000], metavar=("SMALL", "LARGE"))
    ap.add_argument("--per-round", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=100_000, help="synthetic training samples (both runs build them)")
    ap.add_argument("--small-samples", type=int, default=1_000,
                    help="training samples the small population uses (a subsample of --samples)")
    ap.add_argument("--out", type=Path, default=None, help="where the two runs are written (default: a temp dir)")
    args = ap.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="population_memory_"))
    small = run_one(args.populations[0], out, args.per_round, args.rounds, args.samples, args.small_samples)
    large = run_one(args.populations[1], out, args.per_round, args.rounds, args.samples, args.samples)
    print(json.dumps({"small": small, "large": large, "rss_ratio": large["peak_rss_mb"] / small["peak_rss_mb"],
                      "out": str(out)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
