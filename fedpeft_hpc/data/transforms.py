"""Image preprocessing: one spec (size, channels, normalisation) for files and in-memory tensors."""

from __future__ import annotations

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


def tensor_to_spec(x: torch.Tensor, spec: ImageSpec, chunk: int = 512) -> torch.Tensor:
    """``[N, C, h, w]`` in [0, 1] -> ``[N, in_chans, img_size, img_size]`` float32, normalised."""
    if x.ndim != 4:
        raise DataError(f"expected images shaped [N, C, H, W], got {tuple(x.shape)}")
    _check_chans(spec.in_chans)
    if x.shape[1] not in (1, 3):
        raise DataError(f"images have {x.shape[1]} channels; only 1 or 3 are supported")
    mean = torch.tensor(_per_channel(spec.mean, spec.in_chans, "mean")).view(1, -1, 1, 1)
    std = torch.tensor(_per_channel(spec.std, spec.in_chans, "std")).view(1, -1, 1, 1)
    size = (spec.img_size, spec.img_size)
    out = torch.empty((x.shape[0], spec.in_chans, *size), dtype=torch.float32)
    for start in range(0, x.shape[0], chunk):
        b = x[start:start + chunk].to(torch.float32)
        if b.shape[1] == 3 and spec.in_chans == 1:
            b = (b * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if tuple(b.shape[-2:]) != size:
            b = F.interpolate(b, size=size, mode="bilinear", align_corners=False, antialias=False)
        if b.shape[1] == 1 and spec.in_chans == 3:
            b = b.expand(-1, 3, -1, -1)
        out[start:start + chunk] = (b - mean) / std
    return out
