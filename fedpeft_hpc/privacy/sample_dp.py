"""``privacy.mode=sample``: DP-SGD on each client (Opacus), with a per-client accountant.

Each client k runs real DP-SGD on its own data: Poisson-sampled batches with rate
``q_k = 1 / ceil(n_k / B)`` and ``ceil(n_k / B)`` steps per local epoch (what Opacus's
``DPDataLoader`` does), per-sample gradients from Opacus's ``GradSampleModule`` (hooks;
only modules that hold trainable parameters get them, the frozen backbone none),
per-sample clipping to ``privacy.max_grad_norm`` and Gaussian noise from Opacus's
``DPOptimizer``. A sample lives on exactly one client, so the guarantee of the run is
the largest epsilon any client has spent; every client has its own history of
``(noise_multiplier, sample_rate, steps)``, one entry per round it trained in, which an
Opacus accountant turns into epsilon.

Noise comes from a generator per (client, round) keyed by the run's noise key (a secret by
default, the seed with ``privacy.seeded_noise``; see ``privacy.noise``); with a secret, Opacus'
``secure_mode`` draws it (robust to floating-point attacks). The Poisson batches' membership
comes from the same key (``batch_generator``): the accountant's subsampling credit needs it hidden.
The cohort of clients, by contrast, stays a public function of the seed under sample-level DP:
each client's accountant counts only the rounds it trained in and takes no credit for cohort
sampling, so knowing who was sampled costs nothing that is not already charged. Its scale is
``privacy.noise_multiplier`` for every client, or calibrated per client from
``privacy.target_epsilon``: the schedule is a pure function of the seed, so the number
of rounds R_k each client will train in is known up front, and sigma_k is the smallest
noise (Opacus's ``get_noise_multiplier``) with which ``R_k * local_epochs * ceil(n_k/B)``
steps spend at most the target. Every rank computes the same values without talking.

Aggregation stays FedAvg weighted by exact sample counts (``SampleWeightedMean``, as ``NoPrivacy``):
the weights are public in this threat model (the server sees which client sent what),
and DP-SGD protects the samples inside each update.

An empty Poisson batch still is a step of the mechanism (the accountant counts it): its
forward is skipped (nothing to compute per sample) and the optimizer steps on pure noise
divided by the expected batch size, as Opacus does for empty batches.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from fedpeft_hpc.config.schema import DataConfig, FedConfig, PrivacyConfig
from fedpeft_hpc.data.loader import batches_from_index_lists
from fedpeft_hpc.errors import ConfigError
from fedpeft_hpc.peft.prompt import PromptTokens
from fedpeft_hpc.privacy.accounting import merge_history, opacus_analysis
from fedpeft_hpc.privacy.base import SampleWeightedMean
from fedpeft_hpc.privacy.dpsgd import ClientNoise
from fedpeft_hpc.privacy.mechanism import DPMechanism
from fedpeft_hpc.utils.streams import CLIENT_DATA, CLIENT_NOISE

log = logging.getLogger(__name__)

_SAMPLERS_REGISTERED = False


def _prompt_grad_sample(layer: nn.Module, activations: list, backprops: torch.Tensor) -> dict:
    """Per-sample gradient of ``PromptTokens.tokens``: the output gradient at the prompt positions.

    The layer's output holds ``tokens`` (broadcast over the batch) at positions
    ``[prefix, prefix + num_tokens)``, so d loss_i / d tokens = backprops[i, prefix:prefix+n].
    ``backprops`` already carries Opacus's loss-reduction scaling.
    """
    if not layer.tokens.requires_grad:
        return {}
    start = layer.prefix
    gs = backprops[:, start:start + layer.num_tokens, :].to(layer.tokens.dtype)
    return {layer.tokens: gs}


def register_grad_samplers() -> None:
    """Opacus grad samplers for modules it does not know (called before wrapping, not at import).

    - ``PromptTokens`` (VPT): otherwise functorch re-runs the module per sample.
    - timm's ``LayerNorm`` (a ``nn.LayerNorm`` subclass that calls ``F.layer_norm``): Opacus
      matches exact types, so without this every block norm falls back to functorch.
    """
    global _SAMPLERS_REGISTERED
    if _SAMPLERS_REGISTERED:
        return
    from opacus.grad_sample import register_grad_sampler
    from opacus.grad_sample.layer_norm import compute_layer_norm_grad_sample

    register_grad_sampler(PromptTokens)(_prompt_grad_sample)
    try:
        from timm.layers.norm import LayerNorm as TimmLayerNorm
    except ImportError:  # pragma: no cover - timm always ships it
        TimmLayerNorm = None
    if TimmLayerNorm is not None and issubclass(TimmLayerNorm, nn.LayerNorm):
        register_grad_sampler(TimmLayerNorm)(compute_layer_norm_grad_sample)
    _SAMPLERS_REGISTERED = True


def _cast_like(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, keeping the mark Opacus sets on per-sample gradients it has processed."""
    out = t.to(dtype)
    if hasattr(t, "_processed"):
        out._processed = t._processed
    return out


