"""PEFT methods (registry, one module per method) and the client-state helpers."""

from fedpeft_hpc.peft.registry import (apply_peft, count_params, frozen_params, get_method, param_bytes,
                                       register_peft, registered_methods)
from fedpeft_hpc.peft.state import FlatLayout, load_peft_state, load_vector, peft_params

__all__ = ["FlatLayout", "apply_peft", "count_params", "frozen_params", "get_method", "load_peft_state",
           "load_vector", "param_bytes", "peft_params", "register_peft", "registered_methods"]
