"""Cluster profiles: where a job runs and with what (partition, account, GPUs, setup lines).

A profile is a small YAML file (``slurm/clusters/example.yaml`` documents every field) so one
training config can go to different clusters unchanged. ``submit``/``sweep`` flags override
single fields (``--partition``, ``--time``, ...). The merged profile becomes submitit
parameters in ``launchers.executor``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from fedpeft_hpc.config.schema import opt
from fedpeft_hpc.errors import ConfigError, UserError
from fedpeft_hpc.utils.files import read_yaml_mapping


@dataclass
class ClusterProfile:
    partition: Optional[str] = opt(None, "sbatch --partition (default: the cluster's default partition)")
    account: Optional[str] = opt(None, "sbatch --account: the allocation the job is charged to")
    qos: Optional[str] = opt(None, "sbatch --qos: quality of service")
    constraint: Optional[str] = opt(None, "sbatch --constraint: required node features, e.g. a100")
    nodes: int = opt(1, "nodes per job", min=1)
    gpus_per_node: int = opt(0, "GPUs per node; one task (rank) runs per GPU", min=0)
    tasks_per_node: Optional[int] = opt(None, "tasks (ranks) per node; default: gpus_per_node, or 1 on CPU "
                                              "nodes", min=1)
    cpus_per_task: Optional[int] = opt(None, "CPU cores per task; with run.threads=0 also the training's "
                                             "threads per rank", min=1)
    mem_gb: Optional[float] = opt(None, "memory per node in GB (default: the partition's default)", min=0.0,
                                  min_exclusive=True)
    time_min: Optional[int] = opt(None, "time limit in minutes; near it the job requeues itself and resumes "
                                        "(default: 60 on SLURM, 7 days with the local executor)", min=1)
    signal_delay_s: int = opt(90, "the requeue signal (SIGUSR2) comes this many seconds before the time limit",
                              min=1)
    max_requeues: int = opt(3, "how often a job may requeue itself after reaching its time limit "
                               "(preemptions do not count)", min=0)
    sbatch: dict = opt(None, "extra sbatch options {name: value}, e.g. {exclusive: true, mail-type: END}",
                       factory=dict)
    srun_args: list = opt(None, "extra arguments of the srun that starts the tasks", factory=list)
    setup: list = opt(None, "shell lines run in the batch script before srun (module load ..., source "
                            "VENV/bin/activate)", factory=list)
    python: Optional[str] = opt(None, "the command that runs Python in every task on the compute nodes (submitit's "
                                      "slurm_python), e.g. /opt/env/bin/python or 'apptainer exec img.sif python'; "
                                      "default: the Python running submit/sweep")

    def limit_min(self, executor: str) -> int:
        """The time limit for ``executor``: the profile's, else 60 min on SLURM and 7 days locally (a local
        job is restarted at its limit, which only costs the rounds since the last checkpoint)."""
        if self.time_min is not None:
            return self.time_min
        return DEFAULT_TIME_MIN if executor == "slurm" else LOCAL_TIME_MIN

    @property
    def gres_gpus(self) -> int | None:
        """GPUs per node that ``sbatch: {gres: gpu[:type]:N}`` (or ``gpus-per-node``) requests; None: none."""
        return gres_gpus(self.sbatch)

    @property
    def tasks(self) -> int:
        """Tasks (ranks) per node: one per GPU (``gpus_per_node``, else the GPUs of ``sbatch.gres``) unless given."""
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        if self.gpus_per_node > 0:
            return self.gpus_per_node
        return self.gres_gpus or 1


def gres_gpus(sbatch: Mapping[str, Any]) -> int | None:
    """The GPU count of ``gres`` (``gpu``, ``gpu:4``, ``gpu:a100:4``, several comma-separated resources) or of
    ``gpus-per-node`` / ``gpus_per_node`` among extra sbatch options; ``None`` where they request none."""
    for key in ("gpus-per-node", "gpus_per_node"):
        if key in sbatch:
            text = str(sbatch[key]).rsplit(":", 1)[-1]
            return int(text) if text.isdigit() else None
    for res in str(sbatch.get("gres") or "").split(","):
        parts = res.strip().split(":")
        if parts[0] == "gpu":
            return int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
    return None


DEFAULT_TIME_MIN = 60
LOCAL_TIME_MIN = 7 * 24 * 60

# command-line flag -> profile field (flags override the profile)
FLAG_FIELDS = {"nodes": "nodes", "gpus_per_node": "gpus_per_node", "tasks_per_node": "tasks_per_node",
               "cpus_per_task": "cpus_per_task", "mem_gb": "mem_gb", "time": "time_min",
               "partition": "partition", "account": "account", "qos": "qos"}


def load_profile(path: str | Path | None) -> ClusterProfile:
    """The profile in ``path`` (YAML); ``None`` gives the defaults. Errors name the file and the key."""
    from fedpeft_hpc.config.load import build_dataclass

    if path is None:
        return ClusterProfile()
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--cluster: cluster profile {path} does not exist (see slurm/clusters/example.yaml)")
    data = read_yaml_mapping(p, "cluster profile", "fields (partition, gpus_per_node, ...)")
    try:
        profile = build_dataclass(ClusterProfile, data)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e.key}", str(e)[len(e.key) + 2:]) from None
    _check(profile, where=f"{p}: ")
    return profile


def with_flags(profile: ClusterProfile, flags: Mapping[str, Any]) -> ClusterProfile:
    """``profile`` with every flag that was given (not None) in its place, checked again."""
    from fedpeft_hpc.config.load import check_value

    changes = {}
    fields = {f.name: f for f in dataclasses.fields(ClusterProfile)}
    for flag, name in FLAG_FIELDS.items():
        value = flags.get(flag)
        if value is None:
            continue
        check_value(f"--{flag.replace('_', '-')}", value, fields[name].metadata)
        changes[name] = value
    merged = dataclasses.replace(profile, **changes)
    _check(merged, where="")
    return merged


def _check(p: ClusterProfile, where: str) -> None:
    gres = p.gres_gpus
    if gres is not None and p.gpus_per_node > 0 and gres != p.gpus_per_node:
        raise ConfigError(f"{where}gpus_per_node", f"{p.gpus_per_node} GPUs per node, but sbatch {dict(p.sbatch)} "
                                                   f"requests {gres}: give the GPUs once (gpus_per_node, or gres)")
    if gres is not None and p.tasks_per_node is not None and p.tasks_per_node != gres:
        raise ConfigError(f"{where}tasks_per_node", f"{p.tasks_per_node} tasks with {gres} GPUs per node (sbatch "
                                                    f"{dict(p.sbatch)}): every rank uses one GPU, so tasks_per_node "
                                                    "must equal the GPUs (or be left out)")
    if p.gpus_per_node > 0 and p.tasks_per_node is not None and p.tasks_per_node != p.gpus_per_node:
        raise ConfigError(f"{where}tasks_per_node",
                          f"{p.tasks_per_node} tasks with {p.gpus_per_node} GPUs per node: every rank uses one "
                          "GPU, so tasks_per_node must equal gpus_per_node (or be left out)")
    if p.signal_delay_s >= 60 * p.limit_min("slurm"):
        raise ConfigError(f"{where}signal_delay_s", f"{p.signal_delay_s} s is not shorter than the time limit "
                                                    f"({p.limit_min('slurm')} min)")
    bad = [str(x) for x in p.setup if not isinstance(x, str)] + [str(x) for x in p.srun_args
                                                                 if not isinstance(x, str)]
    if bad:
        raise ConfigError(f"{where}setup", f"setup and srun_args are lists of strings, got {bad[:3]}")
