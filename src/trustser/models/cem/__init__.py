"""Confidence estimation model (CEM) for automatically annotated SED labels."""

from .configuration_cem import CEM_POOLINGS, CemConfig
from .modeling_cem import CemOutput, ConfidenceEstimationModel


def register() -> None:
    """Adds the CEM to transformers' AutoConfig / AutoModel (idempotent)."""
    from transformers import AutoConfig, AutoModel

    try:
        AutoConfig.register(CemConfig.model_type, CemConfig)
    except ValueError:  # already registered
        pass
    try:
        AutoModel.register(CemConfig, ConfidenceEstimationModel)
    except ValueError:
        pass


__all__ = ["CemConfig", "ConfidenceEstimationModel", "CemOutput", "CEM_POOLINGS", "register"]
