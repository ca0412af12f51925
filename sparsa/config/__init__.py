"""Settings: one dataclass per concern (engine.py, offload.py), each field a setting whose
name is the same `LLM(...)` keyword, command-line flag and `sparsa serve` option
(settings.py makes the flags and routes the keywords)."""

from sparsa.config.engine import (
    BF16_PREFILL_CHOICES,
    WHEN_TOO_LARGE,
    CacheConfig,
    DeviceConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
)
from sparsa.config.offload import (
    CAPACITY_MODES,
    ENGINE_POLICIES,
    ON_MISS_CHOICES,
    PREFETCH_CHOICES,
    PREFETCH_EVICTS,
    OffloadConfig,
)
from sparsa.config.settings import (
    Setting,
    add_engine_arguments,
    config_from_args,
    engine_argv,
    engine_config,
    engine_kwargs,
    resolve_engine_args,
    settings,
    with_settings,
)
from sparsa.config.units import parse_dtype, parse_size
from sparsa.platform import physical_cores

__all__ = [
    "BF16_PREFILL_CHOICES",
    "CAPACITY_MODES",
    "ENGINE_POLICIES",
    "ON_MISS_CHOICES",
    "PREFETCH_CHOICES",
    "PREFETCH_EVICTS",
    "WHEN_TOO_LARGE",
    "CacheConfig",
    "DeviceConfig",
    "EngineConfig",
    "ModelConfig",
    "OffloadConfig",
    "SchedulerConfig",
    "Setting",
    "add_engine_arguments",
    "config_from_args",
    "engine_argv",
    "engine_config",
    "engine_kwargs",
    "parse_dtype",
    "parse_size",
    "physical_cores",
    "resolve_engine_args",
    "settings",
    "with_settings",
]
