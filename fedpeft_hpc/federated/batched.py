"""Client-batched local training: K clients' PEFT tensors trained in ONE forward/backward.

Sequential clients run the frozen backbone at the client's batch size B, which leaves a
GPU (and even a CPU) far from its throughput at K*B. With PEFT the backbone is frozen and
shared and a client's state is tiny, so a rank trains K clients at once here:

- **Stacked state.** Each PEFT tensor is held as ``[K, *shape]``, one row (slot) per
  client. ``torch.func.functional_call`` + ``vmap`` over the slot dimension run the model
  with each slot's PEFT tensors while the frozen backbone tensors stay unbatched, so every
  frozen matmul/convolution is one call over all K*B samples, and plain autograd through
  vmap gives each slot's rows the gradient of its own loss. (The alternative, PEFT modules
  that index stacked parameters by a per-sample client id, needs a batched twin of every
  module that holds a trainable tensor; measured on the 2-core CPU it was no faster, see
  BENCHMARKS.md, so the generic vmap form is used for every method.)
- **Uneven clients.** A step pads the slots' mini-batches to the largest one and weights
  each sample's loss by ``1 / n_k`` (0 for padding), so each client's loss is exactly its own
  mean. Slots are refilled as clients finish (continuous batching: a client that has run
  out of batches leaves, the next client of the queue takes its slot with the global state
  and a fresh optimizer state), so clients with different step counts keep the batch full.
  A slot without a client does not move (``StackedOptimizer`` touches only active rows).
- **Same data, same optimizer.** Each client's batches come from the same per-client
  iterator the sequential path uses (made when the client gets its slot), and its
  optimizer is torch's formula per row (``federated.stacked_optim``).
- **Head only.** When every trainable tensor is the classifier's (``head``) and the model
  splits into ``forward_features``/``forward_head`` (timm), the frozen backbone runs once,
  unbatched and without autograd, over all K*B samples, and only the classifier is vmapped.
- **Sample-level DP-SGD.** Per-sample gradients come from ``vmap`` over samples of
  ``torch.func.grad`` (each sample routed to its client's slot, no padding), then clipping,
  summing, noise from each client's own source and the division by its expected batch
  size exactly as Opacus's ``DPOptimizer`` does (``privacy.dpsgd``); Poisson batches of any
  size, empty ones included, per client.

The per-client results equal sequential training to fp32 rounding (``tests/test_batched.py``:
max abs difference <= 1e-5 for every method, with and without DP, uneven sizes). ``full``
is not batched (a client's state is the whole model): the engine trains it sequentially.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fedpeft_hpc.config.schema import OptimConfig
from fedpeft_hpc.federated.client import LocalResult, train_mode
from fedpeft_hpc.federated.stacked_optim import StackedOptimizer
from fedpeft_hpc.models.precision import compute_precision
from fedpeft_hpc.peft.state import FlatLayout
from fedpeft_hpc.privacy.dpsgd import ClientNoise, clip_factors

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ClientJob:
    """One client to train: its id, how to open its batch iterator, its DP-SGD noise (or None)."""

    client: int
    batches: Callable[[], Iterable[Batch]]
    noise: Optional[ClientNoise] = None


@dataclass
class _Slot:
    job: ClientJob
    batches: Iterator[Batch]
    steps: int = 0
    seen: int = 0
    pending: Optional[Batch] = field(default=None, repr=False)


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def stochastic_layers(model: nn.Module) -> list[str]:
    """Names of the active dropout / drop-path / patch-dropout layers: their draws come from each client's
    own stream in sequential training (``client.local_train``); a batched pass would draw them from one
    stream. The rate is ``p`` for torch's dropout, ``drop_prob`` for drop path, ``prob`` for timm's
    ``PatchDropout`` (and its ``PatchDropoutWithIndices``)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            rates = [getattr(m, "p", None)]
        else:
            rates = [getattr(m, "drop_prob", None), getattr(m, "prob", None)]
        if any(isinstance(p, (int, float)) and float(p) > 0.0 for p in rates):
            out.append(name)
    return out


