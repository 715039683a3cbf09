"""``head``: linear probing, only the new classifier is trained."""

from torch import nn

from fedpeft_hpc.config.schema import PeftConfig
from fedpeft_hpc.peft.registry import register_peft, unfreeze_head


@register_peft("head")
def head(model: nn.Module, cfg: PeftConfig) -> None:
    unfreeze_head(model)
