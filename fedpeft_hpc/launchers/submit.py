"""``fedpeft-hpc submit CONFIG [key=value ...]``: one training as a submitit job.

The config is resolved and checked fully (``Preflight``: model, weights, data, partition,
privacy, the run directory) before anything is submitted; bad input exits 2 and submits
nothing, and so does a run directory leased by a live job (``runs/lease``: the submitted job
holds the lease from here on, so a second submission is refused while the first is queued or
running). The job's batch script, pickles and logs go to ``run.dir/slurm/``. With ``--wait`` the
command follows the job through requeues and ends with 0 when the run wrote its summary, 1
otherwise; the state SLURM reports is shown but not trusted alone (see ``jobstate``: one
``squeue`` every 30 s or more, the run directory in between). "Wrote its summary" means
``summary.json`` is not the file that was there before the submission (another inode, size or
modification time), or the job's own result says success; the login node's clock is not
compared with the file server's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fedpeft_hpc.config.schema import Config
from fedpeft_hpc.launchers.profile import ClusterProfile


def submit(cfg: Config, profile: ClusterProfile, executor: str = "auto", wait: bool = False,
           dry_run: bool = False, echo=print) -> int:
    from fedpeft_hpc.config.load import to_dict
    from fedpeft_hpc.launchers.executor import (auto_parameters, local_preview, make_executor, resolve_kind,
                                                sbatch_preview)
    from fedpeft_hpc.launchers.executor import submission
    from fedpeft_hpc.launchers.jobstate import JobRef, outcome, wait_for
    from fedpeft_hpc.launchers.job import TrainJob
    from fedpeft_hpc.preflight import Preflight
    from fedpeft_hpc.launchers.runstate import read_summary, summary_signature
    from fedpeft_hpc.launchers.timebudget import budget_warning
    from fedpeft_hpc.runs.lease import lease_for_submission
    from fedpeft_hpc.runs.rundir import RunDir

    run_dir = Path(cfg.run.dir).expanduser().resolve()
    cfg.run.dir = str(run_dir)  # the job may start in another directory (profile setup lines)
    checked = Preflight().check(cfg)  # raises UserError before anything is submitted
    kind = resolve_kind(executor, submitting=not dry_run)
    folder = run_dir / "slurm"
    name = f"fedpeft-{run_dir.name}"
    params = auto_parameters(profile, kind, name)
    what = (f"{cfg.peft.method} on {cfg.data.name}: {checked.trainable_params:,} trainable parameters, "
            f"{profile.nodes} node(s) x {profile.tasks} task(s)")
    echo(f"run {run_dir}: {what}" + (" (continues the run in it)" if checked.resumes else ""))
    warning = budget_warning(profile, kind, cfg, run_dir)
    if warning:
        echo(warning, file=sys.stderr)
    if checked.weights_built_by_job:
        echo(f"model.checkpoint {cfg.model.checkpoint} does not exist yet: the job builds it "
             f"(model.pretrain_recipe={cfg.model.pretrain_recipe})")
    if dry_run:
        echo(sbatch_preview(folder, params, python=profile.python) if kind == "slurm" else local_preview(params))
        echo(f"every task runs TrainJob(run.dir={run_dir}): one rank of `fedpeft-hpc train` with the resolved "
             "config")
        echo("dry run: nothing was submitted")
        return 0

    ex = make_executor(kind, folder, profile, name)
    before = summary_signature(run_dir)
    with submission(f"job {name}"):
        job = ex.submit(TrainJob(to_dict(cfg)))
    if kind == "debug":
        summary = job.result()
        echo(json.dumps(summary))
        return 0
    ref = JobRef(kind, str(job.job_id), str(folder))
    lease_for_submission(run_dir, kind, ref.job_id, folder)  # a second submission is refused while this job lives
    RunDir(run_dir).write_planned_config(cfg)
    out, err = ref.log_paths()
    echo(f"submitted {kind} job {ref.job_id}")
    echo(f"logs: {out}\n      {err}")
    echo(f"run dir: {run_dir}")
    if not wait:
        return 0
    shown = {"done": "run finished (summary.json written)", None: "ended"}
    final = wait_for({"job": ref}, on_change=lambda _, state: echo(f"job {ref.job_id}: {shown.get(state, state)}"),
                     done=lambda _: summary_signature(run_dir) != before)
    summary = read_summary(run_dir)
    fresh = summary is not None and (summary_signature(run_dir) != before or outcome(ref) == "success")
    if fresh:
        echo(json.dumps(summary))
        return 0
    echo(f"job {ref.job_id} ended ({final.get('job') or 'state unknown'}) without writing {run_dir}/summary.json; "
         f"see {err}", file=sys.stderr)
    return 1

