"""Training augmentation as one batched gather on the rank's device (``data.augment``).

- ``none``: the images as stored.
- ``flip``: each image mirrored left-right with probability 1/2.
- ``crop_flip``: each image padded with black by 1/8 of its side (4 px at 32 px), cut back to
  its size at a random offset, then flipped as above: the standard CIFAR recipe, applied at the
  stored resolution before the resize to the model's input.

Both are exact pixel moves (no interpolation), done for the whole batch by one or two
``torch.gather`` ops on whatever device the batch is on. The random numbers come only from the generator handed
in, a CPU generator drawn per (seed, round, client) by the engine, in a fixed order per batch
(flips, then row offsets, then column offsets): the result depends neither on the device nor
on the number of ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedpeft_hpc.data.transforms import to_device

AUGMENTS = ("none", "flip", "crop_flip")


def crop_padding(side: int) -> int:
    """Zero padding of ``crop_flip`` for an image side: 1/8 of it, at least 1 px."""
    return max(1, round(side / 8))


def augment_batch(x: torch.Tensor, mode: str, generator: torch.Generator | None) -> torch.Tensor:
    """Augment stored images ``[N, C, H, W]`` (uint8 or float) per ``mode``; ``none`` returns ``x``."""
    if mode == "none" or x.shape[0] == 0:
        return x
    return apply_augment(x, mode, augment_draws(x.shape[0], x.shape[2], x.shape[3], mode, generator))


def augment_draws(n: int, h: int, w: int, mode: str, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """The random numbers of ``n`` images' augmentation, drawn from ``generator`` in the fixed order (flips, then
    row offsets, then column offsets). Draws of several batches concatenated (``torch.cat`` per key) augment the
    concatenated images exactly as each batch alone (one gather for several clients' batches)."""
    if mode not in AUGMENTS:
        raise ValueError(f"unknown augmentation {mode!r}; valid: {', '.join(AUGMENTS)}")
    if mode == "none":
        return {}
    if generator is None:
        raise ValueError("augment_batch needs a seeded torch.Generator (the global RNG is not used)")
    draws = {"flip": torch.rand(n, generator=generator) < 0.5}
    if mode == "crop_flip":
        draws["oy"] = torch.randint(0, 2 * crop_padding(h) + 1, (n,), generator=generator)
        draws["ox"] = torch.randint(0, 2 * crop_padding(w) + 1, (n,), generator=generator)
    return draws


def apply_augment(x: torch.Tensor, mode: str, draws: dict[str, torch.Tensor]) -> torch.Tensor:
    """``x`` ``[N, C, H, W]`` augmented per ``mode`` with ``draws`` (``augment_draws`` of N images)."""
    if mode == "none" or x.shape[0] == 0:
        return x
    n, c, h, w = x.shape
    ar_w = torch.arange(w)
    cols = torch.where(draws["flip"][:, None], (w - 1) - ar_w[None, :], ar_w[None, :])  # [n, w]
    if mode == "crop_flip":
        ph, pw = crop_padding(h), crop_padding(w)
        x = F.pad(x, (pw, pw, ph, ph))
        rows = to_device(draws["oy"][:, None] + torch.arange(h)[None, :], x.device)  # [n, h] rows of the padded image
        x = torch.gather(x, 2, rows.view(n, 1, h, 1).expand(n, c, h, x.shape[3]))
        cols = cols + draws["ox"][:, None]
    cols = to_device(cols, x.device)
    return torch.gather(x, 3, cols.view(n, 1, 1, w).expand(n, c, h, w))
