"""Every random stream of a run, derived from ``(seed, tag, *keys)`` and never from the rank.

A stream is a NumPy ``Generator`` seeded with the integer list ``[seed, tag, *keys]`` (or a
``torch.Generator`` seeded from it). Tags keep two uses from ever sharing random numbers; the
keys are the round and the client where a stream belongs to one. Cohort sampling, dropout,
each client's data order, its noise and its stochastic layers are therefore pure functions of
these keys, and any number of processes draws exactly the same values.

Tags 1-7 are the data's own streams (their values are part of the results: changing one
changes every partition and subsample drawn with it).
"""

from __future__ import annotations

import numpy as np

# data (values fixed by history: they define today's partitions)
SYNTHETIC_DATA = 1
PARTITION_IID = 2
PARTITION_DIRICHLET = 3
SUBSAMPLE = 7
# federation
COHORT = 11
DROPOUT = 12
CLIENT_DATA = 13
CENTRAL_NOISE = 14
CLIENT_NOISE = 15
CLIENT_LAYERS = 16  # stochastic layers (drop path, dropout) of a client's forward
# 17: unused (never give a retired number to another stream)
AUGMENT = 18
POISSON_COHORT = 19
PATCHES = 20  # where the skimage_* tasks cut their patches (with FIXED_SPLIT_SEED: a fixed task)
LORA_TIERS = 21  # which clients get which LoRA rank (peft.lora_ranks)
COMPRESS_UP = 22  # stochastic rounding of a client's encoded update (fed.compress_up)
COMPRESS_DOWN = 23  # stochastic rounding of the round's encoded global state (fed.compress_down)
CLIENT_TEST = 24  # which of a client's samples it holds out (data.client_test_fraction)

FIXED_SPLIT_SEED = 0  # splits that must not move with the run seed (digits, image folders)


def rng(seed: int, *keys: int) -> np.random.Generator:
    """The NumPy stream ``[seed, *keys]``."""
    return np.random.default_rng([int(seed), *map(int, keys)])


def derived_seed(seed: int, *keys: int) -> int:
    """A 63-bit integer drawn from the stream ``[seed, *keys]`` (to seed torch generators)."""
    return int(rng(seed, *keys).integers(0, 2**63 - 1))


def torch_generator(seed: int, *keys: int, device=None):
    """A ``torch.Generator`` (on ``device``, default CPU) seeded from the stream ``[seed, *keys]``."""
    import torch

    g = torch.Generator(device=device if device is not None else "cpu")
    g.manual_seed(derived_seed(seed, *keys))
    return g
