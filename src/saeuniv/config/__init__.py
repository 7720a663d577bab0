"""Run configuration: typed sections, safe YAML loading, validation and hashing.

A config is a tree of frozen dataclasses (``sections``). ``load_config`` reads YAML with
the safe loader, rejects unknown keys (naming them and the allowed ones), applies
``key.path=value`` overrides and validates ranges (``checks``) before any work starts.
"""

from .checks import check, validate
from .loading import (
    CONFIG_DIR,
    from_dict,
    load_config,
    merge_config,
    read_config,
    safe_yaml,
    set_path,
)
from .sections import (
    DEVICES,
    DTYPES,
    EXECUTORS,
    MATCH_BASES,
    MATCH_POLICIES,
    METRICS,
    MODEL_SOURCES,
    PAIRS,
    SAE_ARCHITECTURES,
    SAE_SOURCES,
    Config,
    ConfigError,
    CorpusConfig,
    ExecutionConfig,
    ExtractConfig,
    FamilyConfig,
    MatchConfig,
    MemberConfig,
    ModelRef,
    SAEConfig,
    SAERef,
    SimilarityConfig,
    SubspacesConfig,
    TokenizerConfig,
    TrackingConfig,
    digest,
    plain,
)

__all__ = [
    "CONFIG_DIR", "DEVICES", "DTYPES", "EXECUTORS", "MATCH_BASES", "MATCH_POLICIES", "METRICS",
    "MODEL_SOURCES", "PAIRS",
    "SAE_ARCHITECTURES", "SAE_SOURCES", "Config", "ConfigError", "CorpusConfig",
    "ExecutionConfig", "ExtractConfig", "FamilyConfig", "MatchConfig", "MemberConfig",
    "ModelRef", "SAEConfig", "SAERef", "SimilarityConfig", "SubspacesConfig", "TokenizerConfig",
    "TrackingConfig",
    "check", "digest", "from_dict", "load_config", "merge_config", "plain", "read_config",
    "safe_yaml", "set_path", "validate",
]
