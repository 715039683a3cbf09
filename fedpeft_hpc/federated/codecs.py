"""Update encoders for the wire: what a client sends up and what the server sends down.

Each codec turns a flat fp32 vector into an ``Encoded`` payload (the tensors a deployment would
serialise) and back. ``Encoded.nbytes`` is the size of exactly those tensors: values, indices,
scales and the header; ``Codec.size(n)`` is the same number from ``n`` alone (every codec here
sends a size that does not depend on the values), which the ledger uses and which each encoding
is checked against. Error bounds, per element ``i`` of ``x`` (``decode(encode(x)) - x``):

- ``none``: exact. 4 bytes a value.
- ``fp16``: ``|e_i| <= 2^-11 |x_i| + 2^-25`` for ``|x_i| <= 65504`` (round to nearest; the second
  term covers subnormals); larger values saturate at 65504 (``|e_i| = |x_i| - 65504``). 2 bytes a value.
- ``bf16``: ``|e_i| <= 2^-8 |x_i|`` (round to nearest; fp32's range). 2 bytes a value.
- ``int8`` / ``int4``: blocks of ``block`` values share one fp32 scale ``s = max|x_block| / L``
  (``L`` = 127 or 7); each value is ``s * q`` with ``q`` rounded stochastically to one of its two
  neighbouring integers in ``[-L, L]`` (``E[decode] = x``: unbiased), so ``|e_i| < s``.
  int8: 1 byte a value; int4: two values a byte (``ceil(n / 2)``); plus 4 bytes a block.
- ``topk``: the ``k = max(1, ceil(fraction * n))`` entries of largest magnitude, exact (fp32
  values, indices as int16 when ``n <= 32768``, else int32), plus an 8-byte header (``n`` and
  ``k`` as uint32); every dropped entry satisfies ``|x_i| <= min`` over the kept ones, and
  ``||e||_2^2`` is the sum of the dropped squares.

The random numbers of stochastic rounding come from a ``torch.Generator`` the caller derives from
``(seed, tag, round, client)``: the same on every rank and any number of ranks.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import torch

from fedpeft_hpc.config.schema import CODEC_CHOICES

CODECS = CODEC_CHOICES
FP16_MAX = 65504.0


@dataclass
class Encoded:
    """One encoded vector: the tensors on the wire (by name) and the header fields."""

    codec: str
    n: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    header_bytes: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: every payload tensor's storage plus the header."""
        return self.header_bytes + sum(t.numel() * t.element_size() for t in self.tensors.values())


class Codec(ABC):
    """One encoding: ``encode`` a flat vector (``gen``: the stochastic rounding's random numbers), ``decode`` it
    back to fp32, its ``size`` in bytes for ``n`` values, its per-element ``error_bound``."""

    name: str

    @abstractmethod
    def encode(self, x: torch.Tensor, gen: torch.Generator | None = None) -> Encoded: ...

    def decode(self, enc: Encoded) -> torch.Tensor:
        return enc.tensors["values"].to(torch.float32)

    @abstractmethod
    def size(self, n: int) -> int:
        """Bytes ``encode`` produces for ``n`` values (every codec here: whatever the values)."""

    @abstractmethod
    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """Per-element bound on ``|decode(encode(x)) - x|`` (see the module docstring)."""


_REGISTRY: dict[str, Callable[[int, float], Codec]] = {}


def register_codec(name: str):
    """``@register_codec("int8")`` on a factory ``(block, topk_fraction) -> Codec``."""
    def wrap(factory):
        _REGISTRY[name] = factory
        return factory
    return wrap


class Fp32Codec(Codec):
    name = "none"

    def encode(self, x: torch.Tensor, gen: torch.Generator | None = None) -> Encoded:
        return Encoded(self.name, x.numel(), {"values": x.detach().reshape(-1).to(torch.float32).clone()})

    def size(self, n: int) -> int:
        return 4 * n

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x, dtype=torch.float32)


class HalfCodec(Codec):
    def __init__(self, name: str):
        self.name = name
        self.dtype = torch.float16 if name == "fp16" else torch.bfloat16

    def encode(self, x: torch.Tensor, gen: torch.Generator | None = None) -> Encoded:
        x = x.detach().reshape(-1)
        if self.dtype == torch.float16:
            x = x.clamp(-FP16_MAX, FP16_MAX)  # saturate: fp16 has no larger finite value
        return Encoded(self.name, x.numel(), {"values": x.to(self.dtype)})

    def size(self, n: int) -> int:
        return 2 * n

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        a = x.abs().to(torch.float32)
        if self.dtype == torch.bfloat16:
            return a * 2.0 ** -8
        return torch.where(a <= FP16_MAX, a * 2.0 ** -11 + 2.0 ** -25, a - FP16_MAX)


