"""The arithmetic of one Opacus ``DPOptimizer`` step, for code that computes per-sample gradients itself.

Sequential clients get DP-SGD from Opacus directly (``privacy.sample_dp``). Client-batched
training (``federated.batched``) computes the per-sample gradients of K clients in one
pass and must then do, per client, exactly what ``DPOptimizer.pre_step`` does:
clip each sample's whole gradient by ``(C / (norm + 1e-6)).clamp(max=1)``, sum, add
Gaussian noise of std ``noise_multiplier * C`` drawn from that client's own noise source
(parameter by parameter, in the optimizer's parameter order, through Opacus's own
``_generate_noise``), and divide by the expected batch size. ``ClientNoise`` carries one
client's values; the privacy hooks hand it out (``SampleDP.client_noise``), so whatever
source they choose (a seeded generator, or Opacus's secure mode) is used as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CLIP_EPS = 1e-6  # opacus.optimizers.optimizer.DPOptimizer.clip_and_accumulate


@dataclass(frozen=True)
class ClientNoise:
    """One client's DP-SGD step parameters and noise source (as given to its ``DPOptimizer``)."""

    noise_multiplier: float
    max_grad_norm: float
    expected_batch_size: float
    generator: torch.Generator | None = None
    secure_mode: bool = False

    @property
    def std(self) -> float:
        return self.noise_multiplier * self.max_grad_norm

    def draw(self, reference: torch.Tensor) -> torch.Tensor:
        """Noise shaped like ``reference``, consuming the source exactly as ``DPOptimizer.add_noise`` does."""
        from opacus.optimizers.optimizer import _generate_noise

        return _generate_noise(std=self.std, reference=reference, generator=self.generator,
                               secure_mode=self.secure_mode)


def clip_factors(per_sample_norms: torch.Tensor, max_grad_norm: float | torch.Tensor) -> torch.Tensor:
    """``DPOptimizer``'s per-sample clip factor: ``(C / (norm + 1e-6)).clamp(max=1)``."""
    return (max_grad_norm / (per_sample_norms + CLIP_EPS)).clamp(max=1.0)
