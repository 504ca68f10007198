"""Confidence estimation model (CEM) for automatically annotated SED labels."""

from .configuration_cem import CEM_POOLINGS, DEFAULT_POOLING, CemConfig
from .modeling_cem import CemModel, CemOutput


def register() -> None:
    """Adds the CEM to transformers' AutoConfig / AutoModel (idempotent)."""
    from .. import register_config_and_model

    register_config_and_model(CemConfig, CemModel)


__all__ = ["CemConfig", "CemModel", "CemOutput", "CEM_POOLINGS", "DEFAULT_POOLING", "register"]