@functools.lru_cache(maxsize=None)
def _gsm_classes():
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    class DPGradSampleModule(GradSampleModule):
        """``GradSampleModule`` that skips the forward of an empty (Poisson) batch.

        The output is an empty leaf that requires grad, so ``loss.backward()`` works and no
        per-sample hook runs (functorch cannot vmap over zero samples); the optimizer below
        then steps on noise alone.
        """

        skipped_empty = False  # the last training forward was an empty batch

        def forward(self, x, *args, **kwargs):
            if self.training and torch.is_grad_enabled():
                self.skipped_empty = isinstance(x, torch.Tensor) and x.shape[0] == 0
                if self.skipped_empty:
                    with torch.no_grad():
                        out = self._module(x, *args, **kwargs)
                    return out.detach().requires_grad_(True)
            return self._module(x, *args, **kwargs)

    class EmptyBatchDPOptimizer(DPOptimizer):
        """``DPOptimizer`` that gives the parameters zero samples after an empty batch's skipped forward."""

        def __init__(self, optimizer, *, module, **kwargs):
            super().__init__(optimizer, **kwargs)
            self.module = module

        def pre_step(self, closure=None):
            params = self.params
            if (self.module.skipped_empty and params
                    and all(getattr(p, "grad_sample", None) is None for p in params)):
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
            # Under autocast (model.precision=bf16) the per-sample gradients come out in bf16; Opacus
            # computes the clipping norms before casting them to the parameter's dtype, so a bf16 norm
            # rounded down would let a clipped gradient exceed max_grad_norm. Cast first (fp32 norms).
            for p in params:
                gs = getattr(p, "grad_sample", None)
                if isinstance(gs, torch.Tensor) and gs.dtype != p.dtype:
                    p.grad_sample = _cast_like(gs, p.dtype)
                elif isinstance(gs, list) and any(g.dtype != p.dtype for g in gs):
                    p.grad_sample = [_cast_like(g, p.dtype) for g in gs]
            return super().pre_step(closure)

    return DPGradSampleModule, EmptyBatchDPOptimizer


