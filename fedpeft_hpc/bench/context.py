"""What every measurement of a bench run shares: the device, the suite's profile, configs, timing.

A *profile* fixes, per (device, suite), the model and the sizes measured: on CPU the quick
suite uses the quickstart ViT (0.14M parameters, 16 px) so it finishes in minutes on a
laptop, the full suite ViT-tiny (5.4M, 32 px); on CUDA both use the paper's ViT-B/16 at
224 px with client batch 16 and 32 clients per rank, under bf16 autocast (``model.precision``).
Models are randomly initialised: throughput does not depend on the weights.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from fedpeft_hpc.federated.memory import synchronize

log = logging.getLogger(__name__)

METHODS = ("head", "bias", "adapter", "prompt", "lora")
HEADLINE_METHOD = "bias"  # the CONTRACT keys are measured with BitFit, the paper's main method


@dataclass(frozen=True)
class Profile:
    title: str
    model: tuple  # config overrides that choose the model
    precision: str
    batch: int  # client batch B
    clients: tuple  # clients per rank measured for the headline method
    methods: tuple  # methods measured at ``headline_clients`` (and at every ``clients`` when in ``all_k``)
    all_k: tuple
    headline_clients: int
    steps: int  # local steps per client in the client-throughput measurement
    repeats: int
    samples_per_client: int  # per client in the round measurements
    hosted: tuple = (10, 1000)
    hosted_samples: int = 4000
    headline_method: str = HEADLINE_METHOD  # the method of the CONTRACT keys


# ``fedpeft-hpc bench --model NAME``: the models a profile can be pointed at
MODELS = {
    "quickstart": (),
    "vit_tiny": ("model.img_size=32", "model.kwargs={patch_size: 4}"),
    "vit_base": ("model.name=vit_base_patch16_224", "model.img_size=224", "model.kwargs={}", "model.num_classes=100"),
}
KNOBS = ("method", "clients", "batch_size", "precision", "model", "steps")


def with_knobs(profile: Profile, method: Optional[str] = None, clients: Optional[int] = None,
               batch_size: Optional[int] = None, precision: Optional[str] = None, model: Optional[str] = None,
               steps: Optional[int] = None) -> Profile:
    """``profile`` narrowed to the settings given on the command line (``None``: the profile's own)."""
    from fedpeft_hpc.errors import ConfigError
    from fedpeft_hpc.models.precision import PRECISIONS

    changes: dict = {}
    if method is not None:
        if method not in METHODS:
            raise ConfigError("--method", f"{method!r}: one of {', '.join(METHODS)}")
        changes.update(methods=(method,), all_k=(method,), headline_method=method)
    if clients is not None:
        if clients < 1:
            raise ConfigError("--clients", f"must be >= 1, got {clients}")
        changes.update(clients=(clients,), headline_clients=clients)
    for flag, value in (("--batch-size", batch_size), ("--steps", steps)):
        if value is not None and value < 1:
            raise ConfigError(flag, f"must be >= 1, got {value}")
    if batch_size is not None:
        changes["batch"] = batch_size
    if steps is not None:
        changes["steps"] = steps
    if precision is not None:
        if precision not in PRECISIONS:
            raise ConfigError("--precision", f"{precision!r}: one of {', '.join(PRECISIONS)}")
        changes["precision"] = precision
    if model is not None:
        if model not in MODELS:
            raise ConfigError("--model", f"{model!r}: one of {', '.join(MODELS)}")
        changes["model"] = MODELS[model]
    if not changes:
        return profile
    what = ", ".join(f"{k}={v}" for k, v in (("method", method), ("model", model), ("precision", precision),
                                               ("clients", clients), ("batch", batch_size), ("steps", steps))
                     if v is not None)
    return dataclasses.replace(profile, title=f"{profile.title} [{what}]", **changes)


_VIT_B = ("model.name=vit_base_patch16_224", "model.img_size=224", "model.kwargs={}", "model.num_classes=100")
PROFILES = {
    ("cpu", "quick"): Profile("quickstart ViT (d64, 4 blocks, 16 px; 0.14M params), fp32", (), "fp32", 16,
                              (8, 32, 128), METHODS, (HEADLINE_METHOD,), 32, 2, 5, 64),
    ("cpu", "full"): Profile("ViT-tiny (32 px, patch 4; 5.4M params), fp32",
                             ("model.img_size=32", "model.kwargs={patch_size: 4}"), "fp32", 16, (8, 32, 128),
                             METHODS, METHODS, 32, 2, 2, 64),
    ("cuda", "quick"): Profile("ViT-B/16 (224 px; 86M params), bf16 autocast", _VIT_B, "bf16", 16, (32,), METHODS,
                               (HEADLINE_METHOD,), 32, 2, 3, 64, hosted_samples=2000),
    ("cuda", "full"): Profile("ViT-B/16 (224 px; 86M params), bf16 autocast", _VIT_B, "bf16", 16, (8, 32, 128),
                              METHODS, METHODS, 32, 2, 3, 64, hosted_samples=2000),
}

# what every bench config shares: synthetic in-memory data split evenly, no evaluation inside the measured rounds
BASE = ("model.pretrained=false", "model.checkpoint=null", "model.pretrain_recipe=null",
        "data.name=synthetic", "data.partition=iid", "data.min_samples=1",
        "data.synthetic_test_samples=64", "run.progress=false", "eval.every=1000000", "fed.rounds=1000000",
        "fed.local_epochs=1", "fed.dropout=0", "privacy.mode=none", "server.optimizer=fedavg", "optim.name=sgd")


class BenchContext:
    def __init__(self, suite: str, device: torch.device, workdir: Path, status: Optional[Callable[[str], None]] = None,
                 profile_ops: bool = False, knobs: Optional[dict] = None):
        self.suite = suite
        self.device = torch.device(device)
        self.profile = with_knobs(PROFILES[(self.device.type, suite)], **(knobs or {}))
        self.workdir = Path(workdir)
        self._status = status
        self.profile_ops = profile_ops
        self.profiles: list[str] = []  # op profiles of targets not reached (``--profile``)
        self._models: dict = {}
        self._ids = itertools.count()

    # -- configs and models --------------------------------------------------------------
    def overrides(self, *extra: str) -> list[str]:
        return [*BASE, *self.profile.model, f"model.precision={self.profile.precision}",
                f"data.batch_size={self.profile.batch}", *extra]

    def config(self, *extra: str):
        from fedpeft_hpc.config import load_config
        from fedpeft_hpc.quickstart import embedded_config

        return load_config(embedded_config(), [f"run.dir={self.new_dir()}", *self.overrides(*extra)])

    def new_dir(self) -> Path:
        return self.workdir / f"run{next(self._ids):03d}"

    def model(self, method: str):
        """``(model, layout, start, cfg)`` for ``method`` on the device, built once per run."""
        if method not in self._models:
            from fedpeft_hpc.peft.state import FlatLayout
            from fedpeft_hpc.models import build_model
            from fedpeft_hpc.models.device_fixes import apply_device_fixes
            from fedpeft_hpc.peft import peft_params

            cfg = self.config(f"peft.method={method}")
            built = build_model(cfg.model, cfg.peft, cfg.seed, load_weights=False)
            model, spec = built.model.to(self.device), built.image
            apply_device_fixes(model, self.device)
            params = peft_params(model)
            layout = FlatLayout(params)
            self._models[method] = (model, layout, layout.flatten(params, torch.float32), cfg, spec)
        return self._models[method]

    def engine(self, *extra: str):
        """A single-process ``FederatedTrainer`` on this device (its rounds are driven by the bench)."""
        from fedpeft_hpc.comm import LocalCommunicator
        from fedpeft_hpc.federated.engine import FederatedTrainer

        trainer = FederatedTrainer(self.config(*extra), LocalCommunicator(self.device))
        trainer.close()  # the bench's rounds write no run log
        return trainer

    # -- timing --------------------------------------------------------------------------
    def sync(self) -> None:
        synchronize(self.device)

    def best_time(self, fn: Callable[[], object], repeats: Optional[int] = None) -> float:
        """Fastest of ``repeats`` timed calls after one warm-up call (least disturbed by other load)."""
        fn()
        best = float("inf")
        for _ in range(repeats or self.profile.repeats):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            best = min(best, time.perf_counter() - t0)
        return best

    def best_times(self, fns: dict[str, Callable[[], object]], repeats: Optional[int] = None) -> dict[str, float]:
        """``best_time`` of several functions, their repeats interleaved so that a burst of load from other
        processes hits all of them alike (the ratios between them are what the bench reports)."""
        for fn in fns.values():
            fn()
        best = {name: float("inf") for name in fns}
        for _ in range(repeats or self.profile.repeats):
            for name, fn in fns.items():
                self.sync()
                t0 = time.perf_counter()
                fn()
                self.sync()
                best[name] = min(best[name], time.perf_counter() - t0)
        return best

    def status(self, text: str) -> None:
        log.debug("bench: %s", text)
        if self._status is not None:
            self._status(text)

    def release(self) -> None:
        self._models.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
