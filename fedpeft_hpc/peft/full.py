"""``full``: every parameter is trained and exchanged (the FedAvg baseline)."""

from torch import nn

from fedpeft_hpc.config.schema import PeftConfig
from fedpeft_hpc.peft.registry import register_peft


@register_peft("full")
def full(model: nn.Module, cfg: PeftConfig) -> None:
    for p in model.parameters():
        p.requires_grad_(True)
