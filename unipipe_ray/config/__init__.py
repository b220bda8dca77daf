"""Configuration: frozen dataclasses per stage (schema.py, sams.py) read from YAML files and dotted overrides
(reader.py). Standard library and yaml only: loading a config imports no torch.

    cfg = load_config(DPOConfig, "dpo.yaml", ["beta=0.2"])
    cfg, given = load_config_with_keys(PipelineConfig, path, overrides)   # one read: also the keys the user set
    tree = to_dict(cfg); set_dotted(tree, "dpo.beta", 0.5); cfg = build_config(PipelineConfig, tree)
"""

from unipipe_ray.config.reader import (
    ConfigError,
    build_config,
    check,
    config_differences,
    given_keys,
    load_config,
    load_config_with_keys,
    one_of,
    parse_override,
    read_yaml,
    result_differences,
    set_dotted,
    to_dict,
)
from unipipe_ray.config.sams import SamsSettings
from unipipe_ray.config.schema import (
    DEFAULT_MODEL,
    STAGES,
    DataConfig,
    DataSource,
    DPOConfig,
    LoraConfig,
    PipelineConfig,
    PPOConfig,
    RMConfig,
    SFTConfig,
    TrainConfig,
    chunk_size,
)

__all__ = [
    "DEFAULT_MODEL", "STAGES", "ConfigError", "DataConfig", "DataSource", "DPOConfig", "LoraConfig", "PipelineConfig",
    "PPOConfig", "RMConfig", "SFTConfig", "SamsSettings", "TrainConfig", "build_config", "check", "chunk_size",
    "config_differences", "given_keys", "load_config", "load_config_with_keys", "one_of", "parse_override",
    "read_yaml", "result_differences", "set_dotted", "to_dict",
]
