"""The thin training entry point: process layout + engine, torn down in ``finally``."""

from __future__ import annotations

import logging
import sys

from fedpeft_hpc.config.schema import Config

log = logging.getLogger(__name__)


def train(cfg: Config) -> dict | None:
    """Run one federated training in this process (one rank of many, or alone).

    Returns the summary on rank 0, ``None`` on the other ranks.
    """
    from fedpeft_hpc.cli import setup_logging
    from fedpeft_hpc.comm import Runtime
    from fedpeft_hpc.errors import UserError
    from fedpeft_hpc.federated.engine import Env, FederatedRun

    with Runtime.start(cfg.comm, threads=cfg.run.threads) as rt:
        setup_logging(cfg.run.log_level, rt.is_main)
        if rt.world.world_size > 1:
            log.info("rank %d/%d (%s) on %s, backend %s", rt.world.rank, rt.world.world_size, rt.world.launcher,
                     rt.device, rt.backend)
        env = Env(rank=rt.world.rank, world_size=rt.world.world_size, device=rt.device, comm=rt.comm,
                  backend=rt.backend)
        try:
            summary = FederatedRun(cfg, env).run()
        except UserError:
            raise
        except Exception as e:
            if rt.world.world_size > 1:
                print(f"fedpeft-hpc: rank {rt.world.rank} failed: {type(e).__name__}: {e}", file=sys.stderr,
                      flush=True)
            raise
        return summary if rt.is_main else None
