"""``bias``: BitFit, every bias vector of the backbone plus the head."""

from torch import nn

from fedpeft_hpc.config.schema import PeftConfig
from fedpeft_hpc.peft.registry import register_peft, unfreeze_head


@register_peft("bias")
def bias(model: nn.Module, cfg: PeftConfig) -> None:
    for name, p in model.named_parameters():
        if name.endswith(".bias") or name == "bias":
            p.requires_grad_(True)
    unfreeze_head(model)
