"""When the SLURM tests run, and the helpers they share (environment, job polling).

Bringing SLURM up (slurm/start_local_slurm.sh) writes /etc/slurm/slurm.conf, may add the host name
to /etc/hosts and starts daemons: a developer's machine must not get that from a plain `pytest`.
The tests run only
- in CI (``CI`` set): there a missing SLURM, or not being root, is a failure, never a skip;
- with ``FEDPEFT_TEST_SLURM=1`` (opt-in on a machine you may reconfigure): same, a failure;
and skip with a message otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest

from tests.conftest import REPO, subprocess_env

SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
BINARIES = ("slurmctld", "slurmd", "srun", "sbatch", "sinfo", "scontrol", "munged")
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


IN_CI = _truthy("CI")
OPTED_IN = _truthy("FEDPEFT_TEST_SLURM")
SKIP_REASON = ("" if IN_CI or OPTED_IN else
               "SLURM tests start munged/slurmctld/slurmd and rewrite /etc/slurm/slurm.conf (and /etc/hosts); "
               "they run in CI or with FEDPEFT_TEST_SLURM=1 (as root, Debian's SLURM packages: "
               "bash slurm/start_local_slurm.sh --install-only)")

# every SLURM test module: `pytestmark = SLURM_MARKS`
SLURM_MARKS = [pytest.mark.multiproc, pytest.mark.skipif(bool(SKIP_REASON), reason=SKIP_REASON or "-")]


def clean_env(**extra: str) -> dict:
    """subprocess_env (PYTHONPATH=repo, OMP_NUM_THREADS=1) without an outer job's launcher variables."""
    env = subprocess_env(**extra)
    for k in list(env):
        outer = k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "OMPI_", "PMI_", "SUBMITIT_"))
        if outer or k in LAUNCHER_VARS:
            del env[k]
    env["PATH"] = SBIN
    return env


def local_slurm():
    """Generator behind the session fixture ``slurm``: a ready single-node SLURM, or a failure saying why.
    The daemons it started are stopped afterwards (not in CI, whose machine is thrown away)."""
    missing = [b for b in BINARIES if shutil.which(b, path=SBIN) is None]
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        pytest.fail("the SLURM tests need root to start munged/slurmctld/slurmd")
    if missing:
        pytest.fail(f"SLURM is not installed (missing {' '.join(missing)}): "
                    "bash slurm/start_local_slurm.sh --install-only")
    env = {k: v for k, v in clean_env().items() if not k.startswith("OMP_")}
    res = subprocess.run(["bash", str(REPO / "slurm" / "start_local_slurm.sh")], capture_output=True,
                         text=True, timeout=120, env=env)
    assert res.returncode == 0, f"start_local_slurm.sh exited {res.returncode}\n{res.stdout}\n{res.stderr}"
    started = re.findall(r"(munged|slurmctld|slurmd): started", res.stdout)
    yield
    if started and not IN_CI and not os.environ.get("FEDPEFT_KEEP_SLURM"):
        subprocess.run(["bash", str(REPO / "slurm" / "stop_local_slurm.sh"), *started],
                       capture_output=True, timeout=60, env=clean_env())


def job_fields(job: str) -> dict:
    """``scontrol -o show job`` as a dict (empty once slurmctld forgot the job)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True,
                         env=clean_env(), timeout=30).stdout
    line = out.splitlines()[0] if out.strip() else ""
    return dict(f.split("=", 1) for f in line.split() if "=" in f)


def wait_for_job(job: str, timeout: float) -> tuple[str, str]:
    """Poll `scontrol show job` until the job ends (`sbatch --wait` polls every ~30 s, too slowly)."""
    deadline = time.monotonic() + timeout
    while True:
        fields = job_fields(job)
        if fields.get("JobState", "PENDING") not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING",
                                                     "REQUEUED"):
            return fields["JobState"], fields.get("ExitCode", "?")
        assert time.monotonic() < deadline, f"job {job} still {fields.get('JobState')} after {timeout} s"
        time.sleep(0.5)


def known_job_ids() -> set[int]:
    """Ids of every job slurmctld remembers (running, queued, or ended less than MinJobAge ago)."""
    out = subprocess.run(["scontrol", "-o", "show", "jobs"], capture_output=True, text=True, env=clean_env(),
                         timeout=30).stdout
    return {int(m) for m in re.findall(r"^JobId=(\d+)", out, flags=re.M)}