def classifier_only(model: nn.Module, layout: FlatLayout) -> Optional[tuple[nn.Module, str]]:
    """``(classifier, its name)`` when every trainable tensor is the classifier's and the model splits into
    ``forward_features`` + ``forward_head(pre_logits=True)`` + classifier (timm); otherwise ``None``."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module) or not all(hasattr(model, f) for f in ("forward_features", "forward_head")):
        return None
    prefix = next((name for name, m in model.named_modules() if m is head), "")
    if prefix and all(n.startswith(prefix + ".") for n in layout.names):
        return head, prefix
    return None


class BatchedClientTrainer:
    """Trains clients ``slots`` at a time on ``model`` (its PEFT tensors named by ``layout``)."""

    def __init__(self, model: nn.Module, layout: FlatLayout, optim: OptimConfig, slots: int,
                 device: torch.device, precision: str = "fp32"):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if has_batch_norm(model):
            raise ValueError("client batching needs a model without batch norm (its batch statistics and running "
                             "buffers are shared across the samples of a batch)")
        self.model = model
        self.layout = layout
        self.slots = slots
        self.device = torch.device(device)
        self.precision = precision
        self.stacked = {n: torch.zeros((slots, *shape), dtype=torch.float32, device=self.device)
                        for n, shape in zip(layout.names, layout.shapes)}
        self.optim = StackedOptimizer(self.stacked, optim)
        self.loss_sum = torch.zeros(slots, dtype=torch.float64, device=self.device)
        self.correct = torch.zeros(slots, dtype=torch.int64, device=self.device)
        self.head = classifier_only(model, layout)

    # -- the loop ------------------------------------------------------------------------
    def train(self, start: torch.Tensor, jobs: Iterable[ClientJob]) -> Iterator[tuple[int, LocalResult]]:
        """Yield ``(client, LocalResult)`` for every job, in the order clients finish.

        ``start`` is the flat fp32 global state every client starts from. Jobs take slots in
        the order given; a client's batch iterator is opened when it gets a slot.
        """
        start = start.to(self.device, torch.float32)
        init = self.layout.unflatten(start)
        queue = iter(jobs)
        slots: list[Optional[_Slot]] = [None] * self.slots
        train_mode(self.model)
        while True:
            for s in range(self.slots):
                while True:  # fetch this slot's next batch; refill it while clients end
                    slot = slots[s]
                    if slot is None:
                        job = next(queue, None)
                        if job is None:
                            break
                        slot = slots[s] = self._assign(s, job, init)
                    nxt = next(slot.batches, None)
                    if nxt is not None:
                        slot.pending = nxt
                        break
                    yield slot.job.client, self._result(s, slot, start)
                    slots[s] = None
            active = [s for s in range(self.slots) if slots[s] is not None]
            if not active:
                return
            self._step(active, [slots[s] for s in active])

    def _assign(self, s: int, job: ClientJob, init) -> _Slot:
        with torch.no_grad():
            for name, value in init.items():
                self.stacked[name][s].copy_(value)
        self.optim.reset([s])
        self.loss_sum[s] = 0
        self.correct[s] = 0
        return _Slot(job=job, batches=iter(job.batches()))

    def _result(self, s: int, slot: _Slot, start: torch.Tensor) -> LocalResult:
        local = self.layout.flatten({n: t[s] for n, t in self.stacked.items()}, torch.float32)
        return LocalResult(delta=local - start, loss_sum=float(self.loss_sum[s]), seen=slot.seen,
                           correct=int(self.correct[s]), steps=slot.steps)

    # -- one step of every active slot ---------------------------------------------------
    def _step(self, active: list[int], slots: list[_Slot]) -> None:
        batches = [sl.pending for sl in slots]
        for sl in slots:
            sl.pending = None
        xs = [x.to(self.device, non_blocking=True) for x, _ in batches]
        ys = [y.to(self.device, non_blocking=True) for _, y in batches]
        sizes = [int(y.numel()) for y in ys]
        noises = [sl.job.noise for sl in slots]
        dp = [n is not None for n in noises]
        if any(dp) and not all(dp):
            raise ValueError("clients with and without DP-SGD noise in one batch")
        rows = active
        params = self._rows(rows)
        with compute_precision(self.precision, self.device), vmap_friendly_attention(self.model):
            if all(dp):
                grads = self._dp_grads(params, xs, ys, sizes, noises, rows)
            else:
                grads = self._mean_grads(params, xs, ys, sizes, rows)
        self.optim.step(rows, grads)
        for sl, n in zip(slots, sizes):
            sl.steps += 1
            sl.seen += n

    def _rows(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """The active slots' PEFT tensors as fresh leaves (the stacked tensors themselves when all are active)."""
        if rows == list(range(self.slots)):
            return {n: t.detach().requires_grad_(True) for n, t in self.stacked.items()}
        index = torch.tensor(rows, dtype=torch.int64, device=self.device)
        return {n: t.index_select(0, index).requires_grad_(True) for n, t in self.stacked.items()}

    def _mean_grads(self, params, xs, ys, sizes, rows) -> dict[str, torch.Tensor]:
        """Gradient of each slot's mean loss over its own mini-batch (one vmapped forward/backward)."""
        a, bmax = len(xs), max(1, max(sizes))
        if all(n == bmax for n in sizes):
            x, y = torch.stack(xs), torch.stack(ys)
        else:
            x = xs[0].new_zeros((a, bmax, *xs[0].shape[1:]))
            y = ys[0].new_zeros((a, bmax))
            for i, (xi, yi) in enumerate(zip(xs, ys)):
                x[i, : len(yi)] = xi
                y[i, : len(yi)] = yi
        n = torch.tensor(sizes, device=self.device)
        mask = torch.arange(bmax, device=self.device).unsqueeze(0) < n.unsqueeze(1)
        weight = mask / n.clamp(min=1).unsqueeze(1).to(torch.float32)
        x, logits = self._inputs(x, batch_dims=2)

        def client_loss(p, xk, yk, wk):
            out = logits(p, xk)
            ce = F.cross_entropy(out.float(), yk, reduction="none")
            return (ce * wk).sum(), ce.detach(), out.detach().argmax(dim=-1)

        loss, ce, pred = vmap(client_loss, randomness="different")(params, x, y, weight)
        grads = torch.autograd.grad(loss.sum(), list(params.values()))
        with torch.no_grad():
            index = torch.tensor(rows, dtype=torch.int64, device=self.device)
            self.loss_sum.index_add_(0, index, (ce * weight).sum(1).double() * n.double())
            self.correct.index_add_(0, index, ((pred == y) & mask).sum(1))
        return dict(zip(params, grads))

    def _inputs(self, x: torch.Tensor, batch_dims: int):
        """What the vmapped function gets, and how it turns one client's (or sample's) part into logits.

        Head only: the pooled backbone features of all samples, computed once without vmap or autograd.
        """
        if self.head is None:
            return x, lambda p, xk: functional_call(self.model, p, (xk,))
        head, prefix = self.head
        lead = x.shape[:batch_dims]
        with torch.no_grad():
            feats = self.model.forward_head(self.model.forward_features(x.reshape(-1, *x.shape[batch_dims:])),
                                            pre_logits=True)
        feats = feats.reshape(*lead, *feats.shape[1:])
        cut = len(prefix) + 1
        return feats, lambda p, fk: functional_call(head, {n[cut:]: t for n, t in p.items()}, (fk,))

    def _dp_grads(self, params, xs, ys, sizes, noises: list[ClientNoise], rows) -> dict[str, torch.Tensor]:
        """Per client: per-sample gradients clipped, summed, noised, divided (Opacus's DPOptimizer step)."""
        a = len(xs)
        total = sum(sizes)
        summed = {n: torch.zeros_like(p) for n, p in params.items()}
        index = torch.tensor(rows, dtype=torch.int64, device=self.device)
        if total > 0:
            owner = torch.repeat_interleave(torch.arange(a, device=self.device),
                                            torch.tensor(sizes, device=self.device))
            x = torch.cat([xi for xi in xs if len(xi)])
            y = torch.cat([yi for yi in ys if len(yi)])
            per_sample = {n: p.detach().index_select(0, owner) for n, p in params.items()}
            x, logits = self._inputs(x, batch_dims=1)

            def sample_loss(p, xi, yi):
                out = logits(p, xi.unsqueeze(0))
                ce = F.cross_entropy(out.float(), yi.unsqueeze(0))
                return ce, (ce.detach(), out.detach().argmax(dim=-1).squeeze(0))

            g, (ce, pred) = vmap(grad(sample_loss, has_aux=True), randomness="different")(per_sample, x, y)
            with torch.no_grad():
                norms = torch.stack([t.reshape(total, -1).norm(2, dim=-1) for t in g.values()], dim=1).norm(2, dim=1)
                bounds = {nz.max_grad_norm for nz in noises}
                c = (bounds.pop() if len(bounds) == 1 else
                     torch.tensor([nz.max_grad_norm for nz in noises], device=self.device)[owner])
                factor = clip_factors(norms, c)
                for n, t in g.items():
                    summed[n].index_add_(0, owner, t * factor.view(-1, *([1] * (t.dim() - 1))))
                self.loss_sum.index_add_(0, index[owner], ce.double())
                self.correct.index_add_(0, index[owner], (pred == y).to(torch.int64))
        with torch.no_grad():
            out = {}
            expected = torch.tensor([nz.expected_batch_size for nz in noises], dtype=torch.float32,
                                    device=self.device)
            for n, s in summed.items():  # noise per client, parameter by parameter, as DPOptimizer.add_noise
                noise = torch.stack([nz.draw(s[i]) for i, nz in enumerate(noises)])
                out[n] = (s + noise) / expected.view(-1, *([1] * (s.dim() - 1)))
        return out


# -- attention under vmap ----------------------------------------------------------------------
@contextlib.contextmanager
def vmap_friendly_attention(model: nn.Module):
    """timm attention modules take their plain path (matmul, softmax, matmul) while vmapped.

    vmap has no batching rule for the fused CPU attention kernel (torch 2.14) and runs it
    sample by sample; which fused kernel a GPU picks depends on dtype and shapes, and not
    all have one either. The plain path is batched by vmap everywhere.
    """
    mods = [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool) and m.fused_attn]
    for m in mods:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in mods:
            m.fused_attn = True
