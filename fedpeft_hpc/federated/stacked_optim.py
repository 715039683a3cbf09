"""K clients' optimizers in one pass over PEFT tensors stacked along a leading client dimension.

Client batching (``federated.batched``) keeps the PEFT tensors of the clients it trains at
once in ``[K, *shape]`` tensors, one row (slot) per client. Each client must still move
exactly as its own ``torch.optim.SGD`` / ``torch.optim.AdamW`` would move it in sequential
training, so the update below is torch's single-tensor formula (``torch/optim/sgd.py``
``_single_tensor_sgd``, ``torch/optim/adam.py`` ``_single_tensor_adam`` with decoupled weight
decay) written elementwise over the rows; ``tests/test_batched.py`` checks it against
torch.optim step by step.

Only the rows named in ``step`` move. A slot whose client has finished its local steps,
or that waits for a client, is not touched: no momentum and no weight-decay drift.
``reset`` hands a slot to a new client: zero state and (AdamW) its own step count 0, so
rows of one stacked tensor may be at different steps and get their own bias corrections.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from fedpeft_hpc.config.schema import OptimConfig


class StackedOptimizer:
    """SGD (momentum, Nesterov, weight decay) or AdamW, one independent optimizer per row."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], cfg: OptimConfig):
        self.tensors = dict(tensors)
        if not self.tensors:
            raise ValueError("StackedOptimizer needs at least one tensor")
        self.slots = next(iter(self.tensors.values())).shape[0]
        if any(t.shape[0] != self.slots for t in self.tensors.values()):
            raise ValueError("every stacked tensor needs the same leading (client) dimension")
        self.name = cfg.name
        self.lr = float(cfg.lr)
        self.weight_decay = float(cfg.weight_decay)
        device = next(iter(self.tensors.values())).device
        self.steps = torch.zeros(self.slots, dtype=torch.int64)  # AdamW: each row's own step count (host)
        if cfg.name == "sgd":
            self.momentum = float(cfg.momentum)
            self.nesterov = bool(cfg.nesterov and cfg.momentum > 0)
            self.dampening = 0.0  # make_optimizer never sets it
            self.state = {n: torch.zeros_like(t) for n, t in self.tensors.items()} if self.momentum else {}
        elif cfg.name == "adamw":
            self.beta1, self.beta2 = (float(b) for b in cfg.betas)
            self.eps = 1e-8  # torch.optim.AdamW's default; make_optimizer does not change it
            self.state = {n: (torch.zeros_like(t), torch.zeros_like(t)) for n, t in self.tensors.items()}
        else:
            raise ValueError(f"optim.name={cfg.name!r}: no stacked form (sgd, adamw)")
        self._device = device

    @torch.no_grad()
    def reset(self, rows: Sequence[int]) -> None:
        """Fresh optimizer state for ``rows`` (a new client takes these slots)."""
        idx = list(rows)
        if not idx:
            return
        self.steps[idx] = 0
        for st in self.state.values():
            for t in (st if isinstance(st, tuple) else (st,)):
                t[idx] = 0

    @torch.no_grad()
    def step(self, rows: Sequence[int], grads: Mapping[str, torch.Tensor]) -> None:
        """One step of the clients in ``rows``; ``grads[name]`` is ``[len(rows), *shape]``, in the order of ``rows``."""
        rows = list(rows)
        if not rows:
            return
        full = rows == list(range(self.slots))
        index = None if full else torch.tensor(rows, dtype=torch.int64, device=self._device)
        self.steps[rows] += 1
        per_row = None
        if self.name == "adamw":
            per_row = self._adam_scalars(self.steps[rows].tolist())
        for name, grad in grads.items():
            param = self.tensors[name]
            if grad.shape != (len(rows), *param.shape[1:]):
                raise ValueError(f"{name}: gradient {tuple(grad.shape)} for {len(rows)} rows of {tuple(param.shape)}")
            if self.name == "sgd":
                self._sgd(name, param, grad, index)
            else:
                self._adamw(name, param, grad, index, per_row)

    # -- torch.optim.SGD, _single_tensor_sgd ------------------------------------------------
    def _sgd(self, name: str, param: torch.Tensor, grad: torch.Tensor, index: torch.Tensor | None) -> None:
        p = param if index is None else param.index_select(0, index)
        d = grad.add(p, alpha=self.weight_decay) if self.weight_decay != 0 else grad
        if self.momentum != 0:
            buf_all = self.state[name]
            buf = buf_all if index is None else buf_all.index_select(0, index)
            # a zero buffer gives torch's first step exactly: 0 * m + d == clone(d)
            buf.mul_(self.momentum).add_(d, alpha=1 - self.dampening)
            d = d.add(buf, alpha=self.momentum) if self.nesterov else buf
            if index is not None:
                buf_all.index_copy_(0, index, buf)
        p.add_(d, alpha=-self.lr)
        if index is not None:
            param.index_copy_(0, index, p)

    # -- torch.optim.AdamW, _single_tensor_adam(decoupled_weight_decay=True) --------------------
    def _adam_scalars(self, steps: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's ``lr / bias_correction1`` and ``sqrt(bias_correction2)``, from Python floats as torch does."""
        step_size = [self.lr / (1 - self.beta1 ** s) for s in steps]
        bc2_sqrt = [(1 - self.beta2 ** s) ** 0.5 for s in steps]
        as_t = lambda v: torch.tensor(v, dtype=torch.float32, device=self._device)  # noqa: E731
        return as_t(step_size), as_t(bc2_sqrt)

    def _adamw(self, name: str, param: torch.Tensor, grad: torch.Tensor, index: torch.Tensor | None,
               per_row: tuple[torch.Tensor, torch.Tensor]) -> None:
        exp_avg_all, exp_avg_sq_all = self.state[name]
        if index is None:
            p, exp_avg, exp_avg_sq = param, exp_avg_all, exp_avg_sq_all
        else:
            p, exp_avg, exp_avg_sq = (t.index_select(0, index) for t in (param, exp_avg_all, exp_avg_sq_all))
        if self.weight_decay != 0:
            p.mul_(1 - self.lr * self.weight_decay)
        exp_avg.lerp_(grad, 1 - self.beta1)
        exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        shape = (-1,) + (1,) * (p.dim() - 1)
        step_size, bc2_sqrt = (t.view(shape) for t in per_row)
        denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(self.eps)
        p.sub_(step_size * exp_avg / denom)  # addcdiv_(exp_avg, denom, value=-step_size), per row
        if index is not None:
            param.index_copy_(0, index, p)
            exp_avg_all.index_copy_(0, index, exp_avg)
            exp_avg_sq_all.index_copy_(0, index, exp_avg_sq)
