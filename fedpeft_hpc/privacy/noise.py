"""Where DP noise comes from: a secret nobody can read back (default), or the seed (simulation).

With ``privacy.seeded_noise=false`` (the default) every noise generator is keyed by a 256-bit
secret drawn from the operating system (``secrets``) on rank 0 when the run starts and handed
to the other ranks in memory (one all-reduce); it is never written anywhere. All ranks thus
apply the same noise, but nobody holding the run directory (config, seed, checkpoints) can
regenerate it and subtract it. Each stream's state comes from BLAKE2b keyed by the secret over
(tag, round, client), so the streams of two clients or two rounds are unrelated: NumPy streams
(cohorts and dropout under client-level DP) are seeded with the full 256-bit digest (NumPy's
``SeedSequence`` keeps all of it), torch generators (DP noise, DP-SGD batch membership) with a
64-bit digest, the most ``torch.Generator.manual_seed`` takes; a torch stream is thus as strong
as a 64-bit key (Mersenne Twister state seeded from it), the secret itself stays 256 bits. Noise is further
drawn the way Opacus' ``secure_mode`` draws it (sum of four Gaussians over two, after a discarded
draw), which defeats floating-point attacks on the Gaussian sampler (Holohan & Braghin 2021).
Runs are then not repeatable by design; a resumed run draws a new secret.

The same key also draws what the accountants assume to be hidden: which samples a DP-SGD
step uses (``SampleDP.batch_generator``) and, under client-level DP, which clients a round
samples (``federated.sampling.Schedule.use_key``). Subsampling amplifies privacy only when
membership is secret; drawn from the seed it could be recomputed from config.yaml.

With ``privacy.seeded_noise=true`` the generators derive from the seed like every other stream
(``utils.streams``): runs and resumes are bitwise repeatable, and the reported epsilon holds only
against someone who does not know the seed (it is in config.yaml). For simulation studies.
"""

from __future__ import annotations

import hashlib
import logging
import secrets

import numpy as np
import torch

from fedpeft_hpc.utils.streams import rng, torch_generator

log = logging.getLogger(__name__)

SECRET_WORDS = 4  # 4 x 64 bits


class NoiseKey:
    """Makes the noise generators of a run: ``generator(tag, round, client)``."""

    def __init__(self, seed: int | None = None, secret: bytes | None = None):
        if (seed is None) == (secret is None):
            raise ValueError("NoiseKey takes a seed or a secret")
        self._seed = seed
        self._secret = secret

    @classmethod
    def seeded(cls, seed: int) -> "NoiseKey":
        return cls(seed=int(seed))

    @classmethod
    def from_secret(cls, secret: bytes) -> "NoiseKey":
        return cls(secret=bytes(secret))

    @property
    def secure(self) -> bool:
        """True when the noise cannot be regenerated from anything written to disk."""
        return self._secret is not None

    def _secret_seed(self, tag: int, *keys: int, bits: int = 256) -> int:
        """A ``bits``-bit digest of (tag, *keys) keyed by the secret (BLAKE2b's digest size sets it)."""
        msg = b"/".join(str(int(k)).encode() for k in (tag, *keys))
        digest = hashlib.blake2b(msg, key=self._secret, digest_size=bits // 8).digest()
        return int.from_bytes(digest, "little")

    def generator(self, tag: int, *keys: int, device=None) -> torch.Generator:
        """A torch generator for (tag, *keys); with a seed, exactly ``utils.streams.torch_generator``."""
        if self._seed is not None:
            return torch_generator(self._seed, tag, *keys, device=device)
        g = torch.Generator(device=device if device is not None else "cpu")
        g.manual_seed(self._secret_seed(tag, *keys, bits=64))  # manual_seed takes at most 64 bits
        return g

    def rng(self, tag: int, *keys: int) -> np.random.Generator:
        """A NumPy generator for (tag, *keys); with a seed, exactly ``utils.streams.rng`` (so seeded
        runs draw what they always drew)."""
        if self._seed is not None:
            return rng(self._seed, tag, *keys)
        return np.random.default_rng(self._secret_seed(tag, *keys, bits=256))  # SeedSequence keeps all 256 bits


def fresh_secret() -> bytes:
    return secrets.token_bytes(8 * SECRET_WORDS)


def secret_as_words(secret: bytes) -> torch.Tensor:
    """A secret as int64 words (to travel through an all-reduce); ``words_as_secret`` inverts it."""
    return torch.frombuffer(bytearray(secret), dtype=torch.int64).clone()


def words_as_secret(words: torch.Tensor) -> bytes:
    return words.to(torch.int64).cpu().contiguous().numpy().tobytes()


def gaussian(std: float, numel: int, generator: torch.Generator, secure: bool,
             dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``numel`` draws of N(0, std^2) on the generator's device; ``secure`` as Opacus' secure_mode."""
    device = generator.device
    if std == 0.0:
        return torch.zeros(numel, dtype=dtype, device=device)
    if not secure:
        return torch.normal(0.0, std, size=(numel,), generator=generator, dtype=dtype, device=device)
    torch.normal(0.0, std, size=(1,), generator=generator, dtype=dtype, device=device)  # discarded
    total = torch.zeros(numel, dtype=dtype, device=device)
    for _ in range(4):
        total += torch.normal(0.0, std, size=(numel,), generator=generator, dtype=dtype, device=device)
    return total / 2
