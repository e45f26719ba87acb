"""Typed configuration sections, their loader, and how two configs compare."""

from largebatch.config.compare import SAFE_TO_CHANGE, config_differences, config_hash, flat_config
from largebatch.config.loader import describe_keys, from_flat, load_config, to_dict, valid_keys, write_yaml_atomic
from largebatch.config.schema import (
    CheckpointConfig,
    CommConfig,
    Config,
    DataConfig,
    LogConfig,
    AdaptiveConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    TrainConfig,
)

__all__ = [
    "Config", "RunConfig", "DataConfig", "ModelConfig", "TrainConfig", "OptimConfig", "ScheduleConfig",
    "CommConfig", "CheckpointConfig", "LogConfig", "AdaptiveConfig", "load_config", "from_flat", "to_dict", "valid_keys", "describe_keys", "write_yaml_atomic",
    "SAFE_TO_CHANGE", "config_differences", "config_hash", "flat_config",
]
