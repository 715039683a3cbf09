"""Checks of a config against everything it names, without training and without writing anything.

``check_names`` asks the registries (PEFT methods, datasets) about the names a config uses; it
is cheap and runs for every command that takes a config.

``Preflight.check`` goes all the way on a login node, before anything is submitted: a job that
fails on its compute node an hour after submission (a typo in a dataset path, a checkpoint that
does not fit, a privacy target that cannot be met) costs a queue wait, and a sweep with one bad
value would cost that many times. It builds what the trainer builds before it opens the run
directory (``federated.federation.build_federation``: the model with its weights, the datasets, the
partition, the privacy calibration), checks that Opacus can wrap the model for DP-SGD, and runs
the run directory's own checks read-only (``RunDir.check``), raising the same ``UserError`` s.

Built pieces are memoised per distinct model and per distinct data, so a large grid over
methods, learning rates and seeds builds each model and dataset once. A missing
``model.checkpoint`` that ``model.pretrain_recipe`` would build is not built here (that would
write): the model is checked without its weights and the job builds them. Datasets are never
downloaded here (``data.download`` would write into ``data.root`` from the login node).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from fedpeft_hpc.config.schema import Config
from fedpeft_hpc.data import DATASETS, DataBundle, build_datasets, get_builder
from fedpeft_hpc.errors import ConfigError
from fedpeft_hpc.federated.agreement import labels_fingerprint
from fedpeft_hpc.federated.federation import build_federation
from fedpeft_hpc.models import BuiltModel, build_model
from fedpeft_hpc.peft import count_params, get_method, registered_methods
from fedpeft_hpc.runs.identity import Identity, file_fingerprint, identity_of
from fedpeft_hpc.runs.rundir import RunDir
from fedpeft_hpc.utils.files import expand_path, usable_dir_problem


def check_names(cfg: Config) -> Config:
    """``cfg`` if every registry name in it exists; a ``ConfigError`` naming the key otherwise."""
    get_method(cfg.peft.method)
    get_builder(cfg.data.name)
    return cfg


def registry_choices() -> dict[str, list[str]]:
    """Allowed values of the keys whose names live in registries (for ``config keys``)."""
    return {"peft.method": registered_methods(), "data.name": sorted(DATASETS)}


@dataclass
class Checked:
    """What the preflight learnt about one config."""

    trainable_params: int
    resumes: bool  # the run continues one in its directory (from its checkpoint, or from round 0)
    weights_built_by_job: bool  # model.pretrain_recipe will build model.checkpoint in the job
    identity: Identity | None = None  # what the run computes: config, weights, data (``runs/identity``)


def _key(*parts: Any) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


def _recipe_pending(cfg: Config) -> bool:
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

    def _model(self, cfg: Config) -> tuple[str, BuiltModel]:
        def build() -> BuiltModel:
            self.builds["model"] += 1
            return build_model(cfg.model, cfg.peft, cfg.seed, load_weights=not _recipe_pending(cfg))

        # the head init depends on the seed, nothing that can fail does
        key = _key("model", asdict(cfg.model), asdict(cfg.peft))
        return key, self._once(key, build)

    def _data(self, cfg: Config, built: BuiltModel) -> DataBundle:
        def build() -> DataBundle:
            self.builds["data"] += 1
            return build_datasets(dataclasses.replace(cfg.data, download=False), built.image, cfg.seed)

        return self._once(_key("data", asdict(cfg.data), asdict(built.image), cfg.seed), build)

    def identity(self, cfg: Config, data: DataBundle) -> Identity:
        """The run's identity; the data and the weights file are fingerprinted once each."""
        fp = self._once(_key("data_fp", id(data)),  # no image is read on the login node
                        lambda: labels_fingerprint(data.train_targets, len(data.train), len(data.test)))
        ckpt = expand_path(cfg.model.checkpoint) if cfg.model.checkpoint and cfg.model.pretrained else None
        stat = ckpt.stat() if ckpt is not None and ckpt.is_file() else None
        weights = self._once(_key("weights", str(ckpt), stat and (stat.st_size, stat.st_mtime_ns)),
                             lambda: file_fingerprint(str(ckpt)) if ckpt is not None else None)
        return identity_of(cfg, fp, weights)

    def check(self, cfg: Config, run_dir: bool = True) -> Checked:
        """Raise the ``UserError`` the training would raise before its first round; else describe it.

        ``run.dir`` must be a directory or creatable (checked first, cheaply); ``run_dir``: also check
        what it holds (resume policy, same config), read-only.
        """
        check_names(cfg)
        problem = usable_dir_problem(Path(cfg.run.dir))  # cheap: before anything is built
        if problem:
            raise ConfigError("run.dir", f"{problem}; give a directory to hold the run")
        model_key, built = self._model(cfg)
        data = self._data(cfg, built)
        fed = build_federation(cfg, torch.device("cpu"), built=built, data=data)
        if cfg.privacy.mode == "sample":  # once per model: Opacus refuses what it cannot make private
            def wrap() -> bool:
                fresh = build_model(cfg.model, cfg.peft, cfg.seed, load_weights=False).model
                fed.privacy.wrap_model(fresh)
                return True  # keep neither the model nor its wrapper

            self._once(_key("wrap", model_key), wrap)
        resumes = RunDir(cfg.run.dir, is_main=False).check(cfg) if run_dir else False
        counts = count_params(built.model)
        return Checked(trainable_params=counts["trainable_params"], resumes=resumes,
                       weights_built_by_job=_recipe_pending(cfg), identity=self.identity(cfg, data))
