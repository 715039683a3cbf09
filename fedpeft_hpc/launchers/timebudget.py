"""Whether a job's allocations can hold its run: ``time_min x (max_requeues + 1)`` against the time the run
still needs, at a rate measured on this cluster (the run's own rounds, else those of a comparable run:
same method, model and data). Without a measured rate nothing is estimated and nothing is said.

A 20-hour fine-tuning with ``--time 240`` and ``max_requeues: 3`` gets 16 hours and then stops; it
resumes from its checkpoint when submitted again, but nobody had planned for that.
"""

from __future__ import annotations

from pathlib import Path
from statistics import median
from typing import Iterable

from fedpeft_hpc.config.schema import Config
from fedpeft_hpc.launchers.profile import ClusterProfile
from fedpeft_hpc.utils.files import read_jsonl


def round_seconds(run_dir: Path) -> float | None:
    """The median wall time of a round in ``run_dir`` (``wall_s`` of ``metrics.jsonl``), if any was released."""
    walls = [float(r["wall_s"]) for r in read_jsonl(Path(run_dir) / "metrics.jsonl")
             if isinstance(r.get("wall_s"), (int, float))]
    return median(walls) if walls else None


def budget_warning(profile: ClusterProfile, kind: str, cfg: Config, run_dir: Path,
                   comparable: Iterable[Path] = ()) -> str | None:
    """A warning when the run's remaining rounds at the measured rate exceed what its job may use."""
    if kind != "slurm":
        return None
    done = len(read_jsonl(Path(run_dir) / "metrics.jsonl"))
    rate, source = round_seconds(run_dir), str(run_dir)
    if rate is None:
        for other in comparable:
            rate, source = round_seconds(other), str(other)
            if rate is not None:
                break
    if rate is None:
        return None
    need_min = rate * max(0, cfg.fed.rounds - done) / 60
    budget_min = profile.limit_min(kind) * (profile.max_requeues + 1)
    if need_min <= budget_min:
        return None
    return (f"warning: {run_dir.name} needs about {need_min / 60:.1f} h ({cfg.fed.rounds - done} rounds at "
            f"{rate:.0f} s measured in {source}), but its job may run {profile.limit_min(kind)} min x "
            f"(max_requeues {profile.max_requeues} + 1) = {budget_min / 60:.1f} h; it stops before the run ends "
            "(raise --time or max_requeues in the profile, or submit it again to continue)")
