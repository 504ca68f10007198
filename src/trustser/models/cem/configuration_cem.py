"""Configuration of the confidence estimation model (CEM): plain declarative data (transformers 5
dataclass config), checked in ``__post_init__``."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ...descriptors import SED_FIELDS

CEM_POOLINGS = ("sed_tokens", "mean")
DEFAULT_POOLING = "sed_tokens"


@strict
class CemConfig(PreTrainedConfig):
    r"""
    The CEM reads SER-SLM last-layer hidden states and returns one confidence per SED field.

    Args:
        input_size (`int`, defaults to 640): feature size: ``5 * H`` for ``feature_pooling="sed_tokens"``,
            ``H`` for ``"mean"`` (H = the SER-SLM's LLM hidden size). Checked against ``slm_hidden_size``
            when both are set.
        hidden_size (`int`, defaults to 256): width of the three hidden layers.
        dropout (`float`, defaults to 0.1): dropout after each hidden layer (paper: 0.1).
        batch_norm_eps (`float`, defaults to 1e-5): epsilon of the hidden layers' BatchNorm.
        field_names (`list[str]`, defaults to `descriptors.SED_FIELDS`): the output order.
        feature_pooling (`str`, defaults to `"sed_tokens"`): how the features were pooled from the
            SLM's hidden states (``cem_features.cem_features``); stored so that scoring extracts the
            features the CEM was trained on.
        slm_hidden_size (`int`, defaults to 0): the SER-SLM hidden size H the features come from (0 = unknown).
        initializer_range (`float`, defaults to 0.02): standard deviation of the weight initialisation.
    """

    model_type = "cem"
    # checkpoints saved before the model types followed the folder names still load
    model_type_aliases = ("trustser_cem",)

    input_size: int = 640
    hidden_size: int = 256
    dropout: float | int = 0.1
    batch_norm_eps: float = 1e-5
    field_names: list[str] | tuple[str, ...] = SED_FIELDS
    feature_pooling: str = DEFAULT_POOLING
    slm_hidden_size: int = 0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if kwargs.get("model_type") in self.model_type_aliases:  # a checkpoint saved under an earlier name
            kwargs.pop("model_type")
        self.field_names = list(self.field_names)
        super().__post_init__(**kwargs)
        if self.feature_pooling not in CEM_POOLINGS:
            raise ValueError(f"CemConfig.feature_pooling must be one of {CEM_POOLINGS}, got {self.feature_pooling!r}")
        if self.input_size <= 0 or self.hidden_size <= 0:
            raise ValueError(
                f"CemConfig sizes must be positive (input_size={self.input_size}, hidden_size={self.hidden_size})"
            )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"CemConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.slm_hidden_size:
            factor = len(self.field_names) if self.feature_pooling == "sed_tokens" else 1
            if self.input_size != factor * self.slm_hidden_size:
                raise ValueError(
                    f"CemConfig.input_size={self.input_size} does not match feature_pooling={self.feature_pooling!r} "
                    f"with slm_hidden_size={self.slm_hidden_size} (expected {factor * self.slm_hidden_size})"
                )

    @classmethod
    def get_config_dict(cls, *args, **kwargs):
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        if config_dict.get("model_type") in cls.model_type_aliases:
            config_dict["model_type"] = cls.model_type
        return config_dict, kwargs

    @property
    def num_fields(self) -> int:
        return len(self.field_names)


__all__ = ["CemConfig", "CEM_POOLINGS", "DEFAULT_POOLING"]
