"""Check a config fully on the login node, before anything is submitted, without writing anything.

A job that fails on its compute node an hour after submission (a typo in a dataset path, a
checkpoint that does not fit, a privacy target that cannot be met) costs a queue wait; a sweep
with one bad value would cost that many times. ``Preflight.check`` builds what
``FederatedRun.__init__`` builds before it opens the run directory (the model with its weights,
the datasets, the partition, the privacy calibration) and raises the same ``UserError`` s, then
runs the run directory's own checks read-only (``RunDir.check``).

Built pieces are memoised per distinct model and per distinct data, so a large grid over
methods, learning rates and seeds builds each model and dataset once. A missing
``model.checkpoint`` that ``model.pretrain_recipe`` would build is not built here (that would
write): the model is checked without its weights and the job builds them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable

from fedpeft_hpc.config.schema import Config
from fedpeft_hpc.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Checked:
    """What the preflight learnt about one config."""

    trainable_params: int
    total_params: int
    bytes_per_transfer: int
    num_clients: int
    resumes: bool  # the run directory holds a checkpoint this run will continue from
    weights_built_by_job: bool  # model.pretrain_recipe will build model.checkpoint in the job


def _key(*parts: Any) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


def _recipe_pending(cfg: Config) -> bool:
    from fedpeft_hpc.models.backbone import expand_path

    m = cfg.model
    return bool(m.pretrain_recipe and m.pretrained and m.checkpoint and not expand_path(m.checkpoint).is_file())


class Preflight:
    """Memoising checker; one instance per ``submit``/``sweep`` command."""

    def __init__(self) -> None:
        self._memo: dict[str, tuple[bool, Any]] = {}
        self.builds: dict[str, int] = {"model": 0, "data": 0}  # how often something was really built

    def _once(self, key: str, build: Callable[[], Any]) -> Any:
        """``build()`` once per key; its result, or the same error again, for every later caller."""
        if key not in self._memo:
            try:
                self._memo[key] = (True, build())
            except Exception as e:
                self._memo[key] = (False, e)
        ok, value = self._memo[key]
        if not ok:
            raise value
        return value

    # -- the pieces, in the engine's order --------------------------------------------------
    def _model(self, cfg: Config) -> tuple[str, dict]:
        def build() -> dict:
            from fedpeft_hpc.models import build_model
            from fedpeft_hpc.peft import count_params

            self.builds["model"] += 1
            pending = _recipe_pending(cfg)
            model, spec = build_model(cfg.model, cfg.peft, cfg.seed, load_weights=not pending)
            out = {"spec": spec, "counts": count_params(model), "pending": pending}
            if cfg.privacy.mode == "sample":
                out["model"] = model  # DP-SGD checks that Opacus can wrap it (once, below)
            return out

        # the head init depends on the seed, nothing that can fail does
        key = _key("model", asdict(cfg.model), asdict(cfg.peft), cfg.privacy.mode == "sample")
        return key, self._once(key, build)

    def _data(self, cfg: Config, spec) -> Any:
        def build():
            from fedpeft_hpc.data import build_datasets

            self.builds["data"] += 1
            return build_datasets(cfg.data, spec, cfg.seed)

        return self._once(_key("data", asdict(cfg.data), asdict(spec), cfg.seed), build)

    def check(self, cfg: Config, run_dir: bool = True) -> Checked:
        """Raise the ``UserError`` the training would raise before its first round; else describe it.

        ``run_dir``: also check ``run.dir`` (resume policy, same config), read-only.
        """
        import numpy as np
        import torch

        from fedpeft_hpc.data import make_partition
        from fedpeft_hpc.federated.sampling import Schedule
        from fedpeft_hpc.privacy import build_privacy
        from fedpeft_hpc.runs.rundir import RunDir

        model_key, model = self._model(cfg)
        data = self._data(cfg, model["spec"])
        if data.num_classes > cfg.model.num_classes:
            raise ConfigError("model.num_classes", f"{cfg.model.num_classes} is fewer than the "
                                                   f"{data.num_classes} classes of data.name={cfg.data.name}")
        parts = make_partition(cfg.data, data.train_targets, cfg.fed.num_clients, cfg.seed)
        sizes = np.array([len(p) for p in parts], dtype=np.int64)
        schedule = Schedule(cfg.seed, cfg.fed.num_clients, cfg.fed.clients_per_round, cfg.fed.dropout)
        privacy = build_privacy(cfg, client_sizes=sizes, schedule=schedule, seed=cfg.seed,
                                device=torch.device("cpu"))
        if cfg.privacy.mode == "sample":  # once per model; a failure is raised again for every run
            def wrap() -> bool:
                privacy.wrap_model(model.pop("model"))  # Opacus refuses what it cannot make private
                return True  # keep neither the model nor its wrapper

            self._once(_key("wrap", model_key), wrap)
        resumes = RunDir(cfg.run.dir, is_main=False).check(cfg) if run_dir else False
        counts = model["counts"]
        return Checked(trainable_params=counts["trainable_params"], total_params=counts["total_params"],
                       bytes_per_transfer=counts["bytes_per_transfer"], num_clients=len(parts),
                       resumes=resumes, weights_built_by_job=model["pending"])
