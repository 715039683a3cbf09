"""The thin training entry point: process layout + trainer, torn down in ``finally``.

Logging is the caller's (the CLI sets it up); from the moment the run directory is opened until
the run ends, this process's log records also go to it (``train.log`` on rank 0,
``train.rank<N>.log`` on others, which get warnings and errors only), across resumes.
"""

from __future__ import annotations

import logging
import sys

from fedpeft_hpc.comm.runtime import Runtime
from fedpeft_hpc.config.schema import Config
from fedpeft_hpc.errors import UserError
from fedpeft_hpc.federated.engine import FederatedTrainer

log = logging.getLogger(__name__)


def train(cfg: Config) -> dict | None:
    """Run one federated training in this process (one rank of many, or alone).

    Returns the summary on rank 0, ``None`` on the other ranks.
    """
    with Runtime.start(cfg.comm, threads=cfg.run.threads) as rt:
        world = rt.world
        if world.world_size > 1:
            log.info("rank %d/%d (%s) on %s, backend %s", world.rank, world.world_size, world.launcher,
                     rt.device, rt.backend)
        try:
            trainer = FederatedTrainer(cfg, rt.comm)  # from here on the log also goes to run.dir
            try:
                summary = trainer.fit()
            finally:
                trainer.close()
        except UserError:
            raise
        except Exception as e:
            if world.world_size > 1:
                print(f"fedpeft-hpc: rank {world.rank} failed: {type(e).__name__}: {e}", file=sys.stderr,
                      flush=True)
            raise
        return summary if world.rank == 0 else None
