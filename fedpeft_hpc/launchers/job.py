"""The submitted job: one training, checkpointable, so a time limit or a preemption costs nothing.

submitit pickles a ``TrainJob`` (the resolved config as plain data, so the job does not depend
on the config file still being there) and every task of the job calls it: each task is one rank
of the same training (SLURM tasks under ``srun``, or the local executor's subprocesses), found by
``comm.world`` like any other launch.

Near the time limit (or on preemption) SLURM sends SIGUSR2; submitit's handler on rank 0 calls
``checkpoint()``, pickles what it returns and requeues the job. Nothing has to be saved then: the
training writes ``checkpoints/latest.safetensors`` atomically after every ``run.checkpoint_every``
rounds, and the requeued job continues from it with the run's exact resume (``run.resume=auto``),
so it ends with the state of an uninterrupted run. Work since the last checkpoint is recomputed.
"""

from __future__ import annotations

import copy

from submitit.helpers import Checkpointable, DelayedSubmission


class TrainJob(Checkpointable):
    """``fedpeft-hpc train`` as a callable: ``TrainJob(to_dict(cfg))()`` returns the summary on rank 0."""

    def __init__(self, config: dict, requeues: int = 0):
        self.config = config
        self.requeues = requeues

    @property
    def run_dir(self) -> str:
        return self.config["run"]["dir"]

    def __call__(self) -> dict | None:
        from fedpeft_hpc.comm.runtime import slurm_cpus_per_task
        from fedpeft_hpc.comm.world import detect_world
        from fedpeft_hpc.config.load import from_dict
        from fedpeft_hpc.train import train
        from fedpeft_hpc.utils.logs import setup_logging

        cfg = from_dict(copy.deepcopy(self.config))
        world = detect_world()  # this task's rank: the job is an entry point, it sets up logging
        setup_logging(cfg.run.log_level, world.rank, world.world_size)
        if self.requeues:
            cfg.run.resume = "auto"  # a requeued job continues its own run, whatever the first start allowed
        if cfg.run.threads == 0:  # the cores SLURM gave this task (recorded in the run's config.yaml)
            cfg.run.threads = slurm_cpus_per_task() or 0
        return train(cfg)

    def checkpoint(self, *args, **kwargs) -> DelayedSubmission:
        """Called by submitit on rank 0 when the job is about to be stopped: resubmit this training.
        The training state is on disk already (``checkpoints/latest.safetensors``)."""
        return DelayedSubmission(TrainJob(self.config, self.requeues + 1))

    def __repr__(self) -> str:
        return f"TrainJob(run.dir={self.run_dir!r}, requeues={self.requeues})"
