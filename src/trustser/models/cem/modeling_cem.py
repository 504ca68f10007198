"""Confidence estimation model (CEM): a 3-layer residual feed-forward network over SER-SLM hidden
states with one sigmoid confidence per SED field and a mean pooling giving the utterance confidence
(paper section 2.1, after Deng et al. 2023)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, can_return_tuple

from ..loading import CheckedFromPretrainedMixin
from .configuration_cem import CemConfig


@dataclass
class CemOutput(ModelOutput):
    """``field_confidence`` (B x 5, sigmoid of ``logits``) in ``config.field_names`` order and its mean,
    ``confidence`` (B); ``loss`` is the BCE of paper eq. 1 when labels are given."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    field_confidence: torch.FloatTensor | None = None
    confidence: torch.FloatTensor | None = None


class CemHiddenLayer(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Dropout."""

    def __init__(self, in_size: int, out_size: int, dropout: float, eps: float):
        super().__init__()
        self.linear = nn.Linear(in_size, out_size)
        self.norm = nn.BatchNorm1d(out_size, eps=eps)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.act(self.norm(self.linear(x))))


class CemPreTrainedModel(CheckedFromPretrainedMixin, PreTrainedModel):
    config_class = CemConfig
    config: CemConfig
    base_model_prefix = "cem"
    main_input_name = "features"
    _no_split_modules = []

    def _init_weights(self, module):
        # transformers' init functions (not .data): they skip loaded tensors, and the BatchNorm running
        # statistics are set too, so a model built on the meta device initialises completely
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm1d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)


class CemModel(CemPreTrainedModel):
    """h1 = layer1(x); h2 = layer2(h1) + h1 (the skip); h3 = layer3(h2); field confidences =
    sigmoid(head(h3)); utterance confidence = their mean."""

    def __init__(self, config: CemConfig):
        super().__init__(config)
        d, h = config.input_size, config.hidden_size
        p, eps = float(config.dropout), config.batch_norm_eps
        self.layer1 = CemHiddenLayer(d, h, p, eps)
        self.layer2 = CemHiddenLayer(h, h, p, eps)
        self.layer3 = CemHiddenLayer(h, h, p, eps)
        self.head = nn.Linear(h, config.num_fields)
        self.post_init()

    @staticmethod
    def bce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean BCE over the field confidences (paper eq. 1). Label entries < 0 (e.g. -100) are
        ignored, which per-field balancing uses to leave fields out of the loss."""
        labels = labels.to(logits.dtype)
        mask = labels >= 0
        per = nn.functional.binary_cross_entropy_with_logits(logits, labels.clamp(min=0.0), reduction="none")
        return (per * mask).sum() / mask.sum().clamp(min=1)

    @can_return_tuple
    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> tuple | CemOutput:
        """``features`` (B, input_size) in any float dtype (SER-SLM hidden states are often bf16): they
        are cast to the CEM's own dtype."""
        if features.dim() != 2 or features.shape[-1] != self.config.input_size:
            raise ValueError(
                f"CEM expects features of shape (batch, {self.config.input_size}), got {tuple(features.shape)}"
            )
        h1 = self.layer1(features.to(self.head.weight.dtype))
        h2 = self.layer2(h1) + h1
        h3 = self.layer3(h2)
        logits = self.head(h3)
        field_confidence = torch.sigmoid(logits)
        confidence = field_confidence.mean(dim=-1)
        loss = self.bce_loss(logits, labels) if labels is not None else None
        return CemOutput(loss=loss, logits=logits, field_confidence=field_confidence, confidence=confidence)


# the name before the naming convention (docs/ARCHITECTURE.md), kept for existing imports
ConfidenceEstimationModel = CemModel

__all__ = ["CemModel", "CemPreTrainedModel", "CemOutput"]