class IntCodec(Codec):
    """Symmetric integer levels ``[-L, L]`` per block, one fp32 scale a block, stochastic rounding."""

    def __init__(self, name: str, block: int):
        self.name = name
        self.bits = 8 if name == "int8" else 4
        self.levels = 127 if self.bits == 8 else 7
        self.block = block

    def _scales(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel()
        blocks = math.ceil(n / self.block)
        padded = torch.zeros(blocks * self.block, dtype=torch.float32, device=x.device)
        padded[:n] = x
        return padded.view(blocks, self.block).abs().amax(dim=1) / self.levels

    def encode(self, x: torch.Tensor, gen: torch.Generator | None = None) -> Encoded:
        x = x.detach().reshape(-1).to(torch.float32)
        n = x.numel()
        scales = self._scales(x)
        per = scales.repeat_interleave(self.block)[:n]
        safe = torch.where(per > 0, per, torch.ones_like(per))
        y = x / safe
        low = torch.floor(y)
        u = torch.rand(n, generator=gen, dtype=torch.float32, device="cpu").to(x.device)
        q = (low + (u < (y - low)).to(torch.float32)).clamp_(-self.levels, self.levels)
        q = torch.where(per > 0, q, torch.zeros_like(q)).to(torch.int8)
        if self.bits == 4:
            q = _pack_nibbles(q)
        return Encoded(self.name, n, {"q": q, "scales": scales})

    def decode(self, enc: Encoded) -> torch.Tensor:
        q = enc.tensors["q"]
        if self.bits == 4:
            q = _unpack_nibbles(q, enc.n)
        per = enc.tensors["scales"].repeat_interleave(self.block)[:enc.n]
        return q.to(torch.float32) * per

    def size(self, n: int) -> int:
        values = n if self.bits == 8 else math.ceil(n / 2)
        return values + 4 * math.ceil(n / self.block)

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().reshape(-1).to(torch.float32)
        return self._scales(x).repeat_interleave(self.block)[:x.numel()]


class TopKCodec(Codec):
    name = "topk"
    HEADER = 8  # n and k, uint32 each

    def __init__(self, fraction: float):
        self.fraction = fraction

    def k(self, n: int) -> int:
        return min(n, max(1, math.ceil(self.fraction * n)))

    @staticmethod
    def index_dtype(n: int) -> torch.dtype:
        return torch.int16 if n <= 2 ** 15 else torch.int32

    def encode(self, x: torch.Tensor, gen: torch.Generator | None = None) -> Encoded:
        x = x.detach().reshape(-1).to(torch.float32)
        n = x.numel()
        # ties broken by position (a stable sort): the same choice on every device and rank
        order = torch.sort(x.abs(), descending=True, stable=True).indices[:self.k(n)]
        idx = torch.sort(order).values
        return Encoded(self.name, n, {"values": x[idx].clone(), "indices": idx.to(self.index_dtype(n))},
                       header_bytes=self.HEADER)

    def decode(self, enc: Encoded) -> torch.Tensor:
        values = enc.tensors["values"]
        out = torch.zeros(enc.n, dtype=torch.float32, device=values.device)
        out[enc.tensors["indices"].to(torch.int64)] = values
        return out

    def size(self, n: int) -> int:
        k = self.k(n)
        return self.HEADER + 4 * k + k * torch.tensor([], dtype=self.index_dtype(n)).element_size()

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """Dropped entries lose themselves: ``|e_i| <= |x_i|``, and none exceeds the smallest kept one."""
        a = x.detach().reshape(-1).abs().to(torch.float32)
        kth = torch.sort(a, descending=True).values[self.k(a.numel()) - 1] if a.numel() else a.new_zeros(())
        return torch.minimum(a, kth.expand_as(a))


register_codec("none")(lambda block, fraction: Fp32Codec())
register_codec("fp16")(lambda block, fraction: HalfCodec("fp16"))
register_codec("bf16")(lambda block, fraction: HalfCodec("bf16"))
register_codec("int8")(lambda block, fraction: IntCodec("int8", block))
register_codec("int4")(lambda block, fraction: IntCodec("int4", block))
register_codec("topk")(lambda block, fraction: TopKCodec(fraction))


def build_codec(name: str, block: int = 256, topk_fraction: float = 0.1) -> Codec:
    """The codec ``name`` (``block``: values per int8/int4 scale; ``topk_fraction``: the share top-k sends)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown codec {name!r}; one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name](block, topk_fraction)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-7, 7] -> uint8, two a byte (offset by 8; an odd count padded with a zero)."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    if u.numel() % 2:
        u = torch.cat([u, u.new_full((1,), 8)])
    return u[0::2] | (u[1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    lo = (packed & 0x0F).to(torch.int16) - 8
    hi = (packed >> 4).to(torch.int16) - 8
    return torch.stack([lo, hi], dim=1).reshape(-1)[:n].to(torch.int8)
