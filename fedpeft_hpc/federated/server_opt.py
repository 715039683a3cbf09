"""Server update rules on the flat global PEFT state (Reddi et al., "Adaptive Federated Optimization").

The pseudo-gradient is the aggregated client delta ``mean_k(local_k - global)``; every
rule keeps its state as named flat tensors so it can be checkpointed and resumed exactly.
"""

from __future__ import annotations

from typing import Callable

import torch

from fedpeft_hpc.config.schema import ServerConfig

_RULES: dict[str, Callable[..., "ServerOptimizer"]] = {}


def register_server_opt(name: str):
    def deco(cls):
        _RULES[name] = cls
        return cls

    return deco


class ServerOptimizer:
    slots: tuple[str, ...] = ()
    default_lr = 1.0  # server learning rate when server.lr is not given

    def __init__(self, cfg: ServerConfig, size: int, device: torch.device):
        self.cfg = cfg
        self.lr = float(cfg.lr) if cfg.lr is not None else self.default_lr
        self.state = {s: torch.full((size,), self.initial(s), dtype=torch.float32, device=device)
                      for s in self.slots}
        self.steps = 0

    def initial(self, slot: str) -> float:
        """The starting value of a state slot (0 unless the rule says otherwise)."""
        return 0.0

    def step(self, params: torch.Tensor, delta: torch.Tensor) -> None:
        """Update the flat fp32 ``params`` in place with the fp32 ``delta``."""
        self.steps += 1
        self._step(params, delta)

    def _step(self, params: torch.Tensor, delta: torch.Tensor) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], steps: int) -> None:
        for k in self.slots:
            self.state[k].copy_(state[k])
        self.steps = steps


@register_server_opt("fedavg")
class FedAvg(ServerOptimizer):
    def _step(self, params, delta):
        params.add_(delta, alpha=self.lr)


@register_server_opt("fedavgm")
class FedAvgM(ServerOptimizer):
    slots = ("momentum",)

    def _step(self, params, delta):
        buf = self.state["momentum"]
        buf.mul_(self.cfg.momentum).add_(delta)
        params.add_(buf, alpha=self.lr)


@register_server_opt("fedadam")
class FedAdam(ServerOptimizer):
    """Reddi et al. 2021, Algorithm 2 (FedAdam): m_0 = 0, v_0 = tau^2 (the paper asks v_0 >= tau^2),
    no bias correction; x += eta * m / (sqrt(v) + tau). Default eta 1e-2 (the paper tunes it on a
    grid around 10^-2; FedAvg's 1.0 would be far too large for an adaptive step)."""

    slots = ("m", "v")
    default_lr = 1e-2

    def initial(self, slot: str) -> float:
        return self.cfg.eps ** 2 if slot == "v" else 0.0

    def _step(self, params, delta):
        m, v = self.state["m"], self.state["v"]
        m.mul_(self.cfg.beta1).add_(delta, alpha=1 - self.cfg.beta1)
        v.mul_(self.cfg.beta2).addcmul_(delta, delta, value=1 - self.cfg.beta2)
        params.addcdiv_(m, v.sqrt().add_(self.cfg.eps), value=self.lr)


def build_server_optimizer(cfg: ServerConfig, size: int, device: torch.device) -> ServerOptimizer:
    return _RULES[cfg.optimizer](cfg, size, device)
