"""The run directory (see CONTRACT.md): config.yaml, metrics.jsonl, summary.json, checkpoints/.

Only rank 0 writes. Nothing already written is destroyed: a directory that holds a run
is resumed (``run.resume=auto``) or refused (``never``). A resume may change ``fed.rounds`` (extend a
finished run, or stop an interrupted one earlier) except under DP, whose noise was calibrated for
the saved total. A resume continues after the
checkpoint's round, or from round 0 when the run wrote metrics but no checkpoint yet (a
requeue before the first ``run.checkpoint_every``). The metrics rows of rounds after that
point are re-run, so they leave ``metrics.jsonl`` for ``metrics.superseded.jsonl`` (each row
marked with the round the resume started after): without DP, or with seeded noise, the re-run
computes them identically; with secret DP noise it does not, and the outputs of both runs of
those rounds were released, so the engine charges them to the accountant (``rerun_rounds``).
Earlier attempts that a sweep set aside in ``failed-N/`` (a failed run without a checkpoint,
started afresh) released rows too; ``earlier_attempts`` lists them so that a DP run charges them
as well, and a DP run refuses to start beside an attempt whose config differs (its rows were
computed otherwise, and this run's accountant could not charge them truthfully).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from fedpeft_hpc.config.load import dotted, dump_yaml, to_dict
from fedpeft_hpc.config.schema import Config
from fedpeft_hpc.errors import ConfigError, UserError
from fedpeft_hpc.runs.checkpoint import Checkpoint, checkpoint_round, load_checkpoint, save_checkpoint
from fedpeft_hpc.runs.identity import identity_of, write_identity
from fedpeft_hpc.runs.lease import check_lease, refresh_lease, release_lease, take_lease
from fedpeft_hpc.utils.files import atomic_write_json, atomic_write_text, read_jsonl, usable_dir_problem

# Keys that may differ between the saved and the resumed config.
_RESUME_FREE = ("run.", "comm.", "data.num_workers", "data.root", "data.cache_dir", "data.gpu_store_mb",
                "model.checkpoint")


class RunDir:
    def __init__(self, path: str | Path, is_main: bool = True):
        self.path = Path(path)
        self.is_main = is_main
        self.ckpt_dir = self.path / "checkpoints"
        self.latest = self.ckpt_dir / "latest.safetensors"
        self.metrics_path = self.path / "metrics.jsonl"
        self.summary_path = self.path / "summary.json"
        self.config_path = self.path / "config.yaml"
        self.superseded_path = self.path / "metrics.superseded.jsonl"

    # -- start / resume ---------------------------------------------------------------
    def check(self, cfg: Config, lease_alive: Callable[[dict], bool] | None = None) -> bool:
        """Every check of a start or resume, reading only (``fedpeft-hpc submit``/``sweep`` run them
        on the login node). Returns whether the run continues one in this directory: from
        ``checkpoints/latest.safetensors``, or (``run.resume=auto``, metrics but no checkpoint yet)
        from round 0. ``lease_alive``: how to tell whether a lease's holder lives (default: ask about it alone)."""
        problem = usable_dir_problem(self.path)
        if problem:
            raise ConfigError("run.dir", f"{problem}; give a directory to hold the run")
        check_lease(self.path, lease_alive)  # another live job or process trains here: exit 2 naming it
        has_ckpt = self.latest.is_file()
        has_run = has_ckpt or self.metrics_path.is_file() or self.summary_path.is_file()
        mode = cfg.run.resume
        if has_run and mode == "never":
            raise ConfigError("run.dir", f"{self.path} already holds a run; choose a new run.dir or set "
                                         "run.resume=auto to continue it")
        if mode == "must" and not has_ckpt:
            raise ConfigError("run.resume", f"run.resume=must but {self.latest} does not exist")
        if has_run and not has_ckpt:
            if self.summary_path.is_file():
                raise ConfigError("run.dir", f"{self.path} holds a finished run (summary.json) but no "
                                             "checkpoints/latest.safetensors; choose a new run.dir (nothing was "
                                             "overwritten)")
            if not self.config_path.is_file():
                raise ConfigError("run.dir", f"{self.path} holds metrics.jsonl but no config.yaml to check it "
                                             "against; choose a new run.dir (nothing was overwritten)")
        if has_run:
            self._check_same_run(cfg)
        if cfg.privacy.mode != "none":
            self._check_earlier_attempts(cfg)
        return has_run

    def earlier_attempts(self) -> list[tuple[str, list[int]]]:
        """``(name, rounds)`` of every attempt set aside in ``failed-N/`` (N ascending): the rounds of the rows
        it had released (its ``metrics.jsonl``). Reads only."""
        found = []
        for d in self.path.glob("failed-*"):
            suffix = d.name[len("failed-"):]
            if d.is_dir() and suffix.isdigit():
                found.append((int(suffix), d))
        return [(d.name, [int(r["round"]) for r in read_jsonl(d / "metrics.jsonl") if "round" in r])
                for _, d in sorted(found)]

    def _check_earlier_attempts(self, cfg: Config) -> None:
        for name, _ in self.earlier_attempts():
            diff = self.config_differences(cfg, self.path / name / "config.yaml")
            if diff:
                shown = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in diff[:6])
                raise ConfigError("run.dir", f"{self.path / name} holds an earlier attempt of this DP run with a "
                                             f"different config ({shown}); its released rows cannot be charged "
                                             "to this run's accountant. Use the same config, or a new run.dir "
                                             "(nothing was overwritten)")

    def rerun_rounds(self, after_round: int) -> list[int]:
        """Rounds whose outputs were released but that a resume after ``after_round`` runs again:
        the rows of ``metrics.jsonl`` past it, and the rows an earlier resume from the same point
        moved to ``metrics.superseded.jsonl`` (no checkpoint since holds their charge). Reads only."""
        rounds = [int(r["round"]) for r in read_jsonl(self.metrics_path) if int(r.get("round", 0)) > after_round]
        rounds += [int(r["round"]) for r in read_jsonl(self.superseded_path)
                   if int(r.get("superseded_at_resume_from", -1)) >= after_round and int(r["round"]) > after_round]
        return sorted(rounds)

    def resume_point(self, cfg: Config) -> Checkpoint | None:
        """Decide between a fresh start and a resume (reads only); the checkpoint to resume from
        (``None``: start at round 1, fresh or continuing a run that had no checkpoint yet)."""
        self.check(cfg)
        return load_checkpoint(self.latest) if self.latest.is_file() else None

    def start(self, cfg: Config, ckpt: Checkpoint | None) -> None:
        """Write the resolved config; move the metrics rows after the checkpoint's round (after round 0
        without one) to ``metrics.superseded.jsonl``: they are re-run. Rank 0 only."""
        if not self.is_main:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.ckpt_dir.mkdir(exist_ok=True)
        except OSError as e:
            raise ConfigError("run.dir", f"cannot create {self.path} ({e.strerror or e})") from None
        take_lease(self.path)
        atomic_write_text(self.config_path, dump_yaml(cfg))
        if not self.metrics_path.is_file():
            return
        after = ckpt.round if ckpt is not None else 0
        rows = read_jsonl(self.metrics_path)  # a killed run's torn last line goes too
        later = [{**r, "superseded_at_resume_from": after} for r in rows if r.get("round", 0) > after]
        if later:
            old = self.superseded_path.read_text() if self.superseded_path.is_file() else ""
            atomic_write_text(self.superseded_path, old + "".join(json.dumps(r) + "\n" for r in later))
        kept = [r for r in rows if r.get("round", 0) <= after]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    def config_differences(self, cfg: Config, saved: Path | None = None) -> list[tuple[str, object, object]]:
        """``(key, saved, new)`` for every key where ``cfg`` differs from the saved ``config.yaml`` (or
        ``saved``), ignoring the keys a resume may change (``run.*``, ``comm.*``, paths). Empty without one."""
        import yaml

        path = saved if saved is not None else self.config_path
        if not path.is_file():
            return []
        try:
            old = dotted(yaml.safe_load(path.read_text()) or {})
        except yaml.YAMLError:
            raise UserError(f"{path} is not valid YAML; cannot check the resumed run") from None
        new = dotted(to_dict(cfg))
        return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
                if not k.startswith(_RESUME_FREE) and old.get(k) != new.get(k)]

    def _check_same_run(self, cfg: Config) -> None:
        diff = self.config_differences(cfg)
        if [k for k, _, _ in diff] == ["fed.rounds"]:
            self._check_extension(cfg, diff[0][1])
            return
        if diff:
            shown = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in diff[:6])
            raise ConfigError(diff[0][0], f"{self.path} holds a run with a different config ({shown}); "
                                          "choose a new run.dir or use the same config to resume")

    def write_planned_config(self, cfg: Config) -> None:
        """``submit``/``sweep``: the resolved config of a run whose job waits in the queue (``status`` shows its
        rounds); a config already there is the run's own and is never replaced here."""
        if self.is_main and not self.config_path.is_file():
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.config_path, dump_yaml(cfg))

    def write_identity(self, cfg: Config, data_fingerprint: int) -> None:
        """``identity.json``: what this run computes (``runs/identity``), for sweeps and reports."""
        if self.is_main:
            write_identity(self.path, identity_of(cfg, data_fingerprint))

    def refresh_lease(self) -> None:
        if self.is_main:
            refresh_lease(self.path)

    def release_lease(self) -> None:
        if self.is_main:
            release_lease(self.path)

    def _check_extension(self, cfg: Config, saved_rounds) -> None:
        """A finished or interrupted run continued to another ``fed.rounds`` (nothing in a round depends
        on the total without DP, so it ends as an uninterrupted run of that many rounds would). Under DP
        the noise was calibrated for the saved total: more rounds spend more than its epsilon says."""
        if cfg.privacy.mode != "none":
            raise ConfigError("fed.rounds", f"{self.path} holds a DP run planned for {saved_rounds} rounds; its noise "
                                            f"was calibrated for them, so {cfg.fed.rounds} rounds would spend more "
                                            "privacy than its epsilon says. Start a new run.dir with "
                                            f"fed.rounds={cfg.fed.rounds} (nothing was changed)")
        done = checkpoint_round(self.latest) if self.latest.is_file() else 0
        if cfg.fed.rounds < done:
            raise ConfigError("fed.rounds", f"{cfg.fed.rounds}: {self.path} already holds {done} rounds (its "
                                            f"checkpoint); give fed.rounds >= {done} to continue it")

    def log_path(self, rank: int) -> Path:
        """``train.log`` for rank 0, ``train.rank<N>.log`` for the others."""
        return self.path / ("train.log" if rank == 0 else f"train.rank{rank}.log")

    # -- writing ---------------------------------------------------------------------------
    def write_json(self, name: str, obj) -> None:
        if self.is_main:
            atomic_write_json(self.path / name, obj)

    def write_summary(self, summary: dict) -> None:
        self.write_json("summary.json", summary)

    def save(self, ckpt: Checkpoint, keep: int) -> None:
        if not self.is_main:
            return
        path = self.ckpt_dir / f"round_{ckpt.round:05d}.safetensors"
        if keep > 0:
            save_checkpoint(path, ckpt)
            olds = sorted(self.ckpt_dir.glob("round_*.safetensors"))
            for old in olds[:-keep]:
                old.unlink()
        save_checkpoint(self.latest, ckpt)
