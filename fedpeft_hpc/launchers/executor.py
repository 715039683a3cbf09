"""submitit executors from a cluster profile, and the sbatch script they would submit.

``slurm``: ``submitit.AutoExecutor(cluster="slurm")``; every task of a job runs under ``srun``
and is one rank (``comm.world`` reads ``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS``). ``local``:
submitit's local executor, tasks are subprocesses of this machine (``SUBMITIT_LOCAL_*``).
``debug``: in this process, one task. ``auto``: slurm where ``srun`` is on the PATH, else local.

``sbatch_preview`` renders the batch script with submitit's own template from the same
parameters, without a SLURM installation (``--dry-run`` on a laptop).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from fedpeft_hpc.errors import ConfigError, UserError
from fedpeft_hpc.launchers.profile import ClusterProfile

EXECUTORS = ("auto", "slurm", "local", "debug")


def resolve_kind(kind: str, submitting: bool = True) -> str:
    """``auto`` -> ``slurm`` where ``srun`` exists, else ``local``. Submitting to SLURM without SLURM
    fails; a preview (``submitting=False``, for --dry-run) does not need it."""
    if kind not in EXECUTORS:
        raise ConfigError("--executor", f"{kind!r} is not one of: {', '.join(EXECUTORS)}")
    if kind == "auto":
        return "slurm" if shutil.which("srun") else "local"
    if kind == "slurm" and submitting and shutil.which("srun") is None:
        raise UserError("--executor slurm: no `srun` on the PATH (is this a SLURM login node?); "
                        "use --executor local to run on this machine")
    return kind


def auto_parameters(profile: ClusterProfile, kind: str, name: str,
                    array_parallelism: int | None = None) -> dict[str, Any]:
    """``AutoExecutor.update_parameters`` arguments: generic ones plus ``slurm_``-prefixed ones."""
    if kind == "local" and profile.nodes > 1:
        raise ConfigError("--nodes", f"{profile.nodes}: the local executor runs on this machine only (1 node)")
    if kind == "debug" and (profile.nodes > 1 or profile.tasks > 1):
        raise ConfigError("--tasks-per-node", "the debug executor runs one task in this process; "
                                              "use --executor local for several tasks")
    params: dict[str, Any] = {"name": name, "timeout_min": profile.limit_min(kind), "nodes": profile.nodes,
                              "tasks_per_node": profile.tasks}
    if profile.gpus_per_node > 0:
        params["gpus_per_node"] = profile.gpus_per_node
    if profile.cpus_per_task is not None:
        params["cpus_per_task"] = profile.cpus_per_task
    if profile.mem_gb is not None:
        params["mem_gb"] = profile.mem_gb
    slurm: dict[str, Any] = {"partition": profile.partition, "account": profile.account, "qos": profile.qos,
                             "constraint": profile.constraint, "signal_delay_s": profile.signal_delay_s}
    extra = sbatch_options(profile.sbatch)
    if extra:
        slurm["additional_parameters"] = extra
    if profile.setup:
        slurm["setup"] = list(profile.setup)
    if profile.srun_args:
        slurm["srun_args"] = list(profile.srun_args)
    if array_parallelism is not None:
        slurm["array_parallelism"] = array_parallelism
    params.update({f"slurm_{k}": v for k, v in slurm.items() if v is not None})
    return params


def sbatch_options(sbatch: dict) -> dict:
    """Extra sbatch options as SLURM expects them: ``true`` a flag without value (``--exclusive``), ``false``
    and ``null`` left out (sbatch has no ``--exclusive=False``), anything else ``--name=value``."""
    return {k: v for k, v in (sbatch or {}).items() if v is not False and v is not None}


def make_executor(kind: str, folder: Path, profile: ClusterProfile, name: str,
                  array_parallelism: int | None = None):
    """A ``submitit.AutoExecutor`` for ``kind`` (slurm, local or debug) writing its files in ``folder``."""
    import submitit

    python = {"slurm_python": profile.python} if profile.python and kind == "slurm" else {}
    ex = submitit.AutoExecutor(folder=folder, cluster=kind, slurm_max_num_timeout=profile.max_requeues,
                               local_max_num_timeout=profile.max_requeues, **python)
    try:
        ex.update_parameters(**auto_parameters(profile, kind, name, array_parallelism))
    except (ValueError, NameError) as e:  # submitit checks the sbatch parameters (e.g. profile.sbatch)
        raise UserError(f"submitit refused the job parameters: {e}") from None
    return ex


@contextmanager
def submission(what: str, then: str = "") -> Iterator[None]:
    """Around ``ex.submit``/``ex.batch``: a scheduler that refuses the job (``sbatch: error: invalid
    partition ...``) or a submission command that cannot run becomes a ``UserError`` quoting it."""
    from submitit.core.utils import FailedJobError

    try:
        yield
    except (FailedJobError, subprocess.SubprocessError, OSError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"{what} was not submitted: {msg}{then}") from None


def submitit_command(folder: Path, python: str | None = None) -> str:
    """What every task runs: submitit's loader of the pickled job in ``folder`` (with ``python``, the profile's)."""
    return " ".join([python or shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def slurm_native_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """``auto_parameters`` as ``SlurmExecutor`` parameters (what AutoExecutor hands it)."""
    from submitit.slurm import slurm as submitit_slurm

    eq = submitit_slurm.SlurmExecutor._equivalence_dict()
    native = {eq.get(k, k): v for k, v in params.items() if not k.startswith("slurm_")}
    if "mem" in native:
        native["mem"] = submitit_slurm._convert_mem(native["mem"])
    native.update({k[len("slurm_"):]: v for k, v in params.items() if k.startswith("slurm_")})
    return native


def sbatch_preview(folder: Path, params: dict[str, Any], array_size: int | None = None,
                   python: str | None = None) -> str:
    """The batch script submitit would write for these parameters (array of ``array_size`` if given)."""
    from submitit.slurm import slurm as submitit_slurm

    native = slurm_native_parameters(params)
    if array_size is not None and array_size > 1:
        native["map_count"] = array_size
    try:
        return submitit_slurm._make_sbatch_string(command=submitit_command(folder, python), folder=folder, **native)
    except TypeError as e:
        raise UserError(f"submitit refused the job parameters: {e}") from None


def local_preview(params: dict[str, Any]) -> str:
    keys = ("name", "nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min")
    shown = ", ".join(f"{k}={params[k]}" for k in keys if k in params)
    return f"submitit local executor: {shown}"
