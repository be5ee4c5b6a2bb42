"""The configuration: one tree of frozen dataclasses (sections.py), the source of every default; how a run's
config is layered from a profile, a YAML file and --set (profiles.py); and the dict/YAML machinery (tree.py).

This is 0.x: a key may be renamed between versions; the old name is then an unknown key, refused with the
closest valid name suggested.
"""

from hamjepa.config.profiles import (
    GPU_PROFILES,
    PROFILES,
    SMOKE_OVERRIDES,
    build_config,
    parse_overrides,
    profile,
    read_yaml_file,
)
from hamjepa.config.sections import (
    AUGMENT_PLACEMENTS,
    DATASET_CHANNELS,
    DATASET_OVERRIDES,
    DATASETS,
    MAX_SEED,
    AugmentConfig,
    ComputeConfig,
    Config,
    DataConfig,
    EncoderConfig,
    EvalConfig,
    HamJEPALossConfig,
    OptimConfig,
    PredictorConfig,
    SIGRegConfig,
)
from hamjepa.config.tree import ConfigError, StrictLoader, field_type, flatten_dict, yaml_problem

__all__ = [
    "AUGMENT_PLACEMENTS", "DATASETS", "DATASET_CHANNELS", "DATASET_OVERRIDES", "GPU_PROFILES", "MAX_SEED", "PROFILES",
    "SMOKE_OVERRIDES", "AugmentConfig", "ComputeConfig", "Config", "ConfigError", "DataConfig", "EncoderConfig",
    "EvalConfig", "HamJEPALossConfig", "OptimConfig", "PredictorConfig", "SIGRegConfig", "build_config",
    "StrictLoader", "field_type", "flatten_dict", "parse_overrides", "profile", "read_yaml_file", "yaml_problem",
]
