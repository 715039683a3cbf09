"""What one optimizer step of the batched trainer asks of the host: operators launched and round trips.

- ``ops_per_step``: the top-level aten operators (``torch.profiler`` CPU events without a parent
  event: what the Python code launches; the backward's operators run inside the autograd engine)
  of the batched trainer's steps, per step.
- ``host_syncs_per_step``: on CUDA, the synchronizations ``torch.cuda.set_sync_debug_mode("warn")``
  reports inside the steps; on CPU, where nothing waits on a device, the calls that would be one
  there (``host_call_counter``: a tensor's value read on the host, or a tensor built from Python data).
  Both per step; 0 is the target.

``host_call_counter`` is also what ``tools/count_ops.py`` and the tests count with.
"""

from __future__ import annotations

import collections
import contextlib
import warnings
from typing import Iterator

import torch

HOST_METHODS = ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def host_call_counter() -> Iterator[collections.Counter]:
    """Counts, by name, of the calls that read a tensor's value on the host (``.item()``, ``.tolist()``,
    ``.cpu()``, ``.numpy()``, a truth test, ``int()``/``float()``/``__index__``) or build a tensor from Python
    data (``torch.tensor``, ``torch.as_tensor``), while the block runs."""
    counts: collections.Counter = collections.Counter()
    saved = [(torch, "tensor", torch.tensor), (torch, "as_tensor", torch.as_tensor)] + \
        [(torch.Tensor, m, getattr(torch.Tensor, m)) for m in HOST_METHODS]

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    for owner, name, fn in saved:
        setattr(owner, name, counted(f"torch.{name}" if owner is torch else name.strip("_"), fn))
    try:
        yield counts
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def python_launched_ops(prof) -> int:
    """aten operators without a parent event in a ``torch.profiler`` trace."""
    return sum(1 for ev in prof.events() if ev.name.startswith("aten::") and ev.cpu_parent is None)


def step_counts(trainer, start: torch.Tensor, jobs) -> dict:
    """Train ``jobs`` on ``trainer`` (a ``BatchedClientTrainer``), counting inside its steps only."""
    from torch.profiler import ProfilerActivity, profile

    device = trainer.device
    inner = trainer._step
    steps, ops, syncs = [0], [0], [0]

    def counted(*args):
        with contextlib.ExitStack() as stack:
            prof = stack.enter_context(profile(activities=[ProfilerActivity.CPU]))
            if device.type == "cuda":
                caught = stack.enter_context(warnings.catch_warnings(record=True))
                warnings.simplefilter("always")
                before = torch.cuda.get_sync_debug_mode()
                torch.cuda.set_sync_debug_mode("warn")
                stack.callback(torch.cuda.set_sync_debug_mode, before)
                inner(*args)
                torch.cuda.set_sync_debug_mode(before)
                syncs[0] += sum("synchroniz" in str(w.message) for w in caught)
            else:
                counts = stack.enter_context(host_call_counter())
                inner(*args)
                syncs[0] += sum(counts.values())
        ops[0] += python_launched_ops(prof)
        steps[0] += 1

    trainer._step = counted
    try:
        for _ in trainer.train(start, jobs):
            pass
    finally:
        trainer._step = inner
    n = max(1, steps[0])
    return {"steps": steps[0], "ops_per_step": ops[0] / n, "host_syncs_per_step": syncs[0] / n}
