"""Getting trainings onto a cluster: submitit jobs that requeue themselves, and sweeps.

- ``profile``: cluster profiles (partition, account, GPUs, setup lines) + command-line overrides
- ``preflight``: everything a run builds before it writes anything, checked on the login node
- ``job``: the checkpointable submitit job (one training; every task is one rank)
- ``executor``: submitit executors from a profile, and the sbatch script they would submit
- ``jobstate``: what SLURM / the local executor says about a job, robust to missing accounting
- ``submit``: ``fedpeft-hpc submit``
- ``sweep_spec``, ``runstate``, ``sweep``: ``fedpeft-hpc sweep`` (expansion, states, execution)

Nothing here is imported by the training itself except ``job`` (inside a submitit task).
"""
