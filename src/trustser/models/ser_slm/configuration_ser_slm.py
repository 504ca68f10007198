"""Configuration of the SER-SLM: any Hugging Face speech encoder + two VIB branches + projector + any
causal LM. Plain declarative data (transformers 5 dataclass config).

This module (like the rest of the folder) imports nothing from trustser, so that a saved checkpoint
also loads with ``trust_remote_code=True`` in a process that never imports trustser.
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


def infer_audio_conv_layers(audio_config) -> list[list[int]]:
    """``[[kernel, stride, padding], ...]`` of the encoder's front-end convolutions: maps a valid
    input length (samples for wav2vec2-style encoders, mel frames for Whisper-style ones) to the
    number of valid encoder frames. Shared with the processor, which uses it to count placeholders."""
    if audio_config is None:
        return []
    kernels = getattr(audio_config, "conv_kernel", None)
    strides = getattr(audio_config, "conv_stride", None)
    if kernels is not None and strides is not None:  # wav2vec2 / HuBERT / WavLM / data2vec-audio family
        return [[int(k), int(s), 0] for k, s in zip(kernels, strides)]
    if getattr(audio_config, "num_mel_bins", None) is not None:  # Whisper / Voxtral / Qwen2-Audio encoders
        return [[3, 1, 1], [3, 2, 1]]
    raise ValueError(
        f"cannot infer the front-end convolutions of audio encoder {audio_config.model_type!r}: "
        "pass audio_conv_layers=[[kernel, stride, padding], ...] to SerSlmConfig"
    )


def conv_output_length(length: int, conv_layers, frame_downsample: int = 1) -> int:
    """Number of audio tokens for an input of ``length`` valid samples/frames."""
    for k, s, p in conv_layers:
        length = max(0, (length + 2 * p - k) // s + 1)
    return -(-length // max(1, frame_downsample))


class SerSlmConfig(PreTrainedConfig):
    r"""
    The SER-SLM: any Hugging Face speech encoder, two variational information bottlenecks (SED and
    semantic), a projector and any causal LM.

    Args:
        audio_config (`dict` or `PreTrainedConfig`, *optional*, defaults to a HuBERT config): any
            speech-encoder config (HuBERT, wav2vec2, WavLM, Whisper-style ``voxtral_encoder`` /
            ``qwen2_audio_encoder``); its hidden states feed the VIB branches.
        text_config (`dict` or `PreTrainedConfig`, *optional*, defaults to a Llama config): any
            causal-LM config (Llama, Qwen2, ...); the backbone (``AutoModel``) becomes
            ``model.language_model``, the head ``lm_head``.
        audio_token_id (`int`, *optional*) / audio_token (`str`, defaults to `"<audio>"`): the
            placeholder token replaced by audio embeddings.
        sed_vib_dim (`int`, defaults to 64) / semantic_vib_dim (`int`, defaults to 128): latent sizes
            of the two variational information bottlenecks.
        vib_hidden_size (`int`, defaults to 256): hidden size of the MLP producing mu and log-variance.
        vib_beta (`float`, defaults to 1e-3): weight of the KL term (loss = lm_loss + vib_beta * kl_loss).
        sed_energy_stream (`bool`, defaults to `True`): feed the SED branch a frame log-energy stream
            from the raw waveform (keeps loudness observable when the encoder's features are
            level-normalised).
        sed_f0_stream (`bool`, defaults to `False`): also feed it a Praat F0 track (log F0, voicing,
            utterance mean log F0); the processor then needs ``f0_stream=True`` (praat-parselmouth).
        frame_downsample (`int`, defaults to 4): consecutive encoder frames stacked into one audio token.
        projector_hidden_act (`str`, defaults to `"gelu"`): activation of the projector.
        audio_conv_layers (`list`, *optional*): encoder front-end convolutions
            ``[[kernel, stride, padding], ...]``; inferred from ``audio_config`` when None.
        freeze_audio_tower (`bool`, defaults to `True`): keep the encoder frozen (the paper's recipe).
        tie_word_embeddings (`bool`, defaults to `False`): tie the LM head to the input embeddings.
        aux_sed_loss_weight (`float`, defaults to 0.0): weight of an auxiliary descriptor-classification
            loss on the SED branch (utterance mean of the SED latent -> one linear classifier per
            field, classes in the processor's ``sed_vocab`` order, ``aux_sed_num_classes`` each). A
            randomly initialised encoder gets no usable signal through the LM alone in minutes (it
            learns to ignore the audio); the paper's pre-trained encoder does not need it (0 = off, no heads).
        aux_ctc_loss_weight (`float`, defaults to 0.0): weight of an auxiliary CTC loss of the
            transcript's tokens on the semantic branch (frame latents -> vocabulary, blank = pad token); 0 = off.
        aux_sed_num_classes (`list[int]`, *optional*, defaults to `[3, 3, 3, 2, 5]`): classes per descriptor.
        use_cache (`bool`, *optional*): default of ``forward(use_cache=...)`` (None: the text config's),
            so that ``model.config.use_cache = False`` (what trainers set with gradient checkpointing) applies.
    """

    model_type = "ser_slm"
    sub_configs_defaults = {
        "audio_config": SubConfigSpec(config_class=AutoConfig, model_type="hubert"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    audio_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    audio_token_id: int | None = None
    audio_token: str = "<audio>"
    sed_vib_dim: int = 64
    semantic_vib_dim: int = 128
    vib_hidden_size: int = 256
    vib_beta: float = 1e-3
    sed_energy_stream: bool = True
    sed_f0_stream: bool = False
    frame_downsample: int = 4
    projector_hidden_act: str = "gelu"
    audio_conv_layers: list | None = None
    freeze_audio_tower: bool = True
    tie_word_embeddings: bool = False
    aux_sed_loss_weight: float = 0.0
    aux_ctc_loss_weight: float = 0.0
    aux_sed_num_classes: list | None = None
    use_cache: bool | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.audio_conv_layers is None:
            self.audio_conv_layers = infer_audio_conv_layers(self.audio_config)
        self.audio_conv_layers = [list(map(int, c)) for c in self.audio_conv_layers]
        if self.frame_downsample < 1:
            raise ValueError(f"frame_downsample must be >= 1, got {self.frame_downsample}")
        if self.vib_beta < 0:
            raise ValueError(f"vib_beta must be >= 0, got {self.vib_beta}")
        if self.aux_sed_loss_weight < 0 or self.aux_ctc_loss_weight < 0:
            raise ValueError("aux_sed_loss_weight and aux_ctc_loss_weight must be >= 0")
        if self.aux_sed_num_classes is None:
            self.aux_sed_num_classes = [3, 3, 3, 2, 5]  # pitch, volume, speed, gender, age (processor's sed_vocab)
        self.aux_sed_num_classes = [int(n) for n in self.aux_sed_num_classes]
        self.hidden_size = self.text_config.hidden_size
        if self.use_cache is None:
            self.use_cache = bool(getattr(self.text_config, "use_cache", True))

    @property
    def prosody_features(self) -> int:
        return (2 if self.sed_energy_stream else 0) + (3 if self.sed_f0_stream else 0)


__all__ = ["SerSlmConfig", "infer_audio_conv_layers", "conv_output_length"]
