"""Getting trainings onto a cluster: submitit jobs that requeue themselves, and sweeps.

- ``profile``: cluster profiles (partition, account, GPUs, setup lines) + command-line overrides
- ``job``: the checkpointable submitit job (one training; every task is one rank)
- ``executor``: submitit executors from a profile, and the sbatch script they would submit
- ``jobstate``: what SLURM / the local executor says about jobs (one ``squeue`` for all), ``--wait``
- ``submit``: ``fedpeft-hpc submit`` (configs are checked first by ``fedpeft_hpc.preflight``)
- ``sweep_spec``, ``sweep_plan``, ``runstate``, ``sweep``: ``fedpeft-hpc sweep`` (expansion, the plan with
  runs matched by identity, states, execution); ``timebudget``: will the job's allocations hold the run

Nothing here is imported by the training itself except ``job`` (inside a submitit task).
"""
