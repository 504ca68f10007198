"""Configuration of the SED Controller (paper section 3.1): plain declarative data."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ...descriptors import SED_FIELDS

MODIFY_STRATEGIES = ("adjacent", "uniform")
POOLINGS = ("last", "mean")


def checked_rectify_fields(fields: list[str] | str | None) -> list[str] | None:
    """``rectify_fields`` as SED fields in SED_FIELDS order (a comma-separated string is split), or
    None (all five); a ValueError names anything else."""
    if fields is None:
        return None
    if isinstance(fields, str):  # "pitch,volume" from a command line
        fields = [f.strip() for f in fields.split(",") if f.strip()]
    if not fields or len(set(fields)) != len(fields) or any(f not in SED_FIELDS for f in fields):
        raise ValueError(
            f"rectify_fields must be distinct SED fields out of {list(SED_FIELDS)} (at least one), got {fields}"
        )
    return [f for f in SED_FIELDS if f in fields]


@strict
class SedControllerConfig(PreTrainedConfig):
    r"""
    Args:
        sampling_rate (`int`, defaults to 16000): waveform rate the log-mel front end expects.
        n_mels (`int`, defaults to 64): mel bands of the log-mel spectrogram the LSTM reads.
        input_size (`int`, *optional*): width of the per-frame features the LSTM reads when they
            are computed outside the controller (the SER-SLM's SED-branch features,
            `SedRectifyConfig.controller_input="sed_branch"`: the SLM's `sed_vib_dim`); the
            controller's own log-mel front end (`log_mel`, `input_values`) is then refused.
            `None` (the default, the paper): the LSTM reads the controller's log-mel, `n_mels` wide.
        n_fft (`int`, defaults to 400) / hop_length (`int`, defaults to 160): STFT (25 ms / 10 ms).
        frame_stride (`int`, defaults to 1): average-pool this many mel frames into one LSTM step
            (1 = the paper's frame rate; larger values trade resolution for speed).
        hidden_size (`int`, defaults to 128): LSTM hidden size (paper: 128).
        embedding_size (`int`, defaults to 32): size of each annotated SED token embedding (paper: 32).
        pooling (`str`, defaults to `"last"`): utterance summary, the LSTM's last valid hidden
            state (`"last"`) or the masked mean of its outputs (`"mean"`).
        modify_strategy (`str`, defaults to `"adjacent"`): what "modify" does to a label:
            `"adjacent"` replaces it by a neighbouring value in the field's ordered vocabulary,
            uniformly among the neighbours (one at the ends; for gender this is the other value);
            `"uniform"` by any other value of the field, uniformly.
        head_hidden_size (`int`, defaults to 0): 0 = the paper's single Linear layer over [LSTM
            summary; SED embeddings]. A positive size puts one tanh hidden layer before it, so the
            controller can express interactions (e.g. "modify pitch when the annotation says
            `high` *and* the speaker is female"), which a linear head over concatenated features
            cannot.
        audio_norm (`bool`, defaults to `False`): normalise the LSTM's input per utterance (each mel
            band, or each feature of `input_size`, to zero mean and unit variance over the valid
            frames) before the LSTM, so that the recording level and channel do not shift the
            summary; `False` reads the raw log-mel (the paper) or the raw features.
        context_size (`int`, defaults to 0): width of a per-utterance context vector the head reads
            beside the LSTM summary and the SED embeddings (`SedRectifyConfig.controller_speaker_context`:
            3, the utterance's speaker-relative pitch / level / rate z-scores, which one utterance's
            audio cannot show); the forward then needs `context` (B, context_size). 0 (the default,
            the paper): no context.
        reads_audio (`bool`, defaults to `True`): `False` builds a controller whose head reads only
            the SED embeddings and the context (its LSTM summary is a constant zero and the LSTM is
            frozen): the audio summary is a per-utterance feature through which the head can fit
            each utterance's reward noise instead of a rule that generalises
            (`SedRectifyConfig.controller_input="none"`, docs/rectify.md). `True`: the paper's.
        rectify_fields (`list[str]`, *optional*): the SED fields the controller may modify; every
            other field is always retained (its "modify" logit is fixed at -1e4, so its probability
            is exactly 0, it never moves the rewards and gets no gradient). For fields whose
            emotion reward does not depend on the label being right (on the embedded benchmark
            `gender` and `age`: a modification of a right label is paid, not penalised,
            `benchmarks/reward_signal.py`), the reward cannot tell a repair from a corruption.
            `None` (the default, the paper): all five fields.
        initial_retain_bias (`float`, defaults to 2.0): initial logit margin of "retain" over
            "modify" (P(modify) = sigmoid(-2) ~ 0.12 at start) so that an untrained controller
            mostly keeps the annotations instead of corrupting half of them.
    """

    model_type = "sed_controller"

    sampling_rate: int = 16000
    n_mels: int = 64
    input_size: int | None = None
    n_fft: int = 400
    hop_length: int = 160
    frame_stride: int = 1
    hidden_size: int = 128
    embedding_size: int = 32
    pooling: str = "last"
    modify_strategy: str = "adjacent"
    head_hidden_size: int = 0
    initial_retain_bias: float = 2.0
    audio_norm: bool = False
    context_size: int = 0
    reads_audio: bool = True
    rectify_fields: list[str] | None = None
    initializer_range: float = 0.02

    def validate_architecture(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.modify_strategy not in MODIFY_STRATEGIES:
            raise ValueError(f"modify_strategy must be one of {MODIFY_STRATEGIES}, got {self.modify_strategy!r}")
        if self.context_size < 0:
            raise ValueError(f"context_size must be >= 0, got {self.context_size}")
        if self.head_hidden_size < 0:
            raise ValueError(f"head_hidden_size must be >= 0, got {self.head_hidden_size}")
        for name in ("n_mels", "n_fft", "hop_length", "frame_stride", "hidden_size", "embedding_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        checked_rectify_fields(self.rectify_fields)
        if self.input_size is not None and self.input_size < 1:
            raise ValueError(f"input_size must be >= 1 or None (the log-mel, n_mels wide), got {self.input_size}")


__all__ = ["SedControllerConfig", "checked_rectify_fields"]
