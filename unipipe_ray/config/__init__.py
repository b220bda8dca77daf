"""Configuration: frozen dataclasses per stage (schema.py) read from YAML and dotted overrides (reader.py)."""

from unipipe_ray.config.reader import (  # noqa: F401
    ConfigError,
    _build,
    _check,
    _one_of,
    _set_dotted,
    config_differences,
    load_config,
    parse_override,
    read_yaml,
    result_differences,
    to_dict,
)
from unipipe_ray.config.sams import SamsSettings  # noqa: F401
from unipipe_ray.config.schema import (  # noqa: F401
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
