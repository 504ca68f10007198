"""SED Controller (paper section 3.1): decides, per annotated descriptor, retain or modify.

A one-layer LSTM reads the utterance's log-mel spectrogram (or, with ``config.input_size``,
per-frame features computed outside it, such as the SER-SLM's SED-branch features); its summary
vector is concatenated with embeddings of the five annotated SED tokens (and, with
``config.context_size``, a per-utterance context vector) and a Linear layer gives, per field,
logits of (retain, modify). Beside the model: how its actions are drawn, ``sample_policies`` (actions,
log-probabilities and rectified labels from a torch.Generator), and what "modify" means,
``modify_labels``. The RL objective that trains it (advantages, clipped surrogate, entropy, KL)
lives with the rectification trainer, in ``trustser.trainers.rectify_objective``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, can_return_tuple

from ...descriptors import SED_FIELDS, SED_VOCAB, normalize_sed_value
from ..loading import CheckedFromPretrainedMixin
from .configuration_sed_controller import SedControllerConfig

RETAIN, MODIFY = 0, 1
# the "modify" logit of a field the controller may not change (config.rectify_fields): P(modify) is
# exactly 0 in float32, so sampling never picks it, its log-probability of "retain" is 0 and its
# entropy and KL terms are 0 (a finite value, where -inf would make them NaN)
FIXED_MODIFY_LOGIT = -1e4
FIELD_SIZES: tuple[int, ...] = tuple(len(SED_VOCAB[f]) for f in SED_FIELDS)
FIELD_OFFSETS: tuple[int, ...] = tuple(sum(FIELD_SIZES[:i]) for i in range(len(FIELD_SIZES)))


# --------------------------------------------------------------------------------------------
# Labels <-> ids
# --------------------------------------------------------------------------------------------
def sed_to_ids(seds: Sequence[Mapping[str, str]]) -> torch.Tensor:
    """(B, 5) value indices (within each field's vocabulary, SED_FIELDS order).
    Raises ValueError naming the row and field for a missing/unknown descriptor."""
    out = []
    for i, sed in enumerate(seds):
        row = []
        for f in SED_FIELDS:
            v = normalize_sed_value(f, sed.get(f))
            if v is None:
                raise ValueError(
                    f"row {i}: invalid or missing {f!r} descriptor {sed.get(f)!r} (allowed: {SED_VOCAB[f]})"
                )
            row.append(SED_VOCAB[f].index(v))
        out.append(row)
    return torch.tensor(out, dtype=torch.long).reshape(len(out), len(SED_FIELDS))


def ids_to_sed(ids: torch.Tensor) -> list[dict[str, str]]:
    """Inverse of ``sed_to_ids`` for a (N, 5) tensor."""
    return [{f: SED_VOCAB[f][int(v)] for f, v in zip(SED_FIELDS, row)} for row in ids.tolist()]


# --------------------------------------------------------------------------------------------
# Policy pieces
# --------------------------------------------------------------------------------------------
def modify_labels(
    sed_ids: torch.Tensor,
    modify: torch.Tensor,
    strategy: str = "adjacent",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Applies "modify" where ``modify`` is true; ``sed_ids``/``modify`` are (..., 5).

    ``adjacent``: the neighbouring value in the field's ordered vocabulary (low<normal<high,
    slow<normal<fast, child<...<elderly), uniformly among the neighbours: the end values have one
    neighbour, so high->normal, normal->low|high; gender's two values are each other's neighbour.
    ``uniform``: any other value of the field, uniformly. The choice of replacement is not part of
    the controller's action (which is only retain/modify): it is environment randomness, drawn
    from ``generator`` so it is reproducible."""
    sizes = torch.tensor(FIELD_SIZES, device=sed_ids.device)
    sizes = sizes.expand_as(sed_ids)
    u = torch.rand(
        sed_ids.shape, generator=generator, device=generator.device if generator is not None else sed_ids.device
    )
    u = u.to(sed_ids.device)
    if strategy == "adjacent":
        up = torch.where(u < 0.5, sed_ids - 1, sed_ids + 1)
        new = torch.where(sed_ids == 0, sed_ids + 1, torch.where(sed_ids == sizes - 1, sed_ids - 1, up))
    elif strategy == "uniform":
        offset = 1 + torch.minimum(torch.floor(u * (sizes - 1)).long(), sizes - 2)
        new = (sed_ids + offset) % sizes
    else:
        raise ValueError(f"unknown modify strategy {strategy!r}; choose 'adjacent' or 'uniform'")
    return torch.where(modify.bool(), new, sed_ids)


@dataclass
class PolicySample:
    """K sampled rectification policies per utterance."""

    actions: torch.Tensor  # (B, K, 5) long, 0 retain / 1 modify
    log_probs: torch.Tensor  # (B, K, 5) log-probability of each field's action (sampling policy)
    rectified_ids: torch.Tensor  # (B, K, 5) value ids after the actions

    @property
    def policy_log_probs(self) -> torch.Tensor:
        """(B, K) log-probability of each whole policy (fields independent)."""
        return self.log_probs.sum(-1)


def sample_policies(
    logits: torch.Tensor,
    sed_ids: torch.Tensor,
    num_policies: int,
    *,
    generator: torch.Generator | None = None,
    strategy: str = "adjacent",
    force_retain: bool = False,
) -> PolicySample:
    """Draws ``num_policies`` policies per utterance from (B, 5, 2) logits; reproducible from
    ``generator``. ``force_retain`` returns the always-retain policy (controller warm-up)."""
    if num_policies < 1:
        raise ValueError(f"num_policies must be >= 1, got {num_policies}")
    logits = logits.detach().float()
    b, nf, _ = logits.shape
    logp = torch.log_softmax(logits, dim=-1)  # (B, 5, 2)
    if force_retain:
        actions = torch.zeros(b, num_policies, nf, dtype=torch.long, device=logits.device)
    else:
        p_modify = logp[..., MODIFY].exp().unsqueeze(1).expand(b, num_policies, nf)
        dev = generator.device if generator is not None else logits.device
        u = torch.rand((b, num_policies, nf), generator=generator, device=dev).to(logits.device)
        actions = (u < p_modify).long()
    log_probs = torch.gather(logp.unsqueeze(1).expand(b, num_policies, nf, 2), -1, actions.unsqueeze(-1)).squeeze(-1)
    ids = sed_ids.unsqueeze(1).expand(b, num_policies, nf)
    rectified = modify_labels(ids, actions, strategy, generator)
    return PolicySample(actions=actions, log_probs=log_probs, rectified_ids=rectified)


def rectify_field_indices(rectify_fields: Sequence[str] | None) -> list[int]:
    """Indices in ``SED_FIELDS`` of the fields a controller may modify (all five when None)."""
    return [j for j, f in enumerate(SED_FIELDS) if rectify_fields is None or f in rectify_fields]


def hold_fixed_fields(logits: torch.Tensor, rectify_fields: Sequence[str] | None) -> torch.Tensor:
    """(B, 5, 2) retain/modify logits with every field outside ``rectify_fields`` set to "always
    retain", (0, FIXED_MODIFY_LOGIT), no gradient through it; unchanged when ``rectify_fields`` is None."""
    if rectify_fields is None:
        return logits
    may = rectify_field_indices(rectify_fields)
    held = torch.tensor([j not in may for j in range(len(SED_FIELDS))], device=logits.device)[None, :, None]
    fixed = torch.zeros(2, dtype=logits.dtype, device=logits.device)
    fixed[MODIFY] = FIXED_MODIFY_LOGIT
    return torch.where(held, fixed, logits)


def normalize_frames(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(B, T, D) features standardised per utterance and dimension over the valid frames of
    ``mask`` (B, T); padded frames are left at 0 so they cannot reach a valid one."""
    m = mask.to(x.dtype)[..., None]
    n = m.sum(1, keepdim=True).clamp(min=1)
    mean = (x * m).sum(1, keepdim=True) / n
    var = (((x - mean) * m) ** 2).sum(1, keepdim=True) / n
    return (x - mean) / torch.sqrt(var + eps) * m


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
@dataclass
class SedControllerOutput(ModelOutput):
    """logits: (B, 5, 2) retain/modify logits per SED field (SED_FIELDS order); summary: (B, H)."""

    logits: torch.Tensor | None = None
    summary: torch.Tensor | None = None


class SedControllerPreTrainedModel(CheckedFromPretrainedMixin, PreTrainedModel):
    config: SedControllerConfig
    config_class = SedControllerConfig
    base_model_prefix = "controller"
    main_input_name = "input_features"
    input_modalities = ("audio", "text")
    supports_gradient_checkpointing = False
    _no_split_modules = []

    def _init_weights(self, module):
        if getattr(module, "_is_retain_modify_head", False):
            # start near "always retain" (see SedControllerConfig.initial_retain_bias)
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            bias = torch.zeros(len(SED_FIELDS), 2)
            bias[:, RETAIN] = self.config.initial_retain_bias
            init.copy_(module.bias, bias.flatten())
        else:
            super()._init_weights(module)


class SedControllerModel(SedControllerPreTrainedModel):
    """LSTM over log-mel (or ``config.input_size``-wide features) -> summary; concat annotated SED
    embeddings (and a ``config.context_size``-wide context) -> Linear -> per-field softmax over
    (retain, modify). Kept small and fp32: it is trained by its own optimizer."""

    def __init__(self, config: SedControllerConfig):
        super().__init__(config)
        self.lstm = nn.LSTM(config.input_size or config.n_mels, config.hidden_size, num_layers=1, batch_first=True)
        self.sed_embedding = nn.Embedding(sum(FIELD_SIZES), config.embedding_size)
        width = config.hidden_size + len(SED_FIELDS) * config.embedding_size + config.context_size
        self.head_hidden = None
        if config.head_hidden_size:
            self.head_hidden = nn.Sequential(nn.Linear(width, config.head_hidden_size), nn.Tanh())
            width = config.head_hidden_size
        self.head = nn.Linear(width, len(SED_FIELDS) * 2)
        self.head._is_retain_modify_head = True
        self._mel_cache: dict = {}
        self.post_init()
        if not config.reads_audio:  # the summary is a constant: nothing for the LSTM to learn
            self.lstm.requires_grad_(False)

    # ---- front end ---------------------------------------------------------------------------
    @property
    def reads_log_mel(self) -> bool:
        """True: the LSTM reads this controller's own log-mel (the paper); False (``config.input_size``
        set): features of that width computed outside it
        (``trustser.trainers.rectify.controller_input_features``)."""
        return self.config.input_size is None

    def _mel(self, device: torch.device):
        """torchaudio MelSpectrogram, kept out of the state dict (it is fixed by the config)."""
        key = str(device)
        if key not in self._mel_cache:
            import torchaudio

            c = self.config
            self._mel_cache[key] = torchaudio.transforms.MelSpectrogram(
                sample_rate=c.sampling_rate, n_fft=c.n_fft, hop_length=c.hop_length, n_mels=c.n_mels
            ).to(device)
        return self._mel_cache[key]

    @torch.no_grad()
    def log_mel(
        self, waveforms: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S) padded waveforms -> (B, T, n_mels) log-mel and (B, T) frame mask."""
        if not self.reads_log_mel:
            raise ValueError(
                f"this SED Controller reads {self.config.input_size}-wide features computed outside it "
                "(config.input_size is set, e.g. the SER-SLM's SED-branch features), not its log-mel: "
                "pass them as input_features / feature_attention_mask"
            )
        waveforms = waveforms.float()
        if lengths is None:
            lengths = torch.full((waveforms.shape[0],), waveforms.shape[1], device=waveforms.device)
        mel = self._mel(waveforms.device)(waveforms)  # (B, n_mels, T)
        feats = torch.log(mel + 1e-6).transpose(1, 2)
        # valid frames: windows lying inside the signal (so padding never changes them)
        inside = (lengths.to(feats.device) - self.config.n_fft // 2).clamp(min=0)
        frames = torch.div(inside, self.config.hop_length, rounding_mode="floor") + 1
        mask = torch.arange(feats.shape[1], device=feats.device)[None, :] < frames.clamp(max=feats.shape[1])[:, None]
        return feats, mask.long()

    def summarize(
        self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T, n_mels or input_size) -> (B, hidden) utterance summary (padding ignored)."""
        x = input_features.to(self.lstm.weight_ih_l0.dtype)  # the log-mel front end computes in fp32
        b, t, width = x.shape
        if width != self.lstm.input_size:
            what = "n_mels" if self.reads_log_mel else "input_size"
            raise ValueError(
                f"the SED Controller's LSTM reads {self.lstm.input_size}-wide frames ({what}), got {width}-wide "
                "input_features"
            )
        mask = (
            torch.ones(b, t, dtype=torch.long, device=x.device)
            if feature_attention_mask is None
            else feature_attention_mask.long()
        )
        if self.config.audio_norm:
            x = normalize_frames(x, mask)
        s = self.config.frame_stride
        if s > 1:
            pad = (-t) % s
            x = nn.functional.pad(x, (0, 0, 0, pad))
            m = nn.functional.pad(mask, (0, pad)).float()
            x = (x * m[..., None]).reshape(b, -1, s, x.shape[-1]).sum(2) / m.reshape(b, -1, s).sum(2).clamp(min=1)[
                ..., None
            ]
            mask = (m.reshape(b, -1, s).sum(2) > 0).long()
        lengths = mask.sum(1).clamp(min=1)
        # padding is at the end and the LSTM is causal: outputs at valid frames ignore it, so the
        # padded batch runs on the fast (cuDNN / oneDNN) path without packing
        out, _ = self.lstm(x)
        if self.config.pooling == "last":
            return out[torch.arange(b, device=out.device), lengths - 1]
        m = mask.float()[..., None]
        return (out * m).sum(1) / m.sum(1).clamp(min=1)

    def _context(self, context: torch.Tensor | None, batch: int, like: torch.Tensor) -> list[torch.Tensor]:
        """The context as a piece of the head's input ([] without one), checked against the config."""
        want = self.config.context_size
        if not want:
            if context is not None:
                raise ValueError("this SED Controller reads no context (config.context_size=0); got one")
            return []
        if context is None:
            raise ValueError(f"this SED Controller reads a {want}-wide context (config.context_size): pass context=")
        if tuple(context.shape) != (batch, want):
            raise ValueError(f"context must be (B, {want}) = ({batch}, {want}), got {tuple(context.shape)}")
        return [context.to(device=like.device, dtype=like.dtype)]

    @can_return_tuple
    def forward(
        self,
        sed_ids: torch.Tensor,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        input_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | SedControllerOutput:
        """``sed_ids`` (B, 5): annotated value ids (``sed_to_ids``). Audio as log-mel
        ``input_features`` (B, T, n_mels) or raw ``input_values`` (B, S) at ``config.sampling_rate``;
        with ``config.input_size`` set, ``input_features`` (B, T, input_size) only. ``context``
        (B, config.context_size): what the head reads beside the audio and the labels (e.g. the
        speaker-relative prosody); required when ``config.context_size`` > 0, refused otherwise."""
        if input_features is None:
            if input_values is None:
                raise ValueError("SedControllerModel needs input_features (log-mel) or input_values (waveform)")
            lengths = attention_mask.sum(1) if attention_mask is not None else None
            input_features, feature_attention_mask = self.log_mel(input_values, lengths)
        if self.config.reads_audio:
            summary = self.summarize(input_features, feature_attention_mask)
        else:
            summary = torch.zeros(sed_ids.shape[0], self.config.hidden_size, device=sed_ids.device)
        offsets = torch.tensor(FIELD_OFFSETS, device=sed_ids.device)
        emb = self.sed_embedding(sed_ids.long() + offsets).flatten(1)  # (B, 5*E)
        x = torch.cat([summary, emb, *self._context(context, sed_ids.shape[0], summary)], dim=-1)
        if self.head_hidden is not None:
            x = self.head_hidden(x)
        logits = self.head(x).view(-1, len(SED_FIELDS), 2)
        logits = hold_fixed_fields(logits, self.config.rectify_fields)
        return SedControllerOutput(logits=logits, summary=summary)


# the name before the naming convention (docs/ARCHITECTURE.md), kept for existing imports
SedController = SedControllerModel

__all__ = [
    "SedControllerModel",
    "SedControllerPreTrainedModel",
    "SedControllerOutput",
    "PolicySample",
    "sample_policies",
    "modify_labels",
    "hold_fixed_fields",
    "rectify_field_indices",
    "normalize_frames",
    "sed_to_ids",
    "ids_to_sed",
    "RETAIN",
    "MODIFY",
]
