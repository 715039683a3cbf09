"""Client-batched local training: K clients' PEFT tensors trained in ONE forward/backward.

Sequential clients run the frozen backbone at the client's batch size B, which leaves a
GPU (and even a CPU) far from its throughput at K*B. With PEFT the backbone is frozen and
shared and a client's state is tiny, so a rank trains K clients at once here:

- **Stacked state.** The slot store (``federated.slots``) holds the K clients' PEFT tensors
  as one flat ``[K, P]`` buffer with per-name ``[K, *shape]`` views, one row (slot) per
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
  optimizer is torch's formula per row (``federated.stacked_optim``). Iterators that yield
  index lists (``data.sources.PendingBatch``, the engine's) are made into batches for all
  slots at once per step: one gather, augmentation and preparation.
- **No host round trip in a step.** Leaves and gradient views are made once per number of
  rows, a set of rows gets its device index once, padding is labelled -1 (the weights come
  from the labels on the device), metric sums stay on the device until the round ends.
- **GPU paths.** timm's fused attention stays on CUDA (plain elsewhere, see
  ``vmap_friendly_attention``); under bf16 the PEFT tensors of Linear layers enter the
  vmapped call in bf16 and the frozen Linear weights are bf16 copies made once;
  ``compile=True`` (``run.compile``) pads to all K slots and the full batch B and runs the
  forward through ``torch.compile``.
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
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.utils.rnn import pad_sequence

from fedpeft_hpc.config.schema import OptimConfig
from fedpeft_hpc.data.sources import prepare_batches
from fedpeft_hpc.federated.client import LocalResult, train_mode
from fedpeft_hpc.federated.memory import synchronize
from fedpeft_hpc.federated.slots import SlotStore
from fedpeft_hpc.federated.stacked_optim import StackedOptimizer
from fedpeft_hpc.models.precision import compute_precision
from fedpeft_hpc.peft.lora import components_mask, lora_layers, rank_components, rank_masks
from fedpeft_hpc.peft.state import FlatLayout
from fedpeft_hpc.privacy.dpsgd import ClientNoise, clip_factors

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ClientJob:
    """One client to train: its id, how to open its batch iterator, its DP-SGD noise (or None).

    A client with its own state (``federated.client_parts``): ``start()`` gives its slot row (default: the
    shared start), ``finish(row, start)`` turns its final row into its update (default: ``row - start``) and
    ``rank`` is its LoRA rank (its slot's rank mask; ``None``: every component).
    """

    client: int
    batches: Callable[[], Iterable[Batch]]
    noise: Optional[ClientNoise] = None
    start: Optional[Callable[[], torch.Tensor]] = None
    finish: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
    rank: Optional[int] = None


@dataclass
class _Slot:
    job: ClientJob
    batches: Iterator[Batch]
    start: torch.Tensor
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
    """Trains clients ``slots`` at a time on ``model`` (its PEFT tensors named by ``layout``).

    ``precision``: ``model.precision``. ``compile``: ``run.compile`` (fixed shapes, the per-step loss and
    gradient through ``torch.compile``; the eager path where it cannot). ``attention``: ``auto`` keeps timm's
    fused attention on CUDA outside DP-SGD's per-sample gradients (plain attention elsewhere), ``plain`` and
    ``fused`` force one (the bench compares them). ``batch_size``: the client batch B the fixed shapes pad to.
    """

    def __init__(self, model: nn.Module, layout: FlatLayout, optim: OptimConfig, slots: int,
                 device: torch.device, precision: str = "fp32", compile: bool = False, attention: str = "auto",
                 batch_size: int = 0):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if has_batch_norm(model):
            raise ValueError("client batching needs a model without batch norm (its batch statistics and running "
                             "buffers are shared across the samples of a batch)")
        if attention not in ATTENTION:
            raise ValueError(f"attention={attention!r}: one of {', '.join(ATTENTION)}")
        self.model = model
        self.layout = layout
        self.slots = slots
        self.device = torch.device(device)
        self.precision = precision
        self.attention = attention
        self.batch_size = batch_size
        self.store = SlotStore(layout, slots, self.device)
        self.optim = StackedOptimizer(self.store, optim)
        self.grad = torch.zeros_like(self.store.params)
        # rows < K: the active rows gathered here, their gradients there (one buffer each, reused every step)
        self._work = torch.zeros_like(self.store.params)
        self._work_grad = torch.zeros_like(self.store.params)
        self._leaves: dict[int, tuple] = {}
        self.active = torch.zeros(slots, dtype=torch.bool, device=self.device)
        self.loss_sum = torch.zeros(slots, dtype=torch.float64, device=self.device)
        self.correct = torch.zeros(slots, dtype=torch.int64, device=self.device)
        self.clip_bound = torch.zeros(slots, dtype=torch.float32, device=self.device)  # DP-SGD: C per slot
        self.expected = torch.ones(slots, dtype=torch.float32, device=self.device)  # DP-SGD: expected batch
        self.head = classifier_only(model, layout)
        self.lora = lora_layers(model)
        self.rank_mask: Optional[torch.Tensor] = None  # [K, r_max] once a job has a LoRA rank
        self._rank_rows: dict[Optional[int], torch.Tensor] = {}
        self._index: dict[tuple, torch.Tensor] = {}  # device index tensors, one per set of rows
        self.rows_index(tuple(range(slots)))  # every slot: made here, before the steps
        # bf16: the PEFT tensors that enter a Linear / convolution are cast as autocast casts them there, and
        # the frozen weights of those layers are held in bf16 once (autocast would cast them every step)
        lowp = precision == "bf16"
        self.cast_names = autocast_inputs(model, layout) if lowp else frozenset()
        self.frozen = frozen_low_precision(model, layout) if lowp and self.head is None else {}
        self.compiled = self._compile() if compile else None
        self._fused_ok = False  # a fused-attention step has run
        self._tail: Optional[bool] = None  # run.compile, a round's tail: the compiled step is the faster one

    # -- the loop ------------------------------------------------------------------------
    def train(self, start: torch.Tensor, jobs: Iterable[ClientJob]) -> Iterator[tuple[int, LocalResult]]:
        """Yield ``(client, LocalResult)`` for every job, in the order clients finish.

        ``start`` is the flat fp32 global state every client starts from. Jobs take slots in
        the order given; a client's batch iterator is opened when it gets a slot.
        """
        start = start.to(self.device, torch.float32)
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
                        slot = slots[s] = self._assign(s, job, start)
                    nxt = next(slot.batches, None)
                    if nxt is not None:
                        slot.pending = nxt
                        break
                    yield slot.job.client, self._result(s, slot, start)
                    self.active[s] = False
                    slots[s] = None
            active = [s for s in range(self.slots) if slots[s] is not None]
            if not active:
                return
            self._step(active, [slots[s] for s in active])

    def _assign(self, s: int, job: ClientJob, start: torch.Tensor) -> _Slot:
        if job.start is not None:
            start = job.start().to(self.device, torch.float32)
        self.store.load_flat(s, start)
        self._set_rank(s, job.rank)
        self.store.reset_buffers(s)  # a fresh optimizer state
        self.loss_sum[s] = 0
        self.correct[s] = 0
        self.active[s] = True
        if job.noise is not None:
            self.clip_bound[s] = job.noise.max_grad_norm
            self.expected[s] = job.noise.expected_batch_size
        return _Slot(job=job, batches=iter(job.batches()), start=start)

    def _set_rank(self, s: int, rank: Optional[int]) -> None:
        """Slot ``s``'s LoRA rank mask (made at the first job with a rank; the masks are made once per rank)."""
        if self.rank_mask is None:
            if rank is None:
                return
            self.rank_mask = torch.ones((self.slots, rank_components(self.lora)), device=self.device)
        row = self._rank_rows.get(rank)
        if row is None:
            row = self._rank_rows[rank] = components_mask(self.rank_mask.shape[1], rank, self.device)
        self.rank_mask[s].copy_(row)

    def _result(self, s: int, slot: _Slot, start: torch.Tensor) -> LocalResult:
        row = self.store.read_flat(s)
        delta = slot.job.finish(row, slot.start) if slot.job.finish is not None else row - slot.start
        # the metric sums stay on the device (0-d tensors) until the round buffer is read at the round's end
        return LocalResult(delta=delta, loss_sum=self.loss_sum[s].clone(), seen=slot.seen,
                           correct=self.correct[s].clone(), steps=slot.steps)

    def rows_index(self, rows: tuple[int, ...]) -> torch.Tensor:
        """``rows`` as an int64 index on the device, made once per set of rows (no host-to-device copy per step)."""
        index = self._index.get(rows)
        if index is None:
            index = self._index[rows] = torch.tensor(rows, dtype=torch.int64).to(self.device, non_blocking=True)
        return index

    # -- one step of every active slot ---------------------------------------------------
    def _step(self, active: list[int], slots: list[_Slot]) -> None:
        batches = prepare_batches([sl.pending for sl in slots])  # deferred ones: one gather for every slot
        for sl in slots:
            sl.pending = None
        xs = [self._on_device(x) for x, _ in batches]
        ys = [self._on_device(y) for _, y in batches]
        noises = [sl.job.noise for sl in slots]
        dp = [n is not None for n in noises]
        if any(dp) and not all(dp):
            raise ValueError("clients with and without DP-SGD noise in one batch")
        if all(dp):
            rows = tuple(active)
            with compute_precision(self.precision, self.device), self._attention(per_sample=True):
                grads = self._dp_grads(self.store.params.index_select(0, self.rows_index(rows)), xs, ys, noises,
                                       rows)
        else:
            fixed = self.compiled is not None
            if fixed and len(active) <= TAIL_ROWS < self.slots:
                fixed = self._tail_fixed(active, xs, ys)
            rows, x, y = self._padded(active, xs, ys, fixed)
            index = self.rows_index(rows)
            grads, loss_sum, correct = self._mean_step(index, len(rows), x, y, fixed)
            with torch.no_grad():
                self.loss_sum.index_add_(0, index, loss_sum)
                self.correct.index_add_(0, index, correct)
        if len(rows) == self.slots:
            grad = grads
        else:
            grad = self.grad.zero_().index_copy_(0, self.rows_index(rows), grads)
        self.optim.step(grad, self.active)
        for sl, y in zip(slots, ys):
            sl.steps += 1
            sl.seen += int(y.shape[0])

    def _tail_fixed(self, active: list[int], xs: list[torch.Tensor], ys: list[torch.Tensor]) -> bool:
        """In a round's tail (at most ``TAIL_ROWS`` clients left) under ``run.compile``: whether the compiled
        step over all K slots is faster than the eager one over the clients left, measured once per trainer
        (each way warmed up, then timed; the results are thrown away)."""
        if self._tail is None:
            seconds = {}
            for fixed in (True, False):
                rows, x, y = self._padded(active, xs, ys, fixed)
                index = self.rows_index(rows)
                for _ in range(2):  # warm-up, then the timed one
                    synchronize(self.device)
                    t0 = time.perf_counter()
                    self._mean_step(index, len(rows), x, y, fixed)
                    synchronize(self.device)
                    seconds[fixed] = time.perf_counter() - t0
            self._tail = seconds[True] <= seconds[False]
            log.info("run.compile: with %d of %d clients left, the %s step is faster (%.1f ms compiled over every "
                     "slot, %.1f ms eager over the clients left)", len(active), self.slots,
                     "compiled" if self._tail else "eager", 1e3 * seconds[True], 1e3 * seconds[False])
        return self._tail

    def _padded(self, active: list[int], xs: list[torch.Tensor], ys: list[torch.Tensor], fixed: bool):
        """The rows trained in this step and their batches ``[rows, b, ...]``, padding labelled -1.

        Not ``fixed`` (eager): the active slots, padded to the largest mini-batch. ``fixed`` (compiled): every
        slot, padded to the client batch B (fixed shapes; a slot without a client gets padding only)."""
        sizes = [int(y.shape[0]) for y in ys]
        if not fixed:
            if all(n == sizes[0] for n in sizes):
                return tuple(active), torch.stack(xs), torch.stack(ys)
            return (tuple(active), pad_sequence(xs, batch_first=True),
                    pad_sequence(ys, batch_first=True, padding_value=-1))
        b = max(self.batch_size, *sizes)
        empty_x, empty_y = xs[0][:0], ys[0][:0]
        where = dict(zip(active, range(len(active))))
        full_x = [xs[where[s]] if s in where else empty_x for s in range(self.slots)]
        full_y = [ys[where[s]] if s in where else empty_y for s in range(self.slots)]
        if max(sizes) < b:  # a template of length b makes pad_sequence pad every slot to b
            full_x.append(xs[0].new_zeros((b, *xs[0].shape[1:])))
            full_y.append(ys[0].new_zeros((b,)))
        x = pad_sequence(full_x, batch_first=True)[: self.slots]
        y = pad_sequence(full_y, batch_first=True, padding_value=-1)[: self.slots]
        return tuple(range(self.slots)), x, y

    def _mean_step(self, index: torch.Tensor, rows: int, x: torch.Tensor, y: torch.Tensor, compiled: bool):
        """``_loss_grads`` in ``model.precision``; fused attention where chosen, and plain attention from here on
        (one log line) if the first fused step fails (a kernel without a vmap batching rule or backward)."""
        fused = self._fused(per_sample=False)
        try:
            with compute_precision(self.precision, self.device), self._attention(per_sample=False):
                out = self._loss_grads(index, rows, x, y, compiled)
        except RuntimeError as exc:
            if not fused or self._fused_ok or self.attention == "fused":
                raise
            log.warning("fused attention failed under vmap on %s (%s); client batching uses timm's plain "
                        "attention from here on", self.device, str(exc).splitlines()[0] if str(exc) else exc)
            self.attention = "plain"
            with compute_precision(self.precision, self.device), self._attention(per_sample=False):
                out = self._loss_grads(index, rows, x, y, compiled)
        self._fused_ok = self._fused_ok or fused
        return out

    def _on_device(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device == self.device else t.to(self.device, non_blocking=True)

    def _rows_leaves(self, rows: int):
        """For ``rows`` trained rows: the flat ``[rows, P]`` tensor they are read from (the store itself when
        every slot trains), its per-name views as leaves that require grad, and the per-name views of the flat
        gradient buffer; made once per number of rows and reused every step."""
        got = self._leaves.get(rows)
        if got is None:
            flat = self.store.params if rows == self.slots else self._work[:rows]
            grad_flat = self.grad if rows == self.slots else self._work_grad[:rows]
            leaves = {n: v.requires_grad_(True) for n, v in self.store.views(flat).items()}
            got = self._leaves[rows] = (flat, leaves, grad_flat, list(self.store.views(grad_flat).values()))
        return got

    def _loss_grads(self, index: torch.Tensor, rows: int, x: torch.Tensor, y: torch.Tensor, compiled: bool):
        """Each of the rows ``index``'s gradient of its mean loss over its own mini-batch (padding: label -1,
        weight 0), flat ``[rows, P]``; with each row's loss sum and correct count. One vmapped forward/backward
        (the forward through ``torch.compile`` under ``run.compile``)."""
        flat, leaves, grad_flat, grad_views = self._rows_leaves(rows)
        if rows < self.slots:
            with torch.no_grad():
                torch.index_select(self.store.params, 0, index, out=flat)
        mask = y >= 0
        n = mask.sum(1)
        weight = mask / n.clamp(min=1).unsqueeze(1).to(torch.float32)
        masks = self.rank_mask.index_select(0, index) if self.rank_mask is not None else None
        compiled = compiled and self.compiled is not None
        if compiled:
            try:
                loss, ce, pred = self.compiled(leaves, x, y, weight, masks)
            except Exception as exc:  # noqa: BLE001 -- a backend that fails at its first call: eager from here on
                log.warning("run.compile: torch.compile failed (%s: %s); the eager path is used", type(exc).__name__,
                            str(exc).splitlines()[0] if str(exc) else "")
                self.compiled = None
                compiled = False
        if not compiled:
            loss, ce, pred = self._forward(leaves, x, y, weight, masks)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        with torch.no_grad():
            torch._foreach_copy_(grad_views, grads)
            loss_sum = (ce * weight).sum(1).double() * n.double()
            return grad_flat, loss_sum, ((pred == y) & mask).sum(1)

    def _forward(self, leaves: dict, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                 masks: Optional[torch.Tensor] = None):
        """The summed weighted loss of every row, each sample's loss and prediction (vmapped over rows);
        ``masks``: each row's LoRA rank mask ``[rows, r_max]`` (``None``: every component)."""
        x, logits = self._inputs(x, batch_dims=2)

        def client_loss(p, xk, yk, wk, *mk):
            with rank_masks(self.lora, mk[0] if mk else None):
                out = logits(p, xk)
            ce = F.cross_entropy(out.float(), yk.clamp(min=0), reduction="none")
            return (ce * wk).sum(), ce.detach(), out.detach().argmax(dim=-1)

        args = (leaves, x, y, weight) + (() if masks is None else (masks,))
        loss, ce, pred = vmap(client_loss, randomness="different")(*args)
        return loss.sum(), ce, pred

    def _compile(self):
        """``torch.compile`` of the per-step forward (fixed shapes; its backward compiled with it); ``None``
        (eager, one log line) where it cannot be used."""
        if self.head is not None:
            log.info("run.compile: head-only training runs its backbone once without autograd; it stays eager")
            return None
        try:
            return torch.compile(self._forward, dynamic=False)
        except Exception as exc:  # noqa: BLE001 -- any backend failure falls back to eager
            log.info("run.compile: torch.compile is not available here (%s); the eager path is used", exc)
            return None

    def _inputs(self, x: torch.Tensor, batch_dims: int):
        """What the vmapped function gets, and how it turns one client's (or sample's) part into logits.

        Head only: the pooled backbone features of all samples, computed once without vmap or autograd.
        bf16: the PEFT tensors that enter a Linear or convolution in bf16 (as autocast casts them), the
        frozen weights of those layers in their bf16 copies.
        """
        cast, frozen = self.cast_names, self.frozen

        def low(p):
            if not cast:
                return p
            return {n: (t.to(torch.bfloat16) if n in cast else t) for n, t in p.items()}

        if self.head is None:
            return x, lambda p, xk: functional_call(self.model, {**frozen, **low(p)}, (xk,))
        head, prefix = self.head
        lead = x.shape[:batch_dims]
        with torch.no_grad():
            feats = self.model.forward_head(self.model.forward_features(x.reshape(-1, *x.shape[batch_dims:])),
                                            pre_logits=True)
        feats = feats.reshape(*lead, *feats.shape[1:])
        cut = len(prefix) + 1
        return feats, lambda p, fk: functional_call(head, {n[cut:]: t for n, t in low(p).items()}, (fk,))

    def _fused(self, per_sample: bool) -> bool:
        """Whether timm's fused attention stays on: ``fused``, or ``auto`` on CUDA outside per-sample gradients."""
        return self.attention == "fused" or (self.attention == "auto" and self.device.type == "cuda"
                                             and not per_sample)

    def _attention(self, per_sample: bool):
        return contextlib.nullcontext() if self._fused(per_sample) else vmap_friendly_attention(self.model)

    def _dp_grads(self, params: torch.Tensor, xs, ys, noises: list[ClientNoise], rows) -> torch.Tensor:
        """Per client: per-sample gradients clipped, summed, noised, divided (Opacus's DPOptimizer step);
        flat ``[rows, P]``."""
        a = len(xs)
        sizes = [int(y.shape[0]) for y in ys]
        total = sum(sizes)
        index = self.rows_index(rows)
        views = self.store.views(params)
        summed = torch.zeros_like(params)
        summed_views = self.store.views(summed)
        if total > 0:
            owner = torch.cat([torch.full((n,), i, dtype=torch.int64, device=self.device)
                               for i, n in enumerate(sizes) if n])
            x = torch.cat([xi for xi in xs if len(xi)])
            y = torch.cat([yi for yi in ys if len(yi)])
            per_sample = {n: p.index_select(0, owner) for n, p in views.items()}
            x, logits = self._inputs(x, batch_dims=1)
            masks = () if self.rank_mask is None else (self.rank_mask.index_select(0, index)[owner],)

            def sample_loss(p, xi, yi, *mi):
                with rank_masks(self.lora, mi[0] if mi else None):
                    out = logits(p, xi.unsqueeze(0))
                ce = F.cross_entropy(out.float(), yi.unsqueeze(0))
                return ce, (ce.detach(), out.detach().argmax(dim=-1).squeeze(0))

            g, (ce, pred) = vmap(grad(sample_loss, has_aux=True), randomness="different")(per_sample, x, y, *masks)
            with torch.no_grad():
                norms = torch.stack([t.reshape(total, -1).norm(2, dim=-1) for t in g.values()], dim=1).norm(2, dim=1)
                bounds = {nz.max_grad_norm for nz in noises}
                c = bounds.pop() if len(bounds) == 1 else self.clip_bound.index_select(0, index)[owner]
                factor = clip_factors(norms, c)
                for n, t in g.items():
                    summed_views[n].index_add_(0, owner, t * factor.view(-1, *([1] * (t.dim() - 1))))
                slot_of = index[owner]
                self.loss_sum.index_add_(0, slot_of, ce.double())
                self.correct.index_add_(0, slot_of, (pred == y).to(torch.int64))
        with torch.no_grad():
            for n, s in summed_views.items():  # noise per client, parameter by parameter, as DPOptimizer.add_noise
                s.add_(torch.stack([nz.draw(s[i]) for i, nz in enumerate(noises)]))
            return summed.div_(self.expected.index_select(0, index).view(a, 1))


def autocast_inputs(model: nn.Module, layout: FlatLayout) -> frozenset:
    """Names of the PEFT tensors that are weights or biases of a Linear or convolution: the tensors autocast
    casts to its low-precision dtype when the layer runs."""
    names = set(layout.names)
    out = set()
    for prefix, m in model.named_modules():
        if isinstance(m, _AUTOCAST_LAYERS):
            for pname, _ in m.named_parameters(recurse=False):
                full = f"{prefix}.{pname}" if prefix else pname
                if full in names:
                    out.add(full)
    return frozenset(out)


def frozen_low_precision(model: nn.Module, layout: FlatLayout) -> dict[str, torch.Tensor]:
    """bf16 copies of the frozen weights and biases of the Linear and convolution layers that run as layers
    (not those a PEFT wrapper reads as tensors, e.g. LoRA's merged base weight), made once."""
    names = set(layout.names)
    out = {}
    for prefix, m in model.named_modules():
        if not isinstance(m, _AUTOCAST_LAYERS):
            continue
        parent = prefix.rpartition(".")[0]
        own = prefix + "."
        if any(n.startswith(parent + ".") and not n.startswith(own) for n in names if parent):
            continue  # a sibling holds PEFT tensors: a wrapper (LoRA) that uses this layer's weight itself
        for pname, p in m.named_parameters(recurse=False):
            full = f"{prefix}.{pname}" if prefix else pname
            if full not in names and p.dtype == torch.float32:
                out[full] = p.detach().to(torch.bfloat16)
    return out


TAIL_ROWS = 2  # run.compile: with this many clients left or fewer, the faster of compiled and eager is taken
_AUTOCAST_LAYERS = (nn.Linear,)  # convolutions under vmap + CPU autocast get an uncast input (torch 2.14)
ATTENTION = ("auto", "plain", "fused")


# -- attention under vmap ----------------------------------------------------------------------
@contextlib.contextmanager
def vmap_friendly_attention(model: nn.Module):
    """timm attention modules take their plain path (matmul, softmax, matmul) while vmapped.

    vmap has no batching rule for the fused CPU attention kernel (torch 2.14) and runs it
    sample by sample, and per-sample gradients (``grad`` inside ``vmap``) need a double
    transform; the plain path is batched by vmap everywhere. ``BatchedClientTrainer`` keeps the
    fused kernels on CUDA outside DP-SGD (``attention="auto"``): they save the attention
    matrices a plain step stores per slot, and fall back to this path if a step fails.
    """
    mods = [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool) and m.fused_attn]
    for m in mods:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in mods:
            m.fused_attn = True
