"""``model.precision``: the arithmetic of the backbone's forward/backward in client training, nothing else.

The frozen backbone dominates the cost of a client step, and on a GPU fp32 leaves most of
it idle: measured on an H200 (tools/gpu_probe.py, ViT-B/16 224 px, BitFit), batch 16 ->
256 gains 1.26x in fp32 but 2.7x under bf16 autocast. So:

- ``fp32`` (default): plain fp32 everywhere; the reference for every equivalence test. On
  CUDA both TF32 switches are off inside the block (``cudnn.allow_tf32`` is on by default,
  which would run the patch-embedding convolution in TF32).
- ``tf32``: fp32 tensors, TensorFloat-32 matmuls/convolutions on CUDA (Ampere and later);
  no effect on CPU.
- ``bf16``: ``torch.autocast(dtype=bfloat16)`` around the forward/backward of client training
  (CUDA and CPU).

Evaluation always runs in ``fp32`` (``federated.evaluate``): the accuracy a run reports is the
one its fine-tuned model gets in fp32 from ``load_run`` (CONTRACT).

The PEFT state, its gradients, optimizer states, updates and the aggregation stay fp32/fp64
in every mode (autocast leaves fp32 leaves and their gradients fp32). The settings are
applied for the duration of a ``compute_precision`` block and restored afterwards, so one
process can run several configs.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

PRECISIONS = ("fp32", "tf32", "bf16")


@contextlib.contextmanager
def compute_precision(precision: str, device: torch.device | str) -> Iterator[None]:
    """Run the enclosed forward/backward in ``precision`` on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"model.precision={precision!r}: one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if precision == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
        return
    if device.type == "cuda":  # cuDNN allows TF32 convolutions by default: fp32 turns it off
        with _tf32(precision == "tf32"):
            yield
        return
    yield


@contextlib.contextmanager
def _tf32(allowed: bool) -> Iterator[None]:
    """TF32 matmuls (cuBLAS) and convolutions (cuDNN) allowed or not inside the block, restored after."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
