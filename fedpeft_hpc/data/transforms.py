"""Image preprocessing: one spec (size, channels, normalisation) for files and in-memory tensors.

``to_model_input`` is the batched path every dataset takes (on the rank's device);
``eval_transform`` is the per-sample PIL reference it is tested against.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fedpeft_hpc.errors import DataError


@dataclass(frozen=True)
class ImageSpec:
    """What the model expects: square ``img_size`` input, ``in_chans`` channels, mean/std."""

    img_size: int
    in_chans: int = 3
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)


def _per_channel(values: tuple[float, ...], in_chans: int, what: str) -> tuple[float, ...]:
    vals = tuple(float(v) for v in values)
    if len(vals) == in_chans:
        return vals
    if len(vals) == 1:
        return vals * in_chans
    if in_chans == 1:
        return (sum(vals) / len(vals),)
    raise DataError(f"image {what} has {len(vals)} values but the model takes {in_chans} channels; "
                    f"give 1 or {in_chans} values")


def _check_chans(in_chans: int) -> None:
    if in_chans not in (1, 3):
        raise DataError(f"image inputs need 1 or 3 channels, the model takes in_chans={in_chans}")


class _ToMode:
    """Picklable PIL mode conversion (``L`` or ``RGB``), so DataLoader workers can use it."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, img: Any) -> Any:
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"_ToMode({self.mode!r})"


def eval_transform(spec: ImageSpec) -> Any:
    """PIL image -> normalised ``[in_chans, img_size, img_size]`` float tensor."""
    from torchvision import transforms as T

    _check_chans(spec.in_chans)
    return T.Compose([
        _ToMode("RGB" if spec.in_chans == 3 else "L"),
        T.Resize((spec.img_size, spec.img_size)),
        T.ToTensor(),
        T.Normalize(_per_channel(spec.mean, spec.in_chans, "mean"), _per_channel(spec.std, spec.in_chans, "std")),
    ])


_LUMA = (0.299, 0.587, 0.114)


@functools.lru_cache(maxsize=32)
def _constants(mean: tuple[float, ...], std: tuple[float, ...],
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, std and luma weights as ``[1, C, 1, 1]`` tensors on ``device``, made once (a fresh
    host-to-GPU copy per batch would make the host wait for the GPU)."""
    def col(v):
        return torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1).to(device)

    return col(mean), col(std), col(_LUMA)


def to_model_input(x: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """Stored images ``[N, C, h, w]`` -> model input ``[N, in_chans, img_size, img_size]`` float32, normalised.

    ``x`` is uint8 (0..255, scaled like ``ToTensor``) or float in [0, 1], on any device; the
    result stays on that device. The one implementation behind batches, ``dataset[i]`` and
    ``tensor_to_spec``: every path gives the same numbers. Resizing is bilinear, antialiased
    only when shrinking (like PIL); enlarging and equal sizes use the plain kernel.
    """
    if x.ndim != 4:
        raise DataError(f"expected images shaped [N, C, H, W], got {tuple(x.shape)}")
    _check_chans(spec.in_chans)
    if x.shape[1] not in (1, 3):
        raise DataError(f"images have {x.shape[1]} channels; only 1 or 3 are supported")
    mean, std, luma = _constants(_per_channel(spec.mean, spec.in_chans, "mean"),
                                 _per_channel(spec.std, spec.in_chans, "std"), x.device)
    size = (spec.img_size, spec.img_size)
    b = x.to(torch.float32).div_(255) if x.dtype == torch.uint8 else x.to(torch.float32)  # float: may alias x
    if b.shape[1] == 3 and spec.in_chans == 1:
        b = (b * luma).sum(1, keepdim=True)
    if tuple(b.shape[-2:]) != size and b.shape[0] > 0:
        shrink = b.shape[-2] > size[0] or b.shape[-1] > size[1]
        b = F.interpolate(b, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    elif tuple(b.shape[-2:]) != size:
        b = b.new_empty((0, b.shape[1], *size))
    if b.shape[1] == 1 and spec.in_chans == 3:
        b = b.expand(-1, 3, -1, -1)
    return b.sub(mean).div_(std)  # a new tensor, then in place: the same numbers as (b - mean) / std


def tensor_to_spec(x: torch.Tensor, spec: ImageSpec, chunk: int = 512) -> torch.Tensor:
    """``[N, C, h, w]`` in [0, 1] -> ``[N, in_chans, img_size, img_size]`` float32, normalised (in chunks)."""
    if x.ndim != 4:
        raise DataError(f"expected images shaped [N, C, H, W], got {tuple(x.shape)}")
    out = torch.empty((x.shape[0], spec.in_chans, spec.img_size, spec.img_size), dtype=torch.float32)
    for start in range(0, x.shape[0], chunk):
        out[start:start + chunk] = to_model_input(x[start:start + chunk], spec)
    return out


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; from host memory to a GPU through pinned memory, without blocking."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
