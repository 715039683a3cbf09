"""PEFT methods (registry) and the client-state helpers."""

from fedpeft_hpc.peft.registry import (apply_peft, count_params, frozen_params, peft_params, register_peft,
                                       registered_methods)

__all__ = ["apply_peft", "count_params", "frozen_params", "peft_params", "register_peft", "registered_methods"]
