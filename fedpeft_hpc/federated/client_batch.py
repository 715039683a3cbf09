"""``fed.client_batch``: how many clients a rank trains at once (``auto``, the default | K | ``off``).

``off`` (also 0 or 1) trains a rank's clients one after another. K >= 2 trains up to K at
once (``federated.batched``), never more than a rank can get in one round. ``auto`` picks
K from a memory budget measured on this device with a probe step on zeros of the data's
shape:

- CUDA: the real batched step (DP included, with the attention it uses: fused outside DP-SGD)
  runs with 1 and 2 clients; the difference of
  the allocator's peaks is the cost of one more client, the rest is fixed; the budget is
  ``AUTO_BUDGET_FRACTION`` of the free device memory.
- CPU: the resident set cannot tell (freed memory stays in the process and is reused),
  so the probe is one forward of the model at the client batch, counting the bytes of
  every tensor autograd saves for the backward (the activations, frozen weights excluded),
  plus the client's stacked state, gradient and optimizer state, plus for DP-SGD its
  per-sample parameters and gradients; the budget is ``AUTO_BUDGET_FRACTION`` of this
  process's share of the available RAM (divided by the processes of the node; the room under
  the job's cgroup memory limit where that is less, ``memory.available_bytes``).

K is capped by the clients a rank can get in a round; where that (or ``auto``'s budget) leaves
one client at once, clients are trained one after another (a one-slot batched step is slower and
needs more memory). Methods whose client state is the
whole model (``full``), models with batch norm and models with active dropout, drop path or
patch dropout (``batched.stochastic_layers``) are trained one after another whatever the
setting, with a log line saying so.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fedpeft_hpc.comm.world import detect_world
from fedpeft_hpc.config.load import parse_client_batch
from fedpeft_hpc.config.schema import Config, OptimConfig
from fedpeft_hpc.federated.batched import (BatchedClientTrainer, ClientJob, has_batch_norm, stochastic_layers,
                                          vmap_friendly_attention)
from fedpeft_hpc.federated.memory import available_bytes, peak_memory
from fedpeft_hpc.models.precision import compute_precision
from fedpeft_hpc.peft.state import FlatLayout
from fedpeft_hpc.privacy.dpsgd import ClientNoise

log = logging.getLogger(__name__)

AUTO_BUDGET_FRACTION = 0.5  # of free device memory / available RAM: room for the data path and other processes
AUTO_MAX = 1024
UNBATCHED_METHODS = ("full",)


def plan_client_batch(cfg: Config, model: nn.Module, layout: FlatLayout, device: torch.device, image_shape: tuple,
                      world_size: int, dp: bool) -> Optional[int]:
    """K (>= 2) for this rank, or ``None``: train clients one after another."""
    want = parse_client_batch(cfg.fed.client_batch)
    if want is None:
        return None
    if cfg.peft.method in UNBATCHED_METHODS:
        log.info("fed.client_batch=%s: peft.method=%s trains its clients one after another (a client's state is "
                 "the whole model)", cfg.fed.client_batch, cfg.peft.method)
        return None
    noisy = stochastic_layers(model)
    if noisy:
        log.info("fed.client_batch=%s: %s has active dropout / drop path / patch dropout (%s%s); their draws "
                 "come from each client's own (seed, round, client) stream only when clients are trained one "
                 "after another, which they are",
                 cfg.fed.client_batch, cfg.model.name, ", ".join(noisy[:3]), ", ..." if len(noisy) > 3 else "")
        return None
    if has_batch_norm(model):
        log.info("fed.client_batch=%s: %s has batch norm, which mixes the samples of a batch; clients are trained "
                 "one after another", cfg.fed.client_batch, cfg.model.name)
        return None
    most = max(1, math.ceil(cfg.fed.clients_per_round / max(1, world_size)))
    if want == "auto":
        k = auto_client_batch(model, layout, cfg.optim, device, cfg.model.precision, image_shape,
                              cfg.data.batch_size, dp, most)
    else:
        k = min(int(want), most)
    if k <= 1:  # one slot is slower than sequential training and needs more memory (plain attention)
        why = ("the memory budget fits one" if want == "auto" and most > 1 else
               f"{cfg.fed.clients_per_round} clients per round over {max(1, world_size)} rank(s)")
        log.info("fed.client_batch=%s: at most %d client at once per rank (%s); clients are trained one after "
                 "another", cfg.fed.client_batch, k, why)
        return None
    log.info("fed.client_batch=%s: training up to %d clients at once per rank", cfg.fed.client_batch, k)
    return k


def probe_step_bytes(model: nn.Module, layout: FlatLayout, optim: OptimConfig, device: torch.device, precision: str,
                     image_shape: tuple, batch_size: int, dp: bool, clients: int) -> Optional[int]:
    """Peak memory the allocator reports for one batched step of ``clients`` clients (full batches of zeros),
    state included; ``None`` where the device cannot measure it."""
    start = layout.flatten(dict(_named(model, layout)), torch.float32).to(device)
    x = torch.zeros((batch_size, *image_shape))
    y = torch.zeros(batch_size, dtype=torch.int64)
    noise = ClientNoise(noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=float(batch_size)) if dp else None
    was_training = model.training
    with peak_memory(device) as peak:
        trainer = BatchedClientTrainer(model, layout, optim, clients, device, precision)
        jobs = [ClientJob(c, lambda: [(x, y)], noise) for c in range(clients)]
        for _ in trainer.train(start, jobs):
            pass
        del trainer
    model.train(was_training)
    return peak.bytes


def client_bytes_estimate(model: nn.Module, layout: FlatLayout, optim: OptimConfig, device: torch.device,
                          precision: str, image_shape: tuple, batch_size: int, dp: bool) -> int:
    """What one more client costs in a batched step: its activations (the tensors autograd saves in a forward at
    the client batch, with the plain attention the batched step runs, frozen weights excluded), its state,
    gradient and optimizer state, and for DP-SGD its per-sample parameters and gradients."""
    shared = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: set = set()
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in shared and key not in seen:
            seen.add(key)
            saved += storage.nbytes()
        return t

    x = torch.zeros((batch_size, *image_shape), device=device)
    y = torch.zeros(batch_size, dtype=torch.int64, device=device)
    was_training = model.training
    model.train()
    # the attention the batched step runs (plain: it saves the attention matrices the fused kernel does not)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), compute_precision(precision, device), \
            vmap_friendly_attention(model):
        loss = F.cross_entropy(model(x).float(), y)
    del loss
    model.train(was_training)
    state = layout.size * 4
    per_tensor_copies = 2 + (2 if optim.name == "adamw" else 1)  # row, gradient, optimizer state(s)
    per_sample = 3 * batch_size * state if dp else 0  # per-sample parameters, gradients, clipped gradients
    return saved + per_tensor_copies * state + per_sample


def auto_client_batch(model: nn.Module, layout: FlatLayout, optim: OptimConfig, device: torch.device, precision: str,
                      image_shape: tuple, batch_size: int, dp: bool, most: int) -> int:
    """K that fits the memory budget of ``device``, 1 to ``most``."""
    if most <= 1:
        return 1
    free = available_bytes(device)
    base = 0
    if device.type == "cuda":
        args = (model, layout, optim, device, precision, image_shape, batch_size, dp)
        probe_step_bytes(*args, 1)  # warm-up: kernels, workspaces
        one, two = probe_step_bytes(*args, 1), probe_step_bytes(*args, 2)
        per_client = two - one if two > one else one
        base = max(0, one - per_client)
        how = "probe steps with 1 and 2 clients"
    else:
        if free is not None:  # the processes of this node share its RAM
            free //= max(1, detect_world(os.environ).local_world_size)
        per_client = client_bytes_estimate(model, layout, optim, device, precision, image_shape, batch_size, dp)
        how = "tensors saved for the backward of a probe forward"
    if free is None:
        log.warning("fed.client_batch=auto: cannot tell the free memory of %s; training %d clients at once", device,
                    min(most, 8))
        return min(most, 8)
    budget = AUTO_BUDGET_FRACTION * free - base
    k = int(max(1, min(most, AUTO_MAX, budget // max(1, per_client))))
    log.info("fed.client_batch=auto: one more client costs %.1f MB (%s, batch %d%s), %.0f MB available on %s: "
             "K=%d", per_client / 2**20, how, batch_size, ", DP-SGD" if dp else "", free / 2**20, device, k)
    return k


def _named(model: nn.Module, layout: FlatLayout):
    params = dict(model.named_parameters())
    return [(n, params[n].detach()) for n in layout.names]