class SampleDP(SampleWeightedMean, DPMechanism):
    mode = "sample"
    clipping = "per-sample clipping"

    def __init__(self, privacy: PrivacyConfig, fed: FedConfig, data: DataConfig, *, client_sizes: Sequence[int],
                 schedule, seed: int, device):
        super().__init__(privacy, seed)
        self.device = torch.device(device)
        self.batch_size = int(data.batch_size)
        self.local_epochs = int(fed.local_epochs)
        self.sizes = [int(n) for n in client_sizes]
        self.steps_per_epoch = [math.ceil(n / self.batch_size) for n in self.sizes]
        self.sample_rates = [1.0 / s for s in self.steps_per_epoch]
        self.steps_per_round = [self.local_epochs * s for s in self.steps_per_epoch]
        self.cohort_sampling = schedule.sampling
        self.noise: list[float | None] = self._calibrate_clients(schedule.participation(fed.rounds))
        self.histories: dict[int, list[tuple[float, float, int]]] = {}
        self.rounds: dict[int, int] = {}
        self.functorch_modules: list[str] = []
        self._wrapped: nn.Module | None = None
        # one record of the union of the clients' data is what is protected (each record lives on one client,
        # whose accountant bounds it): the strictest n, stricter than the smallest client's count
        self.check_delta(sum(self.sizes), f"training records of all clients (the smallest client holds "
                                          f"{min(self.sizes, default=0)})")

    # -- noise ---------------------------------------------------------------------------
    def _calibrate_clients(self, participation: np.ndarray) -> list[float | None]:
        """Each client's noise for the rounds it will train in (``None``: it never trains)."""
        pairs: set[tuple[float, int]] = set()
        noise: list[float | None] = []
        for k in range(len(self.sizes)):
            steps = int(participation[k]) * self.steps_per_round[k]
            if steps == 0 and self.fixed_noise is None:
                noise.append(None)  # never trains: no noise needed, nothing spent
                continue
            pairs.add((self.sample_rates[k], steps))
            noise.append(self.calibrate(self.sample_rates[k], steps,
                                        what=f"client {k} ({self.sizes[k]} samples, {int(participation[k])} rounds)"))
        used = [s for s in noise if s is not None]
        if used and self.fixed_noise is None:
            log.info("sample-level DP: target epsilon %g (delta %g, %s): noise multipliers %.3f..%.3f over %d "
                     "training clients (%d distinct sampling-rate/steps pairs)", self.target_epsilon, self.delta,
                     self.accountant, min(used), max(used), len(used), len(pairs))
        return noise

    # -- hooks ---------------------------------------------------------------------------
    def wrap_model(self, model: nn.Module) -> nn.Module:
        if self._wrapped is not None:
            if self._wrapped._module is model:
                return self._wrapped
            raise RuntimeError("SampleDP.wrap_model: one model per run")
        register_grad_samplers()
        # The first trainable module (patch_embed.proj under bias/full) sees an input that needs no
        # grad; its full backward hook then fires on output gradients, which is all Opacus uses.
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed "
                                                  "with respect to module outputs", category=UserWarning)
        # functorch's per-sample path repeats this for every step; our own warning below says it once
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented "
                                                  "the batching rule", category=UserWarning)
        mixing = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if mixing:
            raise ConfigError("privacy.mode",
                              f"sample-level DP needs a model whose output for one sample does not depend on the "
                              f"others; batch norm ({', '.join(mixing[:3])}) mixes the samples of a batch. Use a "
                              "model with LayerNorm/GroupNorm (e.g. a ViT) or privacy.mode=client")
        gsm_cls, _ = _gsm_classes()
        try:
            self._wrapped = gsm_cls(model, loss_reduction="mean")
        except NotImplementedError as e:  # Opacus: a trainable layer with buffers
            raise ConfigError("privacy.mode", f"Opacus cannot compute per-sample gradients for this model and "
                                              f"peft.method: {e}") from None
        self.functorch_modules = [name or "<root>" for name, m in model.named_modules()
                                  if hasattr(m, "ft_compute_sample_grad")]
        if self.functorch_modules:
            root = "<root>" in self.functorch_modules
            log.warning("sample-level DP: per-sample gradients by functorch (slower) for %s%s",
                        ", ".join(self.functorch_modules[:6]),
                        " (trainable parameters on the root module, e.g. cls_token/pos_embed under "
                        "peft.method=full: the whole model is re-run per sample)" if root else "")
        return self._wrapped

    def batch_generator(self, seed: int, round_idx: int, client: int) -> torch.Generator:
        """Which samples each DP-SGD step of ``client`` uses in ``round_idx``: the accountant takes
        credit for Poisson subsampling, which holds only while batch membership is hidden, so the
        generator is keyed by the run's noise key (a secret by default; with
        ``privacy.seeded_noise=true`` exactly the seed's stream ``(seed, CLIENT_DATA, round, client)``).
        The sequential (Opacus) and the client-batched path both draw their batches from it."""
        key = self.noise_key
        if key is None:
            raise RuntimeError("DP-SGD batches requested before use_noise() gave the mechanism a key")
        if not key.secure and int(seed) != self.seed:
            raise ValueError(f"seeded noise key of seed {self.seed}, batches asked for seed {seed}")
        return key.generator(CLIENT_DATA, round_idx, client)

    def client_batches(self, dataset, indices: np.ndarray, batch_size: int, epochs: int,
                       generator: torch.Generator, num_workers: int = 0) -> Iterable:
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        if batch_size != self.batch_size or epochs != self.local_epochs:
            raise ValueError(f"SampleDP accounts for batch {self.batch_size} x {self.local_epochs} epochs, "
                             f"got {batch_size} x {epochs}")
        indices = np.asarray(indices, dtype=np.int64)
        n = len(indices)
        steps_per_epoch = math.ceil(n / batch_size)
        sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=1.0 / steps_per_epoch,
                                                generator=generator, steps=epochs * steps_per_epoch)
        lists = (indices[np.asarray(pos, dtype=np.int64)] for pos in sampler)
        return batches_from_index_lists(dataset, lists, num_workers=num_workers)

    def client_noise(self, client: int, round_idx: int, num_samples: int) -> ClientNoise:
        """Client ``client``'s DP-SGD step in ``round_idx``: noise, clipping norm, expected batch, noise source."""
        sigma = self.noise[client]
        if sigma is None:
            raise RuntimeError(f"client {client} trains in round {round_idx} but the schedule gave it no rounds")
        if int(num_samples) != self.sizes[client]:
            raise ValueError(f"client {client}: {num_samples} samples, accounted for {self.sizes[client]}")
        expected = self.sample_rates[client] * self.sizes[client]
        gen = self.generator(CLIENT_NOISE, round_idx, client, device=self.device)
        return ClientNoise(noise_multiplier=sigma, max_grad_norm=self.max_grad_norm, expected_batch_size=expected,
                           generator=gen, secure_mode=not self.seeded_noise)

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, client: int, round_idx: int,
                       num_samples: int) -> torch.optim.Optimizer:
        _, opt_cls = _gsm_classes()
        if self._wrapped is None:
            raise RuntimeError("SampleDP.wrap_optimizer before wrap_model")
        spec = self.client_noise(client, round_idx, num_samples)
        return opt_cls(optimizer, module=self._wrapped, noise_multiplier=spec.noise_multiplier,
                       max_grad_norm=spec.max_grad_norm, expected_batch_size=spec.expected_batch_size,
                       loss_reduction="mean", generator=spec.generator, secure_mode=spec.secure_mode)

    # -- accounting ----------------------------------------------------------------------
    def account(self, round_idx: int, returning: Sequence[int]) -> None:
        for k in returning:
            k = int(k)
            entry = (float(self.noise[k]), self.sample_rates[k], self.steps_per_round[k])
            self.histories[k] = merge_history([*self.histories.get(k, []), entry])
            self.rounds[k] = self.rounds.get(k, 0) + 1

    def client_epsilon(self, k: int) -> float:
        return self.epsilon_of(self.histories.get(k, ()))

    def epsilon(self) -> float | None:
        return max((self.client_epsilon(k) for k in self.histories), default=0.0)

    def adjacency(self) -> str:
        return ("record level, add/remove: the two datasets differ by one training record of one client; the "
                "clients' sizes are treated as public (they set the FedAvg weights, each client's sampling rate "
                "1/ceil(n/batch_size) and its noise calibration), and so is the cohort (drawn from the seed)")

    def analysis(self) -> str:
        return (opacus_analysis(self.accountant) + "; one history per client (Poisson batches at rate "
                "1/ceil(n/batch_size), local_epochs*ceil(n/batch_size) steps per round trained), epsilon of the "
                "run = the largest client's")

    def trust_model(self) -> str:
        return ("DP-SGD on each client: per-sample clipping and Gaussian noise are applied before an update leaves "
                "the client, so the server sees noised updates (and which clients sent them, a public function of "
                "the seed); the clients' own computation is trusted; no secure aggregation.")

    def report(self) -> dict:
        clients = {}
        for k in range(len(self.sizes)):
            hist = self.histories.get(k, [])
            clients[str(k)] = {
                "num_samples": self.sizes[k], "noise_multiplier": self.noise[k],
                "sample_rate": self.sample_rates[k], "steps": int(sum(s for _, _, s in hist)),
                "steps_per_round": self.steps_per_round[k], "rounds": self.rounds.get(k, 0),
                "epsilon": self.client_epsilon(k), "history": [list(e) for e in hist]}
        return {**self.report_header(), "batch_size": self.batch_size, "local_epochs": self.local_epochs,
                "sampling": "Poisson per client: sample_rate = 1/ceil(n/batch_size), ceil(n/batch_size) steps "
                            "per local epoch; epsilon of the run = max over clients; cohorts: "
                            f"{self.cohort_sampling} (public, from the seed; no credit taken for them)",
                "cohort_sampling": self.cohort_sampling,
                "functorch_modules": list(self.functorch_modules), "clients": clients}

    def state_dict(self) -> dict:
        return {"histories": {str(k): [list(e) for e in h] for k, h in self.histories.items()},
                "rounds": {str(k): r for k, r in self.rounds.items()}, **self.charge_state()}

    def load_state_dict(self, state: dict) -> None:
        self.histories = {int(k): merge_history(h) for k, h in (state or {}).get("histories", {}).items()}
        self.rounds = {int(k): int(r) for k, r in (state or {}).get("rounds", {}).items()}
        self.load_charge_state(state)
