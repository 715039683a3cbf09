"""The run directory (see CONTRACT.md): config.yaml, metrics.jsonl, summary.json, checkpoints/.

Only rank 0 writes. Nothing already written is destroyed: a directory that holds a run
is resumed (``run.resume=auto``) or refused (``never``); metrics after the checkpoint
round are dropped on resume because they are recomputed identically.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedpeft_hpc.config.load import dump_yaml, to_dict
from fedpeft_hpc.config.schema import Config
from fedpeft_hpc.errors import ConfigError, UserError
from fedpeft_hpc.runs.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedpeft_hpc.runs.files import atomic_write_json, atomic_write_text, read_jsonl

# Keys that may differ between the saved and the resumed config.
_RESUME_FREE = ("run.", "comm.", "data.num_workers", "data.root", "data.cache_dir", "data.gpu_store_mb",
                "model.checkpoint")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "kwargs":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class RunDir:
    def __init__(self, path: str | Path, is_main: bool = True):
        self.path = Path(path)
        self.is_main = is_main
        self.ckpt_dir = self.path / "checkpoints"
        self.latest = self.ckpt_dir / "latest.safetensors"
        self.metrics_path = self.path / "metrics.jsonl"
        self.summary_path = self.path / "summary.json"
        self.config_path = self.path / "config.yaml"

    # -- start / resume ---------------------------------------------------------------
    def open(self, cfg: Config) -> Checkpoint | None:
        """Decide between a fresh start and a resume; returns the checkpoint to resume from."""
        has_ckpt = self.latest.is_file()
        has_run = has_ckpt or self.metrics_path.is_file() or self.summary_path.is_file()
        mode = cfg.run.resume
        if has_run and mode == "never":
            raise ConfigError("run.dir", f"{self.path} already holds a run; choose a new run.dir or set "
                                         "run.resume=auto to continue it")
        if mode == "must" and not has_ckpt:
            raise ConfigError("run.resume", f"run.resume=must but {self.latest} does not exist")
        if has_run and not has_ckpt:
            raise ConfigError("run.dir", f"{self.path} holds metrics of a run but no checkpoints/latest.safetensors "
                                         "to resume from; choose a new run.dir (nothing was overwritten)")
        ckpt = None
        if has_ckpt:
            self._check_same_run(cfg)
            ckpt = load_checkpoint(self.latest)
        if self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            self.ckpt_dir.mkdir(exist_ok=True)
            atomic_write_text(self.config_path, dump_yaml(cfg))
            if ckpt is not None:
                rows = [r for r in read_jsonl(self.metrics_path) if r.get("round", 0) <= ckpt.round]
                atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
        return ckpt

    def _check_same_run(self, cfg: Config) -> None:
        import yaml

        if not self.config_path.is_file():
            return
        try:
            old = _flat(yaml.safe_load(self.config_path.read_text()) or {})
        except yaml.YAMLError:
            raise UserError(f"{self.config_path} is not valid YAML; cannot check the resumed run") from None
        new = _flat(to_dict(cfg))
        diff = sorted(k for k in set(old) | set(new)
                      if not k.startswith(_RESUME_FREE) and old.get(k) != new.get(k))
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
            raise ConfigError(diff[0], f"{self.path} holds a run with a different config ({shown}); "
                                       "choose a new run.dir or use the same config to resume")

    # -- writing ---------------------------------------------------------------------------
    def append_metrics(self, row: dict) -> None:
        if self.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()

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
