"""K clients' optimizers in a handful of whole-buffer kernels over a ``SlotStore``'s flat ``[K, P]`` buffers.

Client batching (``federated.batched``) keeps the PEFT tensors of the clients it trains at
once in one flat ``[K, P]`` buffer, one row (slot) per client (``federated.slots``). Each
client must still move exactly as its own ``torch.optim.SGD`` / ``torch.optim.AdamW`` would
move it in sequential training, so the update below is torch's single-tensor formula
(``torch/optim/sgd.py`` ``_single_tensor_sgd``, ``torch/optim/adam.py`` ``_single_tensor_adam``
with decoupled weight decay) written elementwise over whole rows; ``tests/test_batched.py``
checks it against torch.optim step by step.

One step is a few kernels over the flat buffers whatever the number of PEFT tensors (76 for
ViT-B BitFit), and nothing leaves the device: AdamW's per-slot step counts and bias
corrections are device tensors. Only the rows marked in ``active`` move: the new values
are computed for every row and kept where ``active`` (``torch.where``), so a slot whose
client has finished its local steps, or that waits for a client, is not touched: no
momentum and no weight-decay drift. The optimizer state lives in the store's buffers
(``momentum_buffer``; ``exp_avg``, ``exp_avg_sq``), zeroed with ``SlotStore.reset_buffers``
when a new client takes the slot, which also sets its AdamW step count to 0 (rows may be at
different steps and get their own bias corrections).
"""

from __future__ import annotations

import torch

from fedpeft_hpc.config.schema import OptimConfig
from fedpeft_hpc.federated.slots import SlotStore


class StackedOptimizer:
    """SGD (momentum, Nesterov, weight decay) or AdamW, one independent optimizer per slot of ``store``."""

    def __init__(self, store: SlotStore, cfg: OptimConfig):
        self.store = store
        self.name = cfg.name
        self.lr = float(cfg.lr)
        self.weight_decay = float(cfg.weight_decay)
        self.buffers: tuple[torch.Tensor, ...] = ()
        if cfg.name == "sgd":
            self.momentum = float(cfg.momentum)
            self.nesterov = bool(cfg.nesterov and cfg.momentum > 0)
            self.dampening = 0.0  # make_optimizer never sets it
            if self.momentum:
                self.buffers = (store.add_buffer("momentum_buffer"),)
        elif cfg.name == "adamw":
            self.beta1, self.beta2 = (float(b) for b in cfg.betas)
            self.eps = 1e-8  # torch.optim.AdamW's default; make_optimizer does not change it
            self.buffers = (store.add_buffer("exp_avg"), store.add_buffer("exp_avg_sq"))
            self.steps = torch.zeros(store.slots, dtype=torch.int64, device=store.device)  # each slot's own count
            store.on_reset(self._reset_steps)
        else:
            raise ValueError(f"optim.name={cfg.name!r}: no stacked form (sgd, adamw)")

    def _reset_steps(self, slot: int) -> None:
        self.steps[slot] = 0

    @torch.no_grad()
    def step(self, grad: torch.Tensor, active: torch.Tensor) -> None:
        """One step of the slots where ``active`` (bool ``[K]``, on the device); ``grad`` is ``[K, P]``
        (rows of inactive slots are ignored)."""
        param = self.store.params
        if grad.shape != param.shape:
            raise ValueError(f"gradient {tuple(grad.shape)} for slot parameters {tuple(param.shape)}")
        keep = active.view(-1, 1)
        if self.name == "sgd":
            self._sgd(param, grad, keep)
        else:
            self._adamw(param, grad, active, keep)

    # -- torch.optim.SGD, _single_tensor_sgd ------------------------------------------------
    def _sgd(self, p: torch.Tensor, grad: torch.Tensor, keep: torch.Tensor) -> None:
        d = grad.add(p, alpha=self.weight_decay) if self.weight_decay != 0 else grad
        if self.momentum != 0:
            (buf,) = self.buffers
            # a zero buffer gives torch's first step exactly: 0 * m + d == clone(d)
            new = buf.mul(self.momentum).add_(d, alpha=1 - self.dampening)
            buf.copy_(torch.where(keep, new, buf))
            d = d.add(new, alpha=self.momentum) if self.nesterov else new
        p.copy_(torch.where(keep, p.add(d, alpha=-self.lr), p))

    # -- torch.optim.AdamW, _single_tensor_adam(decoupled_weight_decay=True) --------------------
    def _adamw(self, p: torch.Tensor, grad: torch.Tensor, active: torch.Tensor, keep: torch.Tensor) -> None:
        exp_avg, exp_avg_sq = self.buffers
        self.steps.add_(active)
        # each row's lr / bias_correction1 and sqrt(bias_correction2), in float64 as torch's Python floats
        step = self.steps.to(torch.float64).clamp_(min=1).view(-1, 1)
        step_size = (self.lr / (1 - torch.pow(self.beta1, step))).to(torch.float32)
        bc2_sqrt = (1 - torch.pow(self.beta2, step)).sqrt_().to(torch.float32)
        q = p.mul(1 - self.lr * self.weight_decay) if self.weight_decay != 0 else p
        m = exp_avg.lerp(grad, 1 - self.beta1)
        v = exp_avg_sq.mul(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
        q = q.sub(step_size * m / denom)  # addcdiv_(exp_avg, denom, value=-step_size), per row
        p.copy_(torch.where(keep, q, p))
        exp_avg.copy_(torch.where(keep, m, exp_avg))
        exp_avg_sq.copy_(torch.where(keep, v, exp_avg_sq))
