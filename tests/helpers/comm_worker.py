"""Worker for tests/test_comm.py: one rank of a small job started by torchrun or mpiexec.

    python tests/helpers/comm_worker.py OUT_DIR [--backend gloo|mpi|auto] [--fail-rank R] [--hang-rank R]
                                        [--timeout S] [--collective-timeout S] [--numel N]

Each rank all-reduces rank-dependent fp64 data through Runtime/Communicator and writes
OUT_DIR/rank{R}.json. With --fail-rank R, rank R exits abruptly (os._exit(1)) after the
process group is up, while the others enter the aggregation; with --hang-rank R, rank R
sleeps instead of joining. A rank that sees the
CollectiveError writes OUT_DIR/error{rank}.txt and exits with status 3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from fedpeft_hpc.comm import CollectiveError, Runtime
from fedpeft_hpc.config.schema import CommConfig


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("--backend", default="auto")
    p.add_argument("--fail-rank", type=int, default=-1)
    p.add_argument("--hang-rank", type=int, default=-1)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--collective-timeout", type=float, default=0.0,
                   help="after start-up, tighten the collective timeout to this (0: keep --timeout); "
                        "a short --timeout alone could fail the rendezvous of a rank slow to start")
    p.add_argument("--numel", type=int, default=1000)
    a = p.parse_args()

    cfg = CommConfig(backend=a.backend, timeout_s=a.timeout, device="cpu")
    with Runtime.start(cfg) as rt:
        rank, w = rt.world.rank, rt.world.world_size
        comm = rt.comm
        comm.barrier()
        if a.collective_timeout > 0:
            comm.timeout_s = a.collective_timeout
            if rt.backend == "gloo":
                from datetime import timedelta

                from torch.distributed.distributed_c10d import _set_pg_timeout

                _set_pg_timeout(timedelta(seconds=a.collective_timeout))
        if a.fail_rank >= 0 or a.hang_rank >= 0:
            if rank == a.fail_rank:
                os._exit(1)
            if rank == a.hang_rank:
                time.sleep(3600)  # alive but never joins the collective
            time.sleep(0.5)  # let the peer be gone before the collective starts
            try:
                comm.allreduce_sum_(torch.zeros(a.numel, dtype=torch.float64))
            except CollectiveError as e:
                with open(os.path.join(a.out_dir, f"error{rank}.txt"), "w") as f:
                    f.write(str(e))
                sys.stderr.write(f"CollectiveError: {e}\n")
                sys.stderr.flush()
                return 3
            return 0

        buf = torch.arange(a.numel, dtype=torch.float64) * (rank + 1) + rank
        out = comm.allreduce_sum_(buf)
        res = {
            "rank": rank, "world_size": w, "launcher": rt.world.launcher, "backend": rt.backend,
            "local_rank": rt.world.local_rank, "local_world_size": rt.world.local_world_size,
            "same_object": out is buf, "result": buf.tolist(), "threads": torch.get_num_threads(),
            "calls": comm.call_count("aggregate"), "last": comm.last["aggregate"].as_dict(),
            "totals": {k: v.as_dict() for k, v in comm.totals.items()},
        }
    # after close(): the process group is gone and a second close is harmless
    rt.close()
    with open(os.path.join(a.out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    return 0


def submitit_task() -> dict:
    """One task of a submitit job (tests/test_comm.py): all-reduce, return what this rank saw."""
    with Runtime.start(CommConfig(backend="gloo", timeout_s=60, device="cpu")) as rt:
        buf = torch.full((4,), float(rt.world.rank + 1), dtype=torch.float64)
        rt.comm.allreduce_sum_(buf)
        return {"rank": rt.world.rank, "world_size": rt.world.world_size, "launcher": rt.world.launcher,
                "backend": rt.backend, "result": buf.tolist(), "calls": rt.comm.call_count("aggregate")}


if __name__ == "__main__":
    sys.exit(main())
