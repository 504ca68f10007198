"""Configuration of the confidence estimation model (CEM)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ...descriptors import SED_FIELDS

CEM_POOLINGS = ("sed_tokens", "mean")


@strict
class CemConfig(PreTrainedConfig):
    r"""
    The CEM reads SER-SLM last-layer hidden states and returns one confidence per SED field.

    Args:
        input_size: feature size: ``5 * H`` for ``feature_pooling="sed_tokens"``, ``H`` for ``"mean"``
            (H = the SER-SLM's LLM hidden size). Checked against ``slm_hidden_size`` when both are set.
        hidden_size: width of the three hidden layers.
        dropout: dropout after each hidden layer (paper: 0.1).
        field_names: the output order (descriptors.SED_FIELDS).
        feature_pooling: how the features were pooled from the SLM's hidden states; stored so that
            scoring extracts the features the CEM was trained on.
        slm_hidden_size: the SER-SLM hidden size H the features come from (0 = unknown).
    """

    model_type = "trustser_cem"

    input_size: int = 640
    hidden_size: int = 256
    dropout: float | int = 0.1
    batch_norm_eps: float = 1e-5
    field_names: list[str] | tuple[str, ...] = SED_FIELDS
    feature_pooling: str = "sed_tokens"
    slm_hidden_size: int = 0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        self.field_names = list(self.field_names)
        super().__post_init__(**kwargs)
        if self.feature_pooling not in CEM_POOLINGS:
            raise ValueError(f"CemConfig.feature_pooling must be one of {CEM_POOLINGS}, got {self.feature_pooling!r}")
        if self.input_size <= 0 or self.hidden_size <= 0:
            raise ValueError(f"CemConfig sizes must be positive (input_size={self.input_size}, hidden_size={self.hidden_size})")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"CemConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.slm_hidden_size:
            factor = len(self.field_names) if self.feature_pooling == "sed_tokens" else 1
            if self.input_size != factor * self.slm_hidden_size:
                raise ValueError(
                    f"CemConfig.input_size={self.input_size} does not match feature_pooling={self.feature_pooling!r} "
                    f"with slm_hidden_size={self.slm_hidden_size} (expected {factor * self.slm_hidden_size})"
                )

    @property
    def num_fields(self) -> int:
        return len(self.field_names)


__all__ = ["CemConfig", "CEM_POOLINGS"]
