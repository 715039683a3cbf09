"""Typed configuration sections and their YAML loader."""

from fedpeft_hpc.config.load import apply_overrides, dotted, dump_yaml, from_dict, load_config, to_dict
from fedpeft_hpc.config.schema import (CommConfig, Config, DataConfig, EvalConfig, FedConfig, ModelConfig,
                                       OptimConfig, PeftConfig, PrivacyConfig, RunConfig, ServerConfig)

__all__ = ["Config", "RunConfig", "ModelConfig", "PeftConfig", "DataConfig", "FedConfig", "OptimConfig",
           "ServerConfig", "EvalConfig", "PrivacyConfig", "CommConfig", "load_config", "from_dict",
           "apply_overrides", "dotted", "to_dict", "dump_yaml"]
